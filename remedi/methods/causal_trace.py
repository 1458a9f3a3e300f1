"""Causal tracing (Meng et al. 2022): which hidden states carry a factual prediction.

The subject's token embeddings are corrupted with Gaussian noise; restoring one clean state
(a block output, or an MLP / attention output over a window of layers) at one (token, layer)
shows how much of the clean prediction that state alone brings back.

Speed: many restorations share one forward pass. Each batch row is one (restoration, noise
sample) pair; every row's clean values come from a single recorded clean run; the same seeded
noise samples are reused for every restoration. Restorations at one token share a key/value
cache of the corrupted run of the earlier tokens (which no restoration at that token can
change), so only the tokens from the restored one on are run; and only the last position's
logits are computed (the full-vocabulary product at every position is most of a naive forward's
cost). Restorations at tokens before the subject are no-ops (nothing upstream is corrupted) and
are filled with the corrupted probability instead of being run.

Noise. By default every trace uses one fixed noise level per model: 3 x the standard deviation
of the token embeddings of the built-in facts' subjects (:func:`default_noise_std`), as ROME
uses 3 x the standard deviation over the subjects of a dataset rather than of the traced prompt's
own subject (which would change the noise level from prompt to prompt). ``noise_scale`` changes
the multiple and ``noise_std`` sets an absolute level.

    result = trace(lm, "Toyota is headquartered in the country of", "Toyota")
    result.scores["mlp"]          # [tokens, layers] probability with that state restored
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from remedi.hooks import EMBEDDINGS, EditFn, Site, SiteKind, intervene, replace_at
from remedi.models import LoadedModel
from remedi.tokens import (
    TokenSpan,
    encode_continuations,
    encode_prompts,
    next_token_logits,
    prefix_cache,
    repeat_cache,
)

NOISE_SCALE = 3.0
"""The default noise level as a multiple of :func:`subjects_embedding_std` (ROME's 3)."""

TraceKind = Literal["hidden", "mlp", "attn"]
KINDS: tuple[TraceKind, ...] = ("hidden", "mlp", "attn")
SITE_OF_KIND: dict[str, SiteKind] = {"hidden": "block", "mlp": "mlp", "attn": "attn"}


@dataclass
class TraceResult:
    """Scores of one trace; ``scores[kind][token, layer]`` = P(target) with that state restored."""

    tokens: list[str]
    subject_range: tuple[int, int]
    target: str
    target_id: int
    clean_prob: float
    corrupted_prob: float
    scores: dict[str, torch.Tensor]
    noise_std: float
    samples: int
    window: int
    extra: dict[str, Any] = field(default_factory=dict)

    def indirect_effect(self, kind: str) -> torch.Tensor:
        """Restored minus corrupted probability, ``[tokens, layers]``."""
        return self.scores[kind] - self.corrupted_prob

    def peak(self, kind: str) -> tuple[int, int]:
        """(token, layer) of the largest restored probability for ``kind``."""
        scores = torch.nan_to_num(self.scores[kind], nan=float("-inf"))
        flat = int(torch.argmax(scores))
        return flat // scores.shape[1], flat % scores.shape[1]

    def to_json(self) -> dict[str, Any]:
        """Plain numbers and lists, ready for ``json.dump``."""
        return {
            "tokens": self.tokens,
            "subject_range": list(self.subject_range),
            "target": self.target,
            "target_id": self.target_id,
            "clean_prob": self.clean_prob,
            "corrupted_prob": self.corrupted_prob,
            "scores": {k: v.tolist() for k, v in self.scores.items()},
            "noise_std": self.noise_std,
            "samples": self.samples,
            "window": self.window,
        }


def embedding_std(lm: LoadedModel, subjects: Sequence[str]) -> float:
    """Standard deviation (one scalar) of the embedding outputs of the subjects' tokens."""
    ids = [i for s in subjects for i in lm.tokenizer(s, add_special_tokens=False)["input_ids"]]
    if not ids:
        raise ValueError(f"subjects {list(subjects)!r} produced no tokens")
    with torch.no_grad():
        emb = lm.arch.embed(torch.tensor([ids], device=lm.device))
    return float(emb.float().std())


_SUBJECT_STD: weakref.WeakKeyDictionary[nn.Module, float] = weakref.WeakKeyDictionary()


def subjects_embedding_std(lm: LoadedModel) -> float:
    """:func:`embedding_std` over the subjects of all built-in facts (each subject once), computed
    once per model and kept in memory for as long as the model lives (it is one embedding lookup
    of a few hundred tokens, so there is nothing worth keeping on disk)."""
    if lm.model not in _SUBJECT_STD:
        from remedi.data import load_builtin

        subjects = sorted({case.subject for case in load_builtin()})
        _SUBJECT_STD[lm.model] = embedding_std(lm, subjects)
    return _SUBJECT_STD[lm.model]


def default_noise_std(lm: LoadedModel, scale: float = NOISE_SCALE) -> float:
    """The noise level every trace uses unless told otherwise: ``scale`` (3) x the standard
    deviation of the embeddings of the built-in facts' subjects. Fixed per model, so the same
    prompt-independent level serves ``remedi.locate trace``, the CausalTraceCallback and the
    benchmarks alike."""
    return scale * subjects_embedding_std(lm)


def make_noise(
    samples: int, span: TokenSpan, width: int, std: float, seed: int = 0
) -> torch.Tensor:
    """Seeded Gaussian noise ``[samples, subject tokens, width]``, standard deviation ``std``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(samples, span.end - span.start, width, generator=gen) * std


def corrupt_subject(span: TokenSpan, noise: torch.Tensor, offset: int = 0) -> EditFn:
    """Edit for :data:`~remedi.hooks.EMBEDDINGS` adding noise to the subject tokens of every row.

    Rows are sample-major: with ``R`` rows and ``S = len(noise)`` samples, row ``r`` gets sample
    ``r // (R // S)``. ``offset`` is the absolute position of the input's first token (when
    earlier tokens come from a cache).
    """

    def fn(output: torch.Tensor) -> torch.Tensor:
        rows, width = output.shape[0], output.shape[1]
        if rows % noise.shape[0]:
            raise ValueError(f"{rows} rows are not a multiple of {noise.shape[0]} noise samples")
        start, end = max(span.start - offset, 0), min(span.end - offset, width)
        if start >= end:
            return output
        sample = torch.arange(rows, device=output.device) // (rows // noise.shape[0])
        picked = noise.to(output)[sample][
            :, start + offset - span.start : end + offset - span.start
        ]
        delta = torch.zeros_like(output)
        delta[:, start:end] = picked
        return output + delta

    return fn


def window_layers(kind: str, layer: int, num_layers: int, window: int) -> range:
    """Layers restored for a ``kind`` restoration centred on ``layer``."""
    if kind == "hidden":
        return range(layer, layer + 1)
    return range(max(0, layer - window // 2), min(num_layers, layer - (-window // 2)))


def _restore_chunk(
    lm: LoadedModel,
    input_ids: torch.Tensor,
    span: TokenSpan,
    noise: torch.Tensor,
    clean: dict[Site, torch.Tensor],
    token: int,
    jobs: Sequence[tuple[str, int]],
    target_id: int,
    window: int,
    cache: Any,
) -> torch.Tensor:
    """Mean P(target) over noise samples for each (kind, layer) restoration at ``token``.

    With ``cache`` (the corrupted run of the tokens before ``token``, one row per sample), only
    the tokens from ``token`` on are run: nothing before it depends on the restoration.
    """
    samples, n_jobs = noise.shape[0], len(jobs)
    offset = token if cache is not None else 0
    positions: dict[Site, list[list[int]]] = {}
    for j, (kind, layer) in enumerate(jobs):
        for site_layer in window_layers(kind, layer, lm.arch.num_layers, window):
            site = Site(SITE_OF_KIND[kind], site_layer)
            rows = positions.setdefault(site, [[] for _ in range(samples * n_jobs)])
            for s in range(samples):
                rows[s * n_jobs + j].append(token - offset)
    edits = {}
    for site, rows in positions.items():
        n_index = sum(len(row) for row in rows)
        edits[site] = replace_at(rows, clean[site][0, token].expand(n_index, -1))
    ids = input_ids[:, offset:].expand(samples * n_jobs, -1)
    own = repeat_cache(cache, n_jobs) if cache is not None else None
    edits[EMBEDDINGS] = corrupt_subject(span, noise, offset)
    with intervene(lm.arch, edit=edits):
        logits = next_token_logits(lm.model, ids, cache=own)
    probs = torch.softmax(logits.float(), dim=-1)[:, target_id]
    return probs.view(samples, n_jobs).mean(0).cpu()


def _even_chunks(items: Sequence[Any], most: int) -> list[Sequence[Any]]:
    """Split ``items`` into the fewest chunks of at most ``most`` items, of near-equal size."""
    n = -(-len(items) // most)
    size = -(-len(items) // n) if n else 0
    return [items[i : i + size] for i in range(0, len(items), size)] if size else []


def trace(
    lm: LoadedModel,
    prompt: str,
    subject: str,
    target: str | None = None,
    *,
    subject_start: int | None = None,
    kinds: Sequence[str] = KINDS,
    samples: int = 10,
    noise_scale: float = NOISE_SCALE,
    noise_std: float | None = None,
    window: int = 10,
    batch_size: int = 160,
    seed: int = 0,
    layers: Sequence[int] | None = None,
    tokens: Sequence[int] | None = None,
    progress: bool = False,
) -> TraceResult:
    """Causal trace of ``prompt``'s next-token prediction with ``subject`` corrupted.

    Args:
        target: trace the probability of this answer's first token that carries its text
            (:meth:`remedi.tokens.ContinuationBatch.first_target_ids`) instead of the clean
            run's top-1 token. When ``" " + target`` starts with bare tokens (Gemma's ``'▁'``
            before a digit) they are appended to the traced input, so the traced position is the
            one that predicts the answer's text.
        subject_start: the subject's character offset in ``prompt`` (where a template's ``{}``
            was, see :func:`remedi.tokens.fill_template`); None: its first occurrence.
        kinds: any of ``hidden`` (block output), ``mlp`` and ``attn`` (restored over ``window``
            layers centred on each layer).
        samples: noise samples per restoration; the quantity is the mean probability over them.
        noise_std: absolute noise standard deviation; by default ``noise_scale`` times the
            standard deviation of the built-in facts' subject embeddings
            (:func:`default_noise_std`), the same for every prompt.
        batch_size: batch rows per forward pass (rounded down to a multiple of ``samples``).
        seed: seeds the noise, shared by every restoration.
        layers, tokens: restore only these (default: all); other cells of ``scores`` are NaN,
            except tokens before the subject, whose restoration changes nothing: they hold the
            corrupted probability.
    """
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    if target is not None and not target.strip():
        raise ValueError("target is empty")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    arch = lm.arch
    starts = [subject_start]
    if target is None:
        encoded = encode_prompts(lm.tokenizer, [prompt], [subject], subject_starts=starts)
        input_ids, span, answer_id = encoded.input_ids, encoded.subject_spans[0], None
    else:
        cont = encode_continuations(lm.tokenizer, [prompt], [target], [subject], starts)
        end = int(cont.first_target_positions()[0]) + 1
        input_ids, answer_id = cont.input_ids[:, :end], int(cont.first_target_ids()[0])
        assert cont.subject_spans is not None
        span = cont.subject_spans[0]
    input_ids = input_ids.to(lm.device)
    n_tokens, n_layers = input_ids.shape[1], arch.num_layers
    std = noise_std if noise_std is not None else default_noise_std(lm, noise_scale)
    noise = make_noise(samples, span, arch.hidden_size, std, seed).to(lm.device, lm.dtype)

    sites = [Site(SITE_OF_KIND[k], layer) for k in kinds for layer in range(n_layers)]
    with torch.no_grad():
        with intervene(arch, record=sites) as clean:
            clean_logits = next_token_logits(lm.model, input_ids)
        clean_probs = torch.softmax(clean_logits.float(), dim=-1)[0]
        target_id = int(clean_probs.argmax()) if answer_id is None else answer_id
        with intervene(arch, edit={EMBEDDINGS: corrupt_subject(span, noise)}):
            corrupted_logits = next_token_logits(lm.model, input_ids.expand(samples, -1))
        corrupted_prob = float(torch.softmax(corrupted_logits.float(), dim=-1)[:, target_id].mean())

        chosen_layers = range(n_layers) if layers is None else [arch.check_layer(x) for x in layers]
        chosen_tokens = (
            range(n_tokens) if tokens is None else sorted({t % n_tokens for t in tokens})
        )
        jobs = [(kind, layer) for kind in kinds for layer in chosen_layers]
        scores = {k: torch.full((n_tokens, n_layers), float("nan")) for k in kinds}
        for kind in kinds:
            scores[kind][: span.start] = corrupted_prob
        per_chunk = max(1, batch_size // samples)
        work = [
            (token, chunk)
            for token in chosen_tokens
            if token >= span.start
            for chunk in _even_chunks(jobs, per_chunk)
        ]
        caches: dict[int, Any] = {}
        for token, chunk in tqdm(work, desc="causal trace", disable=not progress):
            if token > 0 and token not in caches:
                caches = {}
                with intervene(arch, edit={EMBEDDINGS: corrupt_subject(span, noise)}):
                    caches[token] = prefix_cache(lm.model, input_ids[:, :token].expand(samples, -1))
            probs = _restore_chunk(
                lm,
                input_ids,
                span,
                noise,
                clean,
                token,
                chunk,
                target_id,
                window,
                caches.get(token),
            )
            for (kind, layer), p in zip(chunk, probs.tolist(), strict=True):
                scores[kind][token, layer] = p

    tok = lm.tokenizer
    return TraceResult(
        tokens=[str(tok.decode([i])) for i in input_ids[0].tolist()],
        subject_range=(span.start, span.end),
        target=str(tok.decode([target_id])),
        target_id=target_id,
        clean_prob=float(clean_probs[target_id]),
        corrupted_prob=corrupted_prob,
        scores=scores,
        noise_std=std,
        samples=samples,
        window=window,
    )
