"""Metrics shared by every method: the CounterFact scores and generation metrics."""

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
from remedi.metrics.generation import (
    GENERATION_METRIC_NAMES,
    GenerationEdit,
    case_samples,
    fit_idf,
    generate_samples,
    generation_metrics,
    ngram_entropy,
    reference_texts,
    summarize_generation,
    text_entropy,
    tfidf_cosine,
)

__all__ = [
    "GENERATION_METRIC_NAMES",
    "METRIC_NAMES",
    "EditContext",
    "GenerationEdit",
    "ScoredRow",
    "case_metrics",
    "case_rows",
    "case_samples",
    "evaluate_cases",
    "fit_idf",
    "generate_samples",
    "generation_metrics",
    "harmonic_mean",
    "ngram_entropy",
    "reference_texts",
    "row_probabilities",
    "summarize",
    "summarize_generation",
    "text_entropy",
    "tfidf_cosine",
]
