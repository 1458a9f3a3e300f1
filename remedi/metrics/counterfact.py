"""CounterFact metrics (efficacy, paraphrase, neighborhood and their harmonic mean), used by every
method so that their numbers sit in one table.

A method is scored through an *edit context*: a callable that takes the
:class:`~remedi.tokens.ContinuationBatch` about to be run (with the :class:`ScoredRow` each row
belongs to) and returns a context manager under which the LM behaves as edited. Weight editors
(ROME, MEMIT, FT, KN) apply their edit once around the whole call and pass ``edit=None``;
activation editors (REMEDI) return hooks that depend on the rows' token positions.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from remedi.data.cases import EditCase
from remedi.tokens import ContinuationBatch, encode_continuations, score_continuations

RowKind = Literal["rewrite", "paraphrase", "neighborhood"]
Scoring = Literal["mean", "first"]
"""``mean``: P = exp(mean log-prob of all target tokens) (CounterFact); ``first``: the first
target token's probability (as REMEDI's reference evaluation does)."""
SCORE_NAMES = ("efficacy_score", "paraphrase_score", "neighborhood_score")
METRIC_NAMES = (
    "efficacy_score",
    "efficacy_magnitude",
    "paraphrase_score",
    "paraphrase_magnitude",
    "neighborhood_score",
    "neighborhood_magnitude",
    "score",
)


@dataclass(frozen=True)
class ScoredRow:
    """One prompt to score: which case and kind it belongs to, and its subject if it has one."""

    case_index: int
    kind: RowKind
    prompt: str
    subject: str | None
    target: str


EditContext = Callable[[ContinuationBatch, Sequence[ScoredRow]], AbstractContextManager[object]]


def case_rows(case: EditCase, case_index: int = 0) -> list[ScoredRow]:
    """The rows that score one case: each prompt with target_new and with the true object."""
    assert case.target_new is not None, f"case {case.case_id} has no target_new to score"
    rows: list[ScoredRow] = []
    prompts: list[tuple[RowKind, str, str | None, str]] = [
        ("rewrite", case.rewrite_prompt, case.subject, case.target_true),
        *(("paraphrase", p, case.subject, case.target_true) for p in case.paraphrase_prompts),
    ]
    truths = case.neighborhood_targets or [case.target_true] * len(case.neighborhood_prompts)
    prompts += [
        ("neighborhood", p, None, t) for p, t in zip(case.neighborhood_prompts, truths, strict=True)
    ]
    for kind, prompt, subject, truth in prompts:
        for target in (case.target_new, truth):
            rows.append(ScoredRow(case_index, kind, prompt, subject, target))
    return rows


def row_probabilities(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[ScoredRow],
    edit: EditContext | None = None,
    batch_size: int = 32,
    scoring: Scoring = "mean",
) -> torch.Tensor:
    """Probability of each row's target after its prompt (see :data:`Scoring`)."""
    if scoring not in ("mean", "first"):
        raise ValueError(f"scoring {scoring!r} must be 'mean' or 'first'")
    probs: list[torch.Tensor] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        subjects = [r.subject for r in chunk]
        batch = encode_continuations(
            tokenizer,
            [r.prompt for r in chunk],
            [r.target for r in chunk],
            subjects=None if None in subjects else subjects,  # type: ignore[arg-type]
        )
        context = nullcontext() if edit is None else edit(batch, chunk)
        with torch.no_grad(), context:
            scores = score_continuations(model, batch)
            prob = scores.mean_prob if scoring == "mean" else scores.first.exp()
            probs.append(prob.float().cpu())
    return torch.cat(probs) if probs else torch.zeros(0)


def case_metrics(rows: Sequence[ScoredRow], probs: torch.Tensor) -> list[dict[str, float]]:
    """Per-case scores and magnitudes from rows laid out by :func:`case_rows` (pairs new, true)."""
    by_case: dict[int, dict[str, list[tuple[float, float]]]] = {}
    for i in range(0, len(rows), 2):
        row = rows[i]
        p_new, p_true = float(probs[i]), float(probs[i + 1])
        by_case.setdefault(row.case_index, {}).setdefault(row.kind, []).append((p_new, p_true))
    out = []
    for case_index in sorted(by_case):
        kinds = by_case[case_index]
        metrics: dict[str, float] = {}
        for kind, name in (
            ("rewrite", "efficacy"),
            ("paraphrase", "paraphrase"),
            ("neighborhood", "neighborhood"),
        ):
            pairs = kinds.get(kind)
            if not pairs:
                continue
            sign = -1.0 if kind == "neighborhood" else 1.0
            diffs = [sign * (new - true) for new, true in pairs]
            metrics[f"{name}_score"] = sum(d > 0 for d in diffs) / len(diffs)
            metrics[f"{name}_magnitude"] = sum(diffs) / len(diffs)
        out.append(metrics)
    return out


def harmonic_mean(values: Iterable[float]) -> float:
    values = list(values)
    if not values or any(v <= 0 for v in values):
        return 0.0
    return statistics.harmonic_mean(values)


def summarize(per_case: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over cases, plus ``score`` = harmonic mean of the three scores."""
    summary: dict[str, float] = {}
    for name in METRIC_NAMES[:-1]:
        values = [m[name] for m in per_case if name in m]
        if values:
            summary[name] = sum(values) / len(values)
    present = [summary[n] for n in SCORE_NAMES if n in summary]
    summary["score"] = harmonic_mean(present) if len(present) == len(SCORE_NAMES) else 0.0
    return summary


def evaluate_cases(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    cases: Sequence[EditCase],
    edit: EditContext | None = None,
    batch_size: int = 32,
    scoring: Scoring = "mean",
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Score ``cases`` under ``edit`` (None: the model as it is); return summary, per-case."""
    rows = [row for i, case in enumerate(cases) for row in case_rows(case, i)]
    probs = row_probabilities(model, tokenizer, rows, edit, batch_size, scoring)
    per_case = case_metrics(rows, probs)
    return summarize(per_case), per_case
