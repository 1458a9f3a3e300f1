"""Metrics shared by every method: the CounterFact scores."""

from remedi.metrics.counterfact import (
    METRIC_NAMES,
    EditContext,
    ScoredRow,
    case_metrics,
    case_rows,
    evaluate_cases,
    harmonic_mean,
    row_probabilities,
    summarize,
)

__all__ = [
    "METRIC_NAMES",
    "EditContext",
    "ScoredRow",
    "case_metrics",
    "case_rows",
    "evaluate_cases",
    "harmonic_mean",
    "row_probabilities",
    "summarize",
]
