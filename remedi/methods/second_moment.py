"""Second-moment statistics C = E[k kᵀ] of the MLP output projection's input, cached on disk.

ROME and MEMIT whiten their updates with C. It is collected over a text corpus (local text files,
one document per non-empty line, or a ``datasets`` source ``hf:NAME[:CONFIG[:SPLIT]]``), running
the model only up to the deepest wanted layer, accumulated in float64, and cached under
``cache_dir()/"stats"`` keyed by model, layer, corpus identity, token count and chunk length.

    stats = second_moment.collect(lm, layers=[4], corpus="/data/wiki.txt", n_tokens=100_000)
    C = stats[4].matrix                                # [mlp_hidden, mlp_hidden], float64
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from remedi.atomic import atomic_path
from remedi.hooks import Site, intervene
from remedi.models import LoadedModel, cache_dir

log = logging.getLogger(__name__)

DEFAULT_TOKENS = 100_000
DEFAULT_CHUNK = 256
Corpus = str | Path | Sequence[str | Path]


@dataclass
class SecondMoment:
    """``matrix`` = mean of k kᵀ over ``n_tokens`` keys of ``layer`` (float64)."""

    layer: int
    matrix: torch.Tensor
    n_tokens: int
    corpus_id: str
    seconds: float = 0.0
    from_cache: bool = False


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


def _is_hub(corpus: Corpus) -> bool:
    return isinstance(corpus, str) and corpus.startswith("hf:")


def corpus_identity(corpus: Corpus) -> str:
    """A short hash naming the corpus: each file's name and contents (so a copied or re-created
    corpus keeps its cached statistics), or the hub id."""
    digest = hashlib.sha256()
    if _is_hub(corpus):
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
            for line in handle:
                if line.strip():
                    yield line.strip()


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


def max_positions(lm: LoadedModel) -> int:
    """The longest sequence the model's position embeddings allow (large if unbounded)."""
    config = lm.model.config
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1 << 30


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[-60:] or "model"


def cache_path(
    lm: LoadedModel, layer: int, corpus: Corpus, n_tokens: int, chunk_len: int = DEFAULT_CHUNK
) -> Path:
    """Where the statistics of ``layer`` for this model, corpus and token count are cached."""
    key = f"{lm.spec}|{layer}|{corpus_identity(corpus)}|{n_tokens}|{chunk_len}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "stats" / f"{_slug(lm.spec)}-L{layer}-{n_tokens}-{digest}.pt"


def _save(path: Path, stats: SecondMoment) -> None:
    with atomic_path(path) as tmp:
        torch.save(
            {
                "layer": stats.layer,
                "matrix": stats.matrix,
                "n_tokens": stats.n_tokens,
                "corpus_id": stats.corpus_id,
                "seconds": stats.seconds,
            },
            tmp,
        )


def _load(path: Path) -> SecondMoment | None:
    if not path.is_file():
        return None
    data = torch.load(path, map_location="cpu", weights_only=True)
    return SecondMoment(
        layer=int(data["layer"]),
        matrix=data["matrix"],
        n_tokens=int(data["n_tokens"]),
        corpus_id=str(data["corpus_id"]),
        seconds=float(data.get("seconds", 0.0)),
        from_cache=True,
    )


def collect(
    lm: LoadedModel,
    layers: Sequence[int],
    corpus: Corpus,
    n_tokens: int = DEFAULT_TOKENS,
    chunk_len: int = DEFAULT_CHUNK,
    use_cache: bool = True,
    progress: bool = True,
) -> dict[int, SecondMoment]:
    """Second moments of the ``mlp_in`` keys of ``layers``, from cache or in one corpus pass."""
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    if chunk_len < 2:
        raise ValueError(f"chunk_len must be at least 2, got {chunk_len}")
    n_layers = lm.arch.num_layers
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise ValueError(f"layer {bad[0]} is out of range (0..{n_layers - 1})")
    layers = sorted(set(layers))
    if not layers:
        raise ValueError("layers is empty")
    chunk_len = min(chunk_len, max_positions(lm))
    corpus_id = corpus_identity(corpus)
    result: dict[int, SecondMoment] = {}
    paths = {layer: cache_path(lm, layer, corpus, n_tokens, chunk_len) for layer in layers}
    if use_cache:
        for layer, path in paths.items():
            cached = _load(path)
            if cached is not None:
                result[layer] = cached
    missing = [layer for layer in layers if layer not in result]
    if not missing:
        return result
    start = time.perf_counter()
    width = lm.arch.mlp_hidden_size
    sums = {layer: torch.zeros(width, width, dtype=torch.float64) for layer in missing}
    sites = [Site("mlp_in", layer) for layer in missing]
    counted = 0
    bar = tqdm(total=n_tokens, desc=f"second moment L{missing}", unit="tok", disable=not progress)
    with torch.no_grad():
        for ids, skip in token_chunks(lm, corpus, n_tokens, chunk_len):
            with intervene(lm.arch, record=sites, stop_after=sites[-1]) as states:
                lm.model(input_ids=ids.to(lm.device))
            for site in sites:
                # One chunk's sum in float32 (4x faster than float64 on CPU, exact to ~1e-6
                # over at most chunk_len tokens); the running sum over chunks stays float64.
                keys = states[site][0, skip:].float()
                sums[site.layer] += (keys.T @ keys).to("cpu", torch.float64)
            added = ids.shape[1] - skip
            counted += added
            bar.update(added)
    bar.close()
    if counted == 0:
        raise ValueError(f"corpus {corpus} produced no tokens")
    seconds = time.perf_counter() - start
    log.info("second moment of layers %s: %d tokens in %.1f s", missing, counted, seconds)
    for layer in missing:
        stats = SecondMoment(layer, sums[layer] / counted, counted, corpus_id, seconds)
        if use_cache:
            _save(paths[layer], stats)
        result[layer] = stats
    return result


def as_matrix(stats: SecondMoment | torch.Tensor | None, width: int) -> torch.Tensor:
    """The float64 CPU matrix C of ``stats`` (None: the identity), checked to be width × width."""
    if stats is None:
        return torch.eye(width, dtype=torch.float64)
    matrix = stats.matrix if isinstance(stats, SecondMoment) else stats
    if matrix.shape != (width, width):
        raise ValueError(f"stats have shape {tuple(matrix.shape)}, expected ({width}, {width})")
    return matrix.to("cpu", torch.float64)
