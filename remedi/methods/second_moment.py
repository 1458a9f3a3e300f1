"""Second-moment statistics C = E[k kᵀ] of the MLP output projection's input, cached on disk.

ROME and MEMIT whiten their updates with C. It is collected over a text corpus: local text files
(one document per non-empty line; ``.jsonl`` files: one ``{"text": ...}`` object per line), a
``datasets`` source ``hf:NAME[:CONFIG[:SPLIT]]``, or a named source that needs nothing from the
user: ``python-docs``, the default (``corpus=None``), the Python documentation every Python ships
(:func:`python_docs`), or ``sampled``, text sampled from the model itself (:func:`sampled_corpus`,
generated once and cached; minutes on a CPU, seconds on a GPU). The model runs only up to the
deepest wanted layer; sums are accumulated in float64 and cached under ``cache_dir()/"stats"``
keyed by model, layer, corpus identity, token count and chunk length. A corpus that runs out
before the tokens asked for gives statistics of the tokens it holds, with a warning naming both
numbers, cached under that number.

    stats = second_moment.collect(lm, layers=[4], corpus="/data/wiki.txt", n_tokens=100_000)
    C = stats[4].matrix                                # [mlp_hidden, mlp_hidden], float64
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from remedi.atomic import atomic_path, write_text
from remedi.hooks import Site, intervene
from remedi.models import LoadedModel, cache_dir

log = logging.getLogger(__name__)

DEFAULT_TOKENS = 100_000
DEFAULT_CHUNK = 256
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
    """``matrix`` = mean of k kᵀ over ``n_tokens`` keys of ``layer`` (float64)."""

    layer: int
    matrix: torch.Tensor
    n_tokens: int
    corpus_id: str
    seconds: float = 0.0
    from_cache: bool = False
    exhausted: bool = False
    """The corpus ran out before the tokens asked for; ``n_tokens`` is all it holds."""


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
    return path


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


def _cache_key(lm: LoadedModel, layer: int, corpus: Corpus, chunk_len: int) -> str:
    key = f"{lm.spec}|{layer}|{corpus_identity(corpus)}|{chunk_len}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def cache_path(
    lm: LoadedModel, layer: int, corpus: Corpus, n_tokens: int, chunk_len: int = DEFAULT_CHUNK
) -> Path:
    """Where the statistics of ``layer`` over ``n_tokens`` tokens of ``corpus`` are cached."""
    digest = _cache_key(lm, layer, corpus, chunk_len)
    return cache_dir() / "stats" / f"{_slug(lm.spec)}-L{layer}-{digest}-{n_tokens}.pt"


def _save(path: Path, stats: SecondMoment) -> None:
    with atomic_path(path) as tmp:
        torch.save(
            {
                "layer": stats.layer,
                "matrix": stats.matrix,
                "n_tokens": stats.n_tokens,
                "corpus_id": stats.corpus_id,
                "seconds": stats.seconds,
                "exhausted": stats.exhausted,
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
        exhausted=bool(data.get("exhausted", False)),
    )


def _load_cached(
    lm: LoadedModel, layer: int, corpus: Corpus, n_tokens: int, chunk_len: int
) -> SecondMoment | None:
    """The cached statistics for ``n_tokens``, or those of the whole corpus when it is known to
    hold fewer tokens than that."""
    exact = _load(cache_path(lm, layer, corpus, n_tokens, chunk_len))
    if exact is not None:
        return exact
    digest = _cache_key(lm, layer, corpus, chunk_len)
    for path in cache_path(lm, layer, corpus, 1, chunk_len).parent.glob(f"*-{digest}-*.pt"):
        held = int(path.stem.rsplit("-", 1)[-1]) if path.stem.rsplit("-", 1)[-1].isdigit() else 0
        if held < n_tokens:
            stats = _load(path)
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


def collect(
    lm: LoadedModel,
    layers: Sequence[int],
    corpus: Corpus | None = None,
    n_tokens: int = DEFAULT_TOKENS,
    chunk_len: int = DEFAULT_CHUNK,
    use_cache: bool = True,
    progress: bool = True,
) -> dict[int, SecondMoment]:
    """Second moments of the ``mlp_in`` keys of ``layers``, from cache or in one corpus pass.

    ``corpus`` None: :data:`DEFAULT_SOURCE`; ``"sampled"``: text sampled from ``lm``
    (:func:`sampled_corpus`, built once).
    """
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
    source: Corpus = DEFAULT_SOURCE if corpus is None else corpus
    if source == SAMPLED:
        source = sampled_corpus(lm, n_tokens, progress=progress)
    corpus_id = corpus_identity(source)
    result: dict[int, SecondMoment] = {}
    if use_cache:
        for layer in layers:
            cached = _load_cached(lm, layer, source, n_tokens, chunk_len)
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
        for ids, skip in token_chunks(lm, source, n_tokens, chunk_len):
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
        raise ValueError(f"{describe(corpus)} produced no tokens")
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
            layer, sums[layer] / counted, counted, corpus_id, seconds, exhausted=counted < n_tokens
        )
        if stats.exhausted:
            _warn_short(stats, n_tokens, corpus)
        if use_cache:
            _save(cache_path(lm, layer, source, counted, chunk_len), stats)
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
