"""CounterFact metrics (efficacy, paraphrase, neighborhood and their harmonic mean), used by every
method so that their numbers sit in one table; :func:`evaluate_cases` also scores zsRE cases, with
zsRE's own metrics (:mod:`remedi.metrics.zsre`), chosen by each case's ``benchmark``.

Rows are run under an edit context (see :mod:`remedi.metrics.rows`).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from torch import nn
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from remedi.data.cases import Benchmark, EditCase
from remedi.metrics.rows import EditContext, RowKind, ScoredRow, scored_chunks
from remedi.metrics.zsre import ZSRE_METRIC_NAMES, evaluate_zsre

__all__ = [
    "METRIC_NAMES",
    "PLUS_NAMES",
    "SCORE_NAMES",
    "EditContext",
    "RowKind",
    "ScoredRow",
    "Scoring",
    "case_metrics",
    "case_rows",
    "evaluate_cases",
    "harmonic_mean",
    "metric_names",
    "plus_prompt",
    "row_probabilities",
    "summarize",
]

Scoring = Literal["mean", "first"]
"""``mean``: P = exp(mean log-prob of all target tokens) (CounterFact); ``first``: the
probability of the target's first token that carries text (as REMEDI's reference evaluation
scores the first token; see :meth:`remedi.tokens.ContinuationBatch.first_target_ids`)."""
SCORE_NAMES = ("efficacy_score", "paraphrase_score", "neighborhood_score")
PLUS_NAMES = ("neighborhood_plus_score", "neighborhood_plus_magnitude")
"""CounterFact+ (Hoelscher-Obermaier et al. 2023): the neighbourhood prompts read after the edit's
statement (:func:`plus_prompt`), so an edit that lives in the input or keys on the subject's
mention runs on them too."""
METRIC_NAMES = (
    "efficacy_score",
    "efficacy_magnitude",
    "paraphrase_score",
    "paraphrase_magnitude",
    "neighborhood_score",
    "neighborhood_magnitude",
    "score",
)


def metric_names(benchmark: Benchmark) -> tuple[str, ...]:
    """The table columns of one benchmark's metrics."""
    return ZSRE_METRIC_NAMES if benchmark == "zsre" else METRIC_NAMES


def case_rows(case: EditCase, case_index: int = 0, plus: bool = False) -> list[ScoredRow]:
    """The rows that score one case: each prompt with target_new and with the true object
    (with ``plus``, also each neighbourhood prompt after the edit's statement, CounterFact+).

    The rewrite (and CounterFact+) rows locate the subject where the template's ``{}`` is."""
    assert case.target_new is not None, f"case {case.case_id} has no target_new to score"
    rows: list[ScoredRow] = []
    prompts: list[tuple[RowKind, str, str | None, str, int | None]] = [
        ("rewrite", case.rewrite_prompt, case.subject, case.target_true, case.subject_start),
        *(("paraphrase", p, case.subject, case.target_true, None) for p in case.paraphrase_prompts),
    ]
    truths = case.neighborhood_targets or [case.target_true] * len(case.neighborhood_prompts)
    prompts += [
        ("neighborhood", p, None, t, None)
        for p, t in zip(case.neighborhood_prompts, truths, strict=True)
    ]
    if plus:
        prompts += [
            ("neighborhood_plus", plus_prompt(case, p), case.subject, t, case.subject_start)
            for p, t in zip(case.neighborhood_prompts, truths, strict=True)
        ]
    for kind, prompt, subject, truth, start in prompts:
        for target in (case.target_new, truth):
            rows.append(ScoredRow(case_index, kind, prompt, subject, target, start))
    return rows


def plus_prompt(case: EditCase, prompt: str) -> str:
    """A neighbourhood ``prompt`` read after the edit's statement (CounterFact+): the statement,
    ``". "``, then the prompt; the subject sits where the statement's template puts it."""
    return f"{case.edit_statement}. {prompt}"


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
    probs = torch.zeros(len(rows))
    for indices, scores in scored_chunks(model, tokenizer, rows, edit, batch_size):
        prob = scores.mean_prob if scoring == "mean" else scores.first.exp()
        probs[indices] = prob.float().cpu()
    return probs


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
            ("neighborhood_plus", "neighborhood_plus"),
        ):
            pairs = kinds.get(kind)
            if not pairs:
                continue
            sign = -1.0 if kind.startswith("neighborhood") else 1.0
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
    """Mean of each metric over the cases that have it; for CounterFact cases also ``score`` =
    the harmonic mean of the three scores (zsRE tables have no such summary)."""
    summary: dict[str, float] = {}
    extra = [*PLUS_NAMES, "neighborhood_kl", "perplexity_ratio", "unrelated_entropy"]
    extra.append("locality_agreement")
    for name in (*METRIC_NAMES[:-1], *extra, *ZSRE_METRIC_NAMES):
        values = [m[name] for m in per_case if name in m]
        if values:
            summary[name] = sum(values) / len(values)
    if any(n in summary for n in ZSRE_METRIC_NAMES) and not any(n in summary for n in SCORE_NAMES):
        return summary
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
    plus: bool = False,
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Score ``cases`` under ``edit`` (None: the model as it is); return summary, per-case
    (with ``plus``, CounterFact cases also get the CounterFact+ neighbourhood, :data:`PLUS_NAMES`).

    Each case is scored by its benchmark's metrics: CounterFact's probability comparisons, or
    zsRE's token accuracies (:func:`remedi.metrics.zsre.evaluate_zsre`; ``scoring`` does not
    apply to them). The ``case_index`` of every row is the case's index in ``cases``.
    """
    per_case: list[dict[str, float]] = [{} for _ in cases]
    counterfact = [i for i, c in enumerate(cases) if c.benchmark != "zsre"]
    zsre = [i for i, c in enumerate(cases) if c.benchmark == "zsre"]
    if counterfact:
        rows = [row for i in counterfact for row in case_rows(cases[i], i, plus)]
        probs = row_probabilities(model, tokenizer, rows, edit, batch_size, scoring)
        for i, metrics in zip(counterfact, case_metrics(rows, probs), strict=True):
            per_case[i] = metrics
    if zsre:
        scored = evaluate_zsre(model, tokenizer, [cases[i] for i in zsre], zsre, edit, batch_size)
        for i, metrics in zip(zsre, scored, strict=True):
            per_case[i] = metrics
    return summarize(per_case), per_case
