"""The protocol an evaluation row was measured under, and the check that keeps rows measured
differently out of one table.

A protocol is the metric family (CounterFact or zsRE), the scoring of targets, the generation
settings, the statistics source of ROME and MEMIT (None for methods that use none), the edit
schedule (each case on its own edit, or edits accumulating, and when they are scored), the
model's dtype and the model. Each ``remedi.evaluate`` row carries these as flat fields, and the
Markdown table states them in a line under it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from remedi.methods.second_moment import DEFAULT_SOURCE

FIELDS = ("metric_family", "scoring", "generation", "statistics", "schedule", "dtype", "model")
"""The row fields that make up a protocol (``statistics`` is None where a method uses none)."""
FAMILIES = {
    "counterfact": "CounterFact probability comparisons",
    "zsre": "zsRE token accuracies",
    "probe": "REMEDI probe (Fact-Med / Fact-Prior) classification",
    "mcrae": "McRae entailment correlations",
    "biosbias": "Bias in Bios occupation accuracy and generation",
}
"""Metric families in words: the editing tables' and REMEDI's own evaluations' (``--task``)."""
UNRECORDED = "unrecorded"
"""Stands for a field missing from a row written before rows carried their protocol."""


def scoring_setting(family: str) -> str:
    """How targets are scored: CounterFact compares the mean-token probabilities of the new and
    true targets (:data:`remedi.metrics.counterfact.Scoring` ``mean``); zsRE counts top-1
    tokens."""
    return "top-1" if family == "zsre" else "mean"


def generation_setting(enabled: bool, tokens: int, length: str) -> str:
    """``off``, ``N tokens in all`` (prompt included, ROME's protocol) or ``N new tokens``."""
    if not enabled:
        return "off"
    return f"{tokens} new tokens" if length == "new" else f"{tokens} tokens in all"


def statistics_setting(no_stats: bool, corpus: str | None, n_tokens: int) -> str:
    """The second-moment source of ROME and MEMIT: ``identity (--no-stats)`` or
    ``CORPUS (N tokens)``."""
    if no_stats:
        return "identity (--no-stats)"
    return f"{corpus or DEFAULT_SOURCE} ({n_tokens:,} tokens)"


def schedule_setting(schedule: str, score_at: Sequence[int] | None) -> str:
    """``independent`` (each case scored on its own edit, the model restored after it), or an
    accumulating schedule with when its cases are scored: ``sequential, scored on the final
    model`` (and ``after 10, 100 edits``)."""
    if schedule == "independent":
        return schedule
    text = f"{schedule}, scored on the final model"
    if score_at:
        text += f" and after {', '.join(str(n) for n in score_at)} edits"
    return text


def protocol_of(row: Mapping[str, Any]) -> dict[str, Any]:
    """The protocol fields of one row (:data:`UNRECORDED` for those it lacks)."""
    return {name: row.get(name, UNRECORDED) for name in FIELDS}


def conflicts(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Each protocol field on which ``rows`` differ, with its distinct values in row order.

    ``statistics`` is compared among the rows that use statistics only."""
    found: dict[str, list[Any]] = {}
    for name in FIELDS:
        values: list[Any] = []
        for row in rows:
            value = row.get(name, UNRECORDED)
            if value is not None and value not in values:
                values.append(value)
        if len(values) > 1:
            found[name] = values
    return found


def describe(fields: Mapping[str, Any]) -> str:
    """One protocol in words, e.g. ``CounterFact probability comparisons, scoring mean, no
    generation, statistics python-docs (100,000 tokens), float32, gemma3-270m``."""
    family = fields.get("metric_family", UNRECORDED)
    parts = [FAMILIES.get(family, f"metric family {family}")]
    parts.append(f"scoring {fields.get('scoring', UNRECORDED)}")
    generation = fields.get("generation", UNRECORDED)
    parts.append("no generation" if generation == "off" else f"generation {generation}")
    if fields.get("statistics") is not None:
        parts.append(f"statistics {fields['statistics']}")
    schedule = fields.get("schedule", UNRECORDED)
    if schedule != UNRECORDED:
        parts.append(f"edits {schedule}")
    parts += [str(fields.get("dtype", UNRECORDED)), str(fields.get("model", UNRECORDED))]
    return ", ".join(parts)


def table_line(rows: Sequence[Mapping[str, Any]]) -> str:
    """The line under a table: ``Protocol: ...`` when its rows share one (statistics from the
    rows that use any), else a pointer to the per-row ``protocol`` column."""
    if conflicts(rows):
        return "Protocol: mixed (--mixed-protocols); each row's is in its protocol column"
    merged = dict(protocol_of(rows[0]))
    merged["statistics"] = next((r["statistics"] for r in rows if r.get("statistics")), None)
    return f"Protocol: {describe(merged)}"


def mismatch(existing: Sequence[Mapping[str, Any]], new: Sequence[Mapping[str, Any]]) -> str | None:
    """Why ``new`` rows may not join ``existing`` ones in one table (None: they may), naming
    the first differing field with its value there and here."""
    found = conflicts([*existing, *new])
    if not found:
        return None
    name, values = next(iter(found.items()))
    there = [v for v in dict.fromkeys(r.get(name, UNRECORDED) for r in existing) if v is not None]
    here = [v for v in dict.fromkeys(r.get(name, UNRECORDED) for r in new) if v not in there]
    here = [v for v in here if v is not None]
    if there and here:
        return f"{name} is {' / '.join(map(str, there))} there but {here[0]} here"
    return f"its rows differ in {name} ({', '.join(map(str, values))})"
