"""Summary rows of an evaluation: one row per method with its mean metrics, timing and the
protocol it was measured under (:mod:`remedi.protocol`), and the lines that say which edits took.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from remedi import protocol
from remedi.data import EditCase
from remedi.evaluation.runner import MethodResult
from remedi.metrics import METRIC_NAMES, case_rows, row_probabilities
from remedi.models import LoadedModel


def summary_row(
    result: MethodResult,
    model: str,
    n_cases: int,
    summary: dict[str, float],
    names: Sequence[str] = METRIC_NAMES,
    fields: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One table row: the method, its metrics ``names`` (the benchmark's columns), timing and,
    when given, its protocol ``fields`` (see :func:`protocol_fields`)."""
    seconds = result.edit_seconds
    return {
        "method": result.method,
        "model": model,
        "n_cases": n_cases,
        **{name: summary.get(name) for name in names},
        "seconds_per_edit": statistics.median(seconds) if seconds else 0.0,
        "seconds_per_edit_mean": statistics.fmean(seconds) if seconds else 0.0,
        **(fields or {}),
    }


def protocol_fields(
    family: str,
    uses_statistics: bool,
    statistics_source: tuple[bool, str | None, int],
    generation: tuple[bool, int, str],
    dtype: str,
    model: str,
    schedule: str = "independent",
) -> dict[str, Any]:
    """The protocol of one row: metric family and scoring, generation settings, the statistics
    source (``(disabled, corpus, tokens)``, named only for methods that read statistics), dtype
    and model; known before anything is loaded."""
    stats = protocol.statistics_setting(*statistics_source) if uses_statistics else None
    return {
        "metric_family": family,
        "scoring": protocol.scoring_setting(family),
        "generation": protocol.generation_setting(*generation),
        "statistics": stats,
        "schedule": schedule,
        "dtype": dtype,
        "model": model,
    }


def metric_family(cases: Sequence[EditCase]) -> str:
    """``zsre`` when the data is zsRE (its cases get zsRE's metrics), else ``counterfact``."""
    return "zsre" if any(case.benchmark == "zsre" for case in cases) else "counterfact"


def known_cases(lm: LoadedModel, cases: Sequence[EditCase], batch_size: int = 32) -> list[int]:
    """Indices of cases whose rewrite prompt the unedited LM completes with P(true) > P(new)."""
    known = []
    with tqdm(total=len(cases), desc="known cases", unit="case") as bar:
        for first in range(0, len(cases), batch_size):
            group = cases[first : first + batch_size]
            rows = [row for i, case in enumerate(group) for row in case_rows(case, i)[:2]]
            probs = row_probabilities(lm.model, lm.tokenizer, rows, batch_size=batch_size)
            known += [first + i for i in range(len(group)) if probs[2 * i + 1] > probs[2 * i]]
            bar.update(len(group))
    return known


def took(metrics: dict[str, float]) -> bool:
    """Whether a case's edit took: P(target_new) > P(target_true) on the rewrite prompt
    (CounterFact), or every token of target_new is the top-1 prediction there (zsRE)."""
    if "efficacy_accuracy" in metrics:
        return metrics["efficacy_accuracy"] == 1.0
    return metrics["efficacy_score"] > 0


def took_line(method: str, records: Sequence[dict[str, Any]], shown: int = 10) -> str:
    """``METHOD: K/N edits took (ES x)``, naming the cases whose edit did not take (zsRE:
    ``efficacy accuracy x`` instead of ES)."""
    mine = [r for r in records if r["method"] == method and not r.get("skipped")]
    skipped = sum(1 for r in records if r["method"] == method and r.get("skipped"))
    failed = [str(r["case_id"]) for r in mine if not r["took"]]
    line = f"{method}: {len(mine) - len(failed)}/{len(mine)} edits took"
    accuracies = [r["efficacy_accuracy"] for r in mine if "efficacy_accuracy" in r]
    if accuracies:
        line += f" (efficacy accuracy {sum(accuracies) / len(accuracies):.2f})"
    elif mine:
        line += f" (ES {(len(mine) - len(failed)) / len(mine):.2f})"
    if failed:
        more = f" and {len(failed) - shown} more" if len(failed) > shown else ""
        cases = "case" if len(failed) == 1 else "cases"
        line += f"; not taken: {cases} {', '.join(failed[:shown])}{more}"
    if skipped:
        line += (
            f"; {skipped} skipped (no other subject of the same relation has target_new as "
            "its true object)"
        )
    return line


def case_records(
    method: str, cases: Sequence[EditCase], result: MethodResult
) -> list[dict[str, Any]]:
    """One record per case for ``cases.jsonl``: its metrics and whether its edit took."""
    records = []
    for i, (case, metrics) in enumerate(zip(cases, result.per_case, strict=True)):
        record: dict[str, Any] = {
            "method": method,
            "case_id": case.case_id,
            "subject": case.subject,
            "target_true": case.target_true,
            "target_new": case.target_new,
            **metrics,
            "took": took(metrics) if i not in result.skipped else None,
        }
        if i in result.skipped:
            record["skipped"] = True
        if result.edit_seconds:
            record["seconds"] = result.edit_seconds[i]
        records.append(record)
    return records
