"""Second-moment statistics C = E[k kᵀ] of the MLP output projection's input, and the inverse
C⁻¹ that ROME and MEMIT whiten with, both cached on disk.

C is collected over a text corpus: local text files (one document per non-empty line; ``.jsonl``
files: one ``{"text": ...}`` object per line), a ``datasets`` source ``hf:NAME[:CONFIG[:SPLIT]]``,
or a named source that needs nothing from the user: ``python-docs``, the default
(``corpus=None``), the Python documentation every Python ships (:func:`python_docs`), or
``sampled``, text sampled from the model itself (:func:`sampled_corpus`, generated once and
cached; minutes on a CPU, seconds on a GPU). The model runs only up to the deepest wanted layer,
``batch_chunks`` chunks per forward pass, and the sums are accumulated on the model's device
(:func:`collect` says in which precision). Statistics are cached under ``cache_dir()/"stats"``
keyed by model, layer, corpus identity and chunk length, with the token count in the file name.
A corpus that runs out before the tokens asked for gives statistics of the tokens it holds, with
a warning naming both numbers, cached under that number.

C⁻¹ is computed once per statistics file (:func:`inverse`, float64), cached beside it on disk,
and moved to the model's device once per process, so that an edit costs O(d²) (ROME) or
O(n d²) for n facts (MEMIT), never a d × d solve.

    stats = second_moment.collect(lm, layers=[4], corpus="/data/wiki.txt", n_tokens=100_000)
    C = stats[4].matrix                                # [mlp_hidden, mlp_hidden], float64, CPU
    C_inv = stats[4].inverse(lm.device)                # float64 on the LM's device, cached
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import re
import time
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from remedi.atomic import atomic_path, write_text
from remedi.hooks import Site, intervene
from remedi.models import LoadedModel, cache_dir, max_positions
from remedi.models.loading import cache_lock

log = logging.getLogger(__name__)

DEFAULT_TOKENS = 100_000
DEFAULT_CHUNK = 256
DEFAULT_BATCH_CHUNKS = 8
"""Chunks per forward pass while collecting (2,048 tokens at the default chunk length)."""
SAMPLE_LENGTH = 128
"""New tokens per sampled document of the default corpus (each starts from BOS)."""
Corpus = str | Path | Sequence[str | Path]
PYTHON_DOCS = "python-docs"
"""Named source: the Python documentation shipped with Python (:func:`python_docs`)."""
SAMPLED = "sampled"
"""Named source: text sampled from the model itself (:func:`sampled_corpus`)."""
DEFAULT_SOURCE = PYTHON_DOCS


@dataclass
class SecondMoment:
    """``matrix`` = mean of k kᵀ over ``n_tokens`` keys of ``layer`` (float64, CPU)."""

    layer: int
    matrix: torch.Tensor
    n_tokens: int
    corpus_id: str
    seconds: float = 0.0
    from_cache: bool = False
    exhausted: bool = False
    """The corpus ran out before the tokens asked for; ``n_tokens`` is all it holds."""
    path: Path | None = None
    """The file these statistics are cached in (None: not cached); C⁻¹ is cached beside it."""
    _inverses: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    def inverse(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """C⁻¹ in float64 on ``device``, computed or read once (see :func:`inverse`)."""
        result = inverse(self, device)
        assert result is not None
        return result


def _files(corpus: Corpus) -> list[Path]:
    items = [corpus] if isinstance(corpus, str | Path) else list(corpus)
    files: list[Path] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"corpus: {item} is neither a file nor a directory")
    if not files:
        raise ValueError(f"corpus: {corpus} holds no files")
    return files


def source_exists(corpus: Corpus | None) -> bool:
    """Whether ``corpus`` names a source :func:`collect` can read (checked before any work)."""
    if corpus is None or corpus in (PYTHON_DOCS, SAMPLED) or _is_hub(corpus):
        return True
    items = [corpus] if isinstance(corpus, str | Path) else list(corpus)
    return all(Path(item).expanduser().exists() for item in items)


def _is_hub(corpus: Corpus) -> bool:
    return isinstance(corpus, str) and corpus.startswith("hf:")


def python_docs() -> list[str]:
    """The paragraphs of the Python reference documentation that every Python ships
    (``pydoc_data.topics``, about 110,000 tokens of English), whitespace collapsed.

    The default statistics source: it is on every machine that runs remedi, needs no download
    and no model pass to make, and is the same for every model, so tables stay comparable.
    """
    from pydoc_data.topics import topics

    paragraphs = []
    for _, text in sorted(topics.items()):
        for block in re.split(r"\n\s*\n", text):
            flat = " ".join(block.split())
            if flat:
                paragraphs.append(flat)
    return paragraphs


def corpus_identity(corpus: Corpus) -> str:
    """A short hash naming the corpus: each file's name and contents (so a copied or re-created
    corpus keeps its cached statistics), or the hub id."""
    digest = hashlib.sha256()
    if corpus == PYTHON_DOCS:
        digest.update("\n".join(python_docs()).encode())
    elif _is_hub(corpus):
        digest.update(str(corpus).encode())
    else:
        for path in _files(corpus):
            digest.update(f"{path.name}|{path.stat().st_size}|".encode())
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


def _documents(corpus: Corpus) -> Iterator[str]:
    """Non-empty lines of the corpus files, or the ``text`` column of a ``datasets`` source."""
    if corpus == PYTHON_DOCS:
        yield from python_docs()
        return
    if _is_hub(corpus):
        from datasets import load_dataset

        name, *rest = str(corpus)[3:].split(":")
        config = rest[0] if rest and rest[0] else None
        split = rest[1] if len(rest) > 1 else "train"
        for record in load_dataset(name, config, split=split, streaming=True):
            text = str(record.get("text", "")).strip()
            if text:
                yield text
        return
    for path in _files(corpus):
        with path.open(encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                if path.suffix == ".jsonl":
                    try:
                        text = str(json.loads(line)["text"])
                    except (ValueError, KeyError, TypeError) as err:
                        raise ValueError(
                            f"corpus: {path} line {number} is not a JSON object with 'text'"
                        ) from err
                    if text.strip():
                        yield text
                else:
                    yield line.strip()


def sampled_corpus(
    lm: LoadedModel,
    n_tokens: int = DEFAULT_TOKENS,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
) -> Path:
    """A JSONL corpus of at least ``n_tokens`` tokens sampled from ``lm`` itself, built once.

    Each document is ``SAMPLE_LENGTH`` new tokens drawn at temperature 1 (no top-k or top-p, so
    the text follows the model's own distribution) from the BOS token; the file is cached under
    ``cache_dir()/"corpora"`` by model, token count and seed. This is the default source of the
    second-moment statistics: it ships with every model and needs no download.
    """
    path = cache_dir() / "corpora" / f"{_slug(lm.spec)}-sampled-{n_tokens}-seed{seed}.jsonl"
    if path.is_file():
        return path
    with cache_lock(
        f"corpus-{path.stem}", path.parent.parent
    ):  # a concurrent process samples it once
        if not path.is_file():
            _sample_corpus(lm, path, n_tokens, seed, batch_size, progress)
    return path


def _sample_corpus(
    lm: LoadedModel, path: Path, n_tokens: int, seed: int, batch_size: int, progress: bool
) -> None:
    """Sample the documents of :func:`sampled_corpus` and write them to ``path``."""
    tok = lm.tokenizer
    start_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if start_id is None:
        raise ValueError(f"model {lm.spec}: its tokenizer has neither a BOS nor an EOS token")
    # Decoded and tokenised again, a document may come out a token or two shorter: 5% spare.
    n_docs = -(-n_tokens * 21 // (20 * SAMPLE_LENGTH)) + 1
    lines: list[str] = []
    bar = tqdm(total=n_docs * SAMPLE_LENGTH, desc="sampling text", unit="tok", disable=not progress)
    devices = [lm.device] if lm.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for first in range(0, n_docs, batch_size):
            rows = min(batch_size, n_docs - first)
            ids = torch.full((rows, 1), start_id, device=lm.device)
            out = lm.model.generate(  # type: ignore[operator]
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                min_new_tokens=SAMPLE_LENGTH,  # no early end: every document is full length
                max_new_tokens=SAMPLE_LENGTH,
                pad_token_id=tok.pad_token_id,
            )
            lines += [
                json.dumps({"text": tok.decode(row[1:], skip_special_tokens=True)}) + "\n"
                for row in out.tolist()
            ]
            bar.update(rows * SAMPLE_LENGTH)
    bar.close()
    write_text(path, "".join(lines))


def describe(corpus: Corpus | None) -> str:
    """The statistics source in words, for the commands' output."""
    if corpus is None:
        corpus = DEFAULT_SOURCE
    if corpus == PYTHON_DOCS:
        return "the Python documentation shipped with Python (python-docs)"
    if corpus == SAMPLED:
        return "text sampled from the model itself (sampled)"
    return f"corpus {corpus}"


def source_line(stats: dict[int, SecondMoment], corpus: Corpus | None) -> str:
    """One line saying which statistics an edit uses, for the commands to print."""
    held = sorted({s.n_tokens for s in stats.values()})
    cached = all(s.from_cache for s in stats.values())
    return (
        f"statistics: layer(s) {', '.join(map(str, sorted(stats)))}, "
        f"{'/'.join(f'{n:,}' for n in held)} tokens of {describe(corpus)}"
        f"{' (cached)' if cached else ''}"
    )


def token_chunks(
    lm: LoadedModel, corpus: Corpus, n_tokens: int, chunk_len: int = DEFAULT_CHUNK
) -> Iterator[tuple[torch.Tensor, int]]:
    """Yield ``(ids [1, len], skip)`` chunks of the concatenated documents until ``n_tokens`` keys.

    Each chunk starts with the tokenizer's BOS token when it adds one (``skip`` = 1: that position
    is not counted, its states are atypical), so chunks look like the prompts the model edits.
    """
    tok = lm.tokenizer
    bos = tok.bos_token_id
    probe = tok("a")["input_ids"]
    prefix = [bos] if bos is not None and probe and probe[0] == bos else []
    body = chunk_len - len(prefix)
    buffer: list[int] = []
    left = n_tokens
    for doc in _documents(corpus):
        buffer += tok(doc, add_special_tokens=False)["input_ids"]
        if tok.eos_token_id is not None:
            buffer.append(tok.eos_token_id)
        while len(buffer) >= body and left > 0:
            take = min(body, left)
            piece, buffer = buffer[:take], buffer[body:]
            left -= take
            yield torch.tensor([prefix + piece]), len(prefix)
        if left <= 0:
            return
    if buffer and left > 0:
        yield torch.tensor([prefix + buffer[:left]]), len(prefix)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[-60:] or "model"


def _cache_key(lm: LoadedModel, layer: int, corpus: Corpus, chunk_len: int) -> str:
    key = f"{lm.spec}|{layer}|{corpus_identity(corpus)}|{chunk_len}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def cache_path(
    lm: LoadedModel, layer: int, corpus: Corpus, n_tokens: int, chunk_len: int = DEFAULT_CHUNK
) -> Path:
    """Where the statistics of ``layer`` over ``n_tokens`` tokens of ``corpus`` are cached."""
    digest = _cache_key(lm, layer, corpus, chunk_len)
    return cache_dir() / "stats" / f"{_slug(lm.spec)}-L{layer}-{digest}-{n_tokens}.pt"


UNREADABLE = (
    OSError,
    EOFError,
    RuntimeError,
    KeyError,
    ValueError,
    TypeError,
    pickle.UnpicklingError,
    zipfile.BadZipFile,
)
"""What reading a truncated or otherwise damaged cache file raises."""


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes: stored beside cached statistics and
    inverses, so that a file garbled into other numbers that still parse is never used."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    digest = hashlib.sha256(f"{flat.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(flat.view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _matrix_problem(
    data: dict[str, object], key: str, width: int | None = None, layer: int | None = None
) -> str | None:
    """What is wrong with the cached matrix ``data[key]`` (None: it is sound): not a finite
    float64 square matrix (of ``width``, for ``layer``), or not what its checksum says. Files
    from before checksums must at least be symmetric, as every C and C⁻¹ is."""
    matrix = data[key]
    if not isinstance(matrix, torch.Tensor) or matrix.dtype != torch.float64 or matrix.ndim != 2:
        return f"no float64 matrix under {key!r}"
    expected = width if width is not None else matrix.shape[0]
    if tuple(matrix.shape) != (expected, expected):
        return f"{key} has shape {tuple(matrix.shape)}, expected ({expected}, {expected})"
    if layer is not None and int(data["layer"]) != layer:  # type: ignore[call-overload]
        return f"it holds layer {data['layer']}, not {layer}"
    if not bool(torch.isfinite(matrix).all()):
        return f"{key} holds non-finite values"
    digest = data.get("sha256")
    if digest is not None and digest != tensor_digest(matrix):
        return f"{key} does not match its SHA-256 checksum"
    scale = float(matrix.abs().max()) if matrix.numel() else 0.0
    if digest is None and not torch.allclose(matrix, matrix.T, rtol=0, atol=1e-9 * scale):
        return f"{key} is not symmetric"
    return None


def _save(path: Path, stats: SecondMoment) -> None:
    with atomic_path(path) as tmp:
        torch.save(
            {
                "layer": stats.layer,
                "matrix": stats.matrix,
                "sha256": tensor_digest(stats.matrix),
                "n_tokens": stats.n_tokens,
                "corpus_id": stats.corpus_id,
                "seconds": stats.seconds,
                "exhausted": stats.exhausted,
            },
            tmp,
        )


def _load(
    path: Path, layer: int | None = None, width: int | None = None, report: bool = True
) -> SecondMoment | None:
    """The statistics cached in ``path`` (checked: see :func:`_matrix_problem`); None when there
    are none or the file is damaged (then they are collected again and the file replaced; with
    ``report``, a warning names the file)."""
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        problem = _matrix_problem(data, "matrix", width, layer)
        if problem:
            raise ValueError(problem)
        stats = SecondMoment(
            layer=int(data["layer"]),
            matrix=data["matrix"],
            n_tokens=int(data["n_tokens"]),
            corpus_id=str(data["corpus_id"]),
            seconds=float(data.get("seconds", 0.0)),
            from_cache=True,
            exhausted=bool(data.get("exhausted", False)),
            path=path,
        )
        if stats.n_tokens < 1:
            raise ValueError(f"it counts {stats.n_tokens} tokens")
    except UNREADABLE as err:
        if report:
            log.warning(
                "cached statistics %s are unreadable or damaged (%s); collecting them again",
                path,
                err,
            )
        return None
    return stats


def _load_cached(
    lm: LoadedModel,
    layer: int,
    corpus: Corpus,
    n_tokens: int,
    chunk_len: int,
    report: bool = True,
) -> SecondMoment | None:
    """The cached statistics for ``n_tokens``, or those of the whole corpus when it is known to
    hold fewer tokens than that."""
    width = lm.arch.mlp_hidden_size
    exact = _load(cache_path(lm, layer, corpus, n_tokens, chunk_len), layer, width, report)
    if exact is not None:
        return exact
    digest = _cache_key(lm, layer, corpus, chunk_len)
    for path in cache_path(lm, layer, corpus, 1, chunk_len).parent.glob(f"*-{digest}-*.pt"):
        held = path.stem.rsplit("-", 1)[-1]
        if held.isdigit() and int(held) < n_tokens:
            stats = _load(path, layer, width, report)
            if stats is not None and stats.exhausted:
                _warn_short(stats, n_tokens, corpus)
                return stats
    return None


def _warn_short(stats: SecondMoment, asked: int, corpus: Corpus | None) -> None:
    log.warning(
        "statistics of layer %d hold %d tokens where %d were asked for: %s has no more; "
        "ROME/MEMIT edits whitened by them may not take (give a larger --corpus)",
        stats.layer,
        stats.n_tokens,
        asked,
        describe(corpus),
    )


def float64_device(device: torch.device | str) -> torch.device:
    """Where float64 work for a model on ``device`` runs: there, except on Apple's MPS (no
    float64), where it runs on the CPU. A bare ``cuda`` names the current GPU, so that ``cuda``
    and ``cuda:0`` share one cached inverse."""
    device = torch.device(device)
    if device.type == "mps":
        return torch.device("cpu")
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def chunk_batches(
    chunks: Iterator[tuple[torch.Tensor, int]], batch_chunks: int
) -> Iterator[tuple[torch.Tensor, int]]:
    """Stack up to ``batch_chunks`` consecutive chunks of equal length into one ``[rows, len]``
    batch (only the corpus's last chunk can be shorter: it goes alone, unpadded)."""
    rows: list[torch.Tensor] = []
    skip = 0
    for ids, chunk_skip in chunks:
        if rows and (ids.shape[1] != rows[0].shape[1] or chunk_skip != skip):
            yield torch.cat(rows), skip
            rows = []
        rows.append(ids)
        skip = chunk_skip
        if len(rows) == batch_chunks:
            yield torch.cat(rows), skip
            rows = []
    if rows:
        yield torch.cat(rows), skip


def collect(
    lm: LoadedModel,
    layers: Sequence[int],
    corpus: Corpus | None = None,
    n_tokens: int = DEFAULT_TOKENS,
    chunk_len: int = DEFAULT_CHUNK,
    use_cache: bool = True,
    progress: bool = True,
    batch_chunks: int = DEFAULT_BATCH_CHUNKS,
) -> dict[int, SecondMoment]:
    """Second moments of the ``mlp_in`` keys of ``layers``, from cache or in one corpus pass.

    ``corpus`` None: :data:`DEFAULT_SOURCE`; ``"sampled"``: text sampled from ``lm``
    (:func:`sampled_corpus`, built once). ``batch_chunks`` chunks run per forward pass.

    Precision: each pass's KᵀK (up to ``batch_chunks`` × ``chunk_len`` = 2,048 keys by default)
    is a float32 matrix product on the model's device, added into a float64 running sum that
    also stays there; nothing crosses to the host until the mean is taken. The float32 product
    is exact to ~1e-6 relative, far below the sampling noise of a 100k-token estimate; the
    float64 sum keeps that over any number of passes. A compensated float32 sum was not worth
    it: the float64 add is one memory-bound pass over d² elements (about 2 ms for GPT-J's
    d = 16,384 at an H200's bandwidth, estimated) against ~10x that for the product itself.
    """
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    if chunk_len < 2:
        raise ValueError(f"chunk_len must be at least 2, got {chunk_len}")
    if batch_chunks < 1:
        raise ValueError(f"batch_chunks must be at least 1, got {batch_chunks}")
    n_layers = lm.arch.num_layers
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise ValueError(f"layer {bad[0]} is out of range (0..{n_layers - 1})")
    layers = sorted(set(layers))
    if not layers:
        raise ValueError("layers is empty")
    chunk_len = min(chunk_len, max_positions(lm))
    source: Corpus = DEFAULT_SOURCE if corpus is None else corpus
    if source == SAMPLED:
        source = sampled_corpus(lm, n_tokens, progress=progress)
    if not use_cache:
        return _accumulate(lm, layers, corpus, source, n_tokens, chunk_len, progress, batch_chunks)
    result = _cached_layers(lm, layers, source, n_tokens, chunk_len, report=False)
    missing = [layer for layer in layers if layer not in result]
    if not missing:
        return result
    with ExitStack() as locks:  # a concurrent process collecting them: wait, then reuse
        for layer in missing:  # in order, so that no two processes wait on each other
            key = _cache_key(lm, layer, source, chunk_len)
            root = cache_path(lm, layer, source, n_tokens, chunk_len).parent.parent
            locks.enter_context(cache_lock(f"stats-{_slug(lm.spec)}-L{layer}-{key}", root))
        result |= _cached_layers(lm, missing, source, n_tokens, chunk_len, report=True)
        missing = [layer for layer in layers if layer not in result]
        if missing:
            args = (lm, missing, corpus, source, n_tokens, chunk_len, progress, batch_chunks)
            result |= _accumulate(*args, save=True)
    return dict(sorted(result.items()))


def _cached_layers(
    lm: LoadedModel,
    layers: Sequence[int],
    source: Corpus,
    n_tokens: int,
    chunk_len: int,
    report: bool,
) -> dict[int, SecondMoment]:
    """The statistics of ``layers`` found (sound) in the cache."""
    found = {
        layer: _load_cached(lm, layer, source, n_tokens, chunk_len, report) for layer in layers
    }
    return {layer: stats for layer, stats in found.items() if stats is not None}


def _accumulate(
    lm: LoadedModel,
    missing: Sequence[int],
    corpus: Corpus | None,
    source: Corpus,
    n_tokens: int,
    chunk_len: int,
    progress: bool,
    batch_chunks: int,
    save: bool = False,
) -> dict[int, SecondMoment]:
    """One pass over ``source`` for the statistics of ``missing`` (cached when ``save``)."""
    corpus_id = corpus_identity(source)
    result: dict[int, SecondMoment] = {}
    start = time.perf_counter()
    width = lm.arch.mlp_hidden_size
    device = float64_device(lm.device)
    sums = {
        layer: torch.zeros(width, width, dtype=torch.float64, device=device) for layer in missing
    }
    sites = [Site("mlp_in", layer) for layer in missing]
    counted = 0
    bar = tqdm(total=n_tokens, desc=f"second moment L{missing}", unit="tok", disable=not progress)
    chunks = chunk_batches(token_chunks(lm, source, n_tokens, chunk_len), batch_chunks)
    with torch.no_grad():
        for ids, skip in chunks:
            with intervene(lm.arch, record=sites, stop_after=sites[-1]) as states:
                lm.model(input_ids=ids.to(lm.device))
            for site in sites:
                keys = states[site][:, skip:].reshape(-1, width).to(device, torch.float32)
                sums[site.layer].add_(keys.T @ keys)
            added = ids.shape[0] * (ids.shape[1] - skip)
            counted += added
            bar.update(added)
    bar.close()
    if counted == 0:
        raise ValueError(f"{describe(corpus)} produced no tokens")
    means = {layer: (sums.pop(layer) / counted).cpu() for layer in missing}
    seconds = time.perf_counter() - start
    log.info(
        "second moment of layers %s: %d tokens of %s in %.1f s",
        missing,
        counted,
        describe(corpus),
        seconds,
    )
    for layer in missing:
        stats = SecondMoment(
            layer, means[layer], counted, corpus_id, seconds, exhausted=counted < n_tokens
        )
        if stats.exhausted:
            _warn_short(stats, n_tokens, corpus)
        if save:
            stats.path = cache_path(lm, layer, source, counted, chunk_len)
            _save(stats.path, stats)
        result[layer] = stats
    return result


def as_matrix(stats: SecondMoment | torch.Tensor | None, width: int) -> torch.Tensor:
    """The float64 CPU matrix C of ``stats`` (None: the identity), checked to be width × width.

    ROME and MEMIT no longer use it (they take :func:`inverse`, and never build the identity).
    """
    if stats is None:
        return torch.eye(width, dtype=torch.float64)
    matrix = stats.matrix if isinstance(stats, SecondMoment) else stats
    _check_width(matrix, width)
    return matrix.to("cpu", torch.float64)


def _check_width(matrix: torch.Tensor, width: int | None) -> None:
    expected = width if width is not None else matrix.shape[0]
    if tuple(matrix.shape) != (expected, expected):
        raise ValueError(
            f"stats have shape {tuple(matrix.shape)}, expected ({expected}, {expected})"
        )


INVERSE_RESIDUAL = 1e-6
"""Largest ‖C (C⁻¹v) − v‖ / ‖v‖ (v a fixed random probe) of a usable inverse; a cached one
that misses it is rebuilt, a fresh one that misses it (C nearly singular) is used with a
warning."""
_DEVICE_INVERSES: dict[tuple[str, str, int], torch.Tensor] = {}
"""C⁻¹ already on a device: (inverse file, device, statistics file's mtime) -> float64 tensor,
one copy per process."""


def inverse_path(stats_path: Path) -> Path:
    """Where the inverse of the statistics cached in ``stats_path`` is cached."""
    return stats_path.with_name(stats_path.stem + ".inverse.pt")


def factorise(matrix: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """C⁻¹ of the symmetric positive definite ``matrix``, in float64 on ``device``.

    Cholesky (C = L Lᵀ, then C⁻¹ from L) in float64: d³/3 + d³ flops once, against a d × d solve
    per edit before. A C that is not numerically positive definite (too few tokens for its
    width, or dead units) falls back to an LU inverse with a warning, as the per-edit solve did;
    a singular one is an error.
    """
    c = matrix.to(float64_device(device), torch.float64)
    factor, info = torch.linalg.cholesky_ex(c)
    if int(info) == 0:
        inv = torch.cholesky_inverse(factor)
        del factor
    else:
        log.warning(
            "second moment (%d x %d) is not positive definite; inverting it by LU instead "
            "(statistics over more tokens than its width avoid this)",
            *c.shape,
        )
        inv, info = torch.linalg.inv_ex(c)
        if int(info) != 0:
            raise ValueError(
                f"the second moment ({c.shape[0]} x {c.shape[0]}) is singular: collect it over "
                "more tokens, or edit without statistics"
            )
    del c
    return (inv + inv.T).mul_(0.5)


def _probe(width: int) -> torch.Tensor:
    return torch.randn(width, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def inverse_residual(matrix: torch.Tensor, inv: torch.Tensor) -> float:
    """‖C (C⁻¹v) − v‖ / ‖v‖ for a fixed random v, on the CPU in float64: O(d²)."""
    v = _probe(matrix.shape[0])
    c = matrix.to("cpu", torch.float64)
    got = c @ (inv.to("cpu", torch.float64) @ v)
    return float((got - v).norm() / v.norm())


def _load_inverse(path: Path, stats: SecondMoment, report: bool = True) -> torch.Tensor | None:
    """The cached inverse of ``stats``, or None if missing, damaged or not its inverse (with
    ``report``, a warning names a damaged file)."""
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        problem = _matrix_problem(data, "inverse", stats.matrix.shape[0])
        if problem:
            raise ValueError(problem)
        inv = data["inverse"]
        built = float(data["residual"])
        if int(data["n_tokens"]) != stats.n_tokens or str(data["corpus_id"]) != stats.corpus_id:
            raise ValueError("it does not belong to these statistics")
        residual = inverse_residual(stats.matrix, inv)
        if not residual <= max(INVERSE_RESIDUAL, 2 * built):
            raise ValueError(f"C C⁻¹ v misses v by {residual:.2g}")
    except UNREADABLE as err:
        if report:
            log.warning("cached inverse %s is unusable (%s); computing it again", path, err)
        return None
    return inv


def inverse(
    stats: SecondMoment | torch.Tensor | None,
    device: torch.device | str = "cpu",
    width: int | None = None,
) -> torch.Tensor | None:
    """C⁻¹ of ``stats`` in float64 on ``device`` (float64's device: :func:`float64_device`);
    None for ``stats=None`` (identity statistics: callers use the key itself).

    For cached statistics (``stats.path``), C⁻¹ is computed once on ``device``
    (:func:`factorise`), written atomically beside the statistics file, read back with
    ``map_location="cpu"`` (after a check that it inverts these statistics) and moved to the
    device once per process: later calls, from any :func:`collect` result of the same file,
    return the same device tensor. Uncached statistics keep their device copies on the object;
    a bare tensor C is factorised on every call. ``width`` checks the shape.

    Why float64 on the device too: a float32 copy of C⁻¹ already misses the 1e-6 agreement with
    a direct solve on Gemma-3-270M's layer 1 (cond(C) = 1.8e4 over 100k python-docs tokens: C⁻¹k
    off by 1.3e-6 relative), and wider MLPs are worse conditioned. The price is memory (d² × 8
    bytes: 2.1 GB per GPT-J layer, held for the process; :func:`release_inverses` frees them),
    not time: ROME needs one matrix-vector product per edit, MEMIT one [n, d] × [d, d] product
    per layer.
    """
    if stats is None:
        return None
    if isinstance(stats, torch.Tensor):
        _check_width(stats, width)
        return factorise(stats, device)
    _check_width(stats.matrix, width)
    target = float64_device(device)
    if stats.path is None:
        if str(target) not in stats._inverses:
            stats._inverses[str(target)] = factorise(stats.matrix, target)
        return stats._inverses[str(target)]
    path = inverse_path(stats.path)
    # The statistics file's time stamp: statistics collected again into the same file (it was
    # damaged, say) get their own inverse.
    stamp = stats.path.stat().st_mtime_ns if stats.path.is_file() else 0
    key = (str(path), str(target), stamp)
    held = _DEVICE_INVERSES.get(key)
    if held is not None:
        return held
    inv = _load_inverse(path, stats, report=False)
    if inv is None:
        # a concurrent process computing it: wait, then reuse it
        with cache_lock(f"inverse-{path.stem}", path.parent.parent):
            inv = _load_inverse(path, stats)
            if inv is None:
                inv = _cached_inverse(stats, target, path)
    for stale in [k for k in _DEVICE_INVERSES if k[:2] == key[:2]]:
        del _DEVICE_INVERSES[stale]  # an inverse of statistics since collected again
    _DEVICE_INVERSES[key] = inv.to(target)
    return _DEVICE_INVERSES[key]


def _cached_inverse(stats: SecondMoment, target: torch.device, path: Path) -> torch.Tensor:
    """C⁻¹ of ``stats`` computed on ``target`` and written to ``path`` (with its residual and
    checksum); returned on ``target``."""
    start = time.perf_counter()
    inv = factorise(stats.matrix, target)
    on_cpu = inv.cpu()
    residual = inverse_residual(stats.matrix, on_cpu)
    if residual > INVERSE_RESIDUAL:
        log.warning(
            "second moment of layer %d is ill-conditioned: its inverse leaves a relative "
            "residual of %.2g",
            stats.layer,
            residual,
        )
    try:
        with atomic_path(path) as tmp:
            torch.save(
                {
                    "inverse": on_cpu,
                    "residual": residual,
                    "layer": stats.layer,
                    "n_tokens": stats.n_tokens,
                    "corpus_id": stats.corpus_id,
                    "sha256": tensor_digest(on_cpu),
                },
                tmp,
            )
    except OSError as err:  # a read-only or full cache costs time, not the edit
        log.warning("could not cache the inverse in %s: %s", path, err)
    log.info("inverse of layer %d statistics in %.1f s", stats.layer, time.perf_counter() - start)
    return inv


def release_inverses() -> None:
    """Drop the per-process device copies of C⁻¹ (e.g. to free GPU memory between models)."""
    _DEVICE_INVERSES.clear()
