"""Writing an evaluation's results: the summary rows as JSON and a Markdown table with its
protocol line, the per-case records, the chart, an accumulating schedule's curves, and the rows
of an earlier table for ``--append``. Every table of ``remedi.evaluate`` (the CounterFact/zsRE
table and REMEDI's tasks) is written here, atomically."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from remedi import protocol
from remedi.atomic import atomic_dir, write_json
from remedi.cli import UsageError, one_line
from remedi.metrics import (
    GENERATION_METRIC_NAMES,
    METRIC_NAMES,
    PLUS_NAMES,
    ZSRE_METRIC_NAMES,
)


def edit_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The columns of an editing table (zsRE's for a zsRE table)."""
    zsre = any(name in row for row in rows for name in ZSRE_METRIC_NAMES)
    columns = ["method", "n_cases", *(ZSRE_METRIC_NAMES if zsre else METRIC_NAMES)]
    extra = [*PLUS_NAMES[:1], "neighborhood_kl", "locality_agreement", "perplexity_ratio"]
    extra.append("unrelated_entropy")
    found = [name for name in extra if any(name in r for r in rows)]
    at = len(columns) if zsre else len(columns) - 1  # before Score, which ends a CounterFact row
    columns[at:at] = found
    columns.append("seconds_per_edit")
    columns += [name for name in GENERATION_METRIC_NAMES if any(name in row for row in rows)]
    return columns


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """The rows as a Markdown table of ``columns`` (default: :func:`edit_columns`), with the
    protocol in a line under it (a protocol column instead when the rows' protocols differ)."""
    columns = list(columns) if columns is not None else edit_columns(rows)
    mixed = bool(protocol.conflicts(rows))
    lines = ["| " + " | ".join(columns + ["protocol"] * mixed) + " |"]
    lines.append("|" + "---|" * (len(columns) + mixed))
    for row in rows:
        cells = [_cell(row, column) for column in columns]
        if mixed:
            cells.append(protocol.describe(protocol.protocol_of(row)))
        lines.append("| " + " | ".join(cells) + " |")
    lines += _cases_lines(rows)
    lines += _score_lines(rows)
    lines += ["", protocol.table_line(rows)]
    return "\n".join(lines) + "\n"


def _cell(row: dict[str, Any], column: str) -> str:
    """A table cell: a float to 3 places, ``n/a`` where the row cannot have the value."""
    value = row.get(column)
    if value is None and column in row:
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _cases_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The cases the rows were measured on: data, filters, hash of the case list; and that
    each mean comes with its 95% bootstrap interval when the rows carry them."""
    digests = {row.get("data_sha256") for row in rows}
    if len(digests) != 1 or None in digests:
        return []
    row = rows[0]
    filters = [f"first {row['limit']}" for _ in [0] if row.get("limit") is not None]
    filters += ["known to the model only"] if row.get("known_only") else []
    shown = f" ({', '.join(filters)})" if filters else ""
    line = f"Cases: {row.get('data') or 'given'}{shown}, sha256 {str(row['data_sha256'])[:12]}"
    if row.get("heldout"):
        line += f"; perplexity_ratio on {row['heldout']}"
    if any(key.endswith("_ci95") for key in row):
        line += "; each mean's 95% bootstrap interval is in summary.json (<metric>_ci95)"
    return ["", line + "."]


def case_set_problem(earlier: Sequence[dict[str, Any]], data_sha256: str) -> str | None:
    """Why this run's cases (their hash) may not join the ``earlier`` table (``--append``):
    a table compares methods on one case list; None when the lists are the same."""
    found = {row.get("data_sha256") for row in earlier}
    if not earlier or found == {data_sha256}:
        return None
    there = ", ".join(sorted(str(d)[:12] for d in found))
    return (
        f"--append: the table in summary.json was measured on other cases (data_sha256 {there} "
        f"there, {data_sha256[:12]} here); write this run to another --output"
    )


def _score_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """What each row's Score is the harmonic mean of, when not every row's is ES, PS, NS."""
    by_source: dict[str, list[str]] = {}
    for row in rows:
        by_source.setdefault(str(row.get("score_from", "ES, PS, NS")), []).append(row["method"])
    if set(by_source) <= {"ES, PS, NS"}:
        return []
    said = "; ".join(f"{', '.join(methods)}: {src}" for src, methods in by_source.items())
    return [
        "",
        f"Score: harmonic mean of {said}. NS is n/a where the edit cannot reach the plain "
        "neighbourhood prompts (it keys on the subject's mention or swaps the subject); NS+ "
        "reads them after the edit's statement (CounterFact+).",
    ]


def write_outputs(
    output: Path,
    rows: Sequence[dict[str, Any]],
    records: Sequence[dict[str, Any]],
    extra_lines: dict[str, Sequence[str]] | None = None,
    append: bool = False,
    columns: Sequence[str] | None = None,
    chart: bool = True,
) -> None:
    """Write the table (``summary.json``: one flat object for one row; ``summary.md``; with
    ``chart``, ``chart.png``), the per-case records (``cases.jsonl``) and any ``extra_lines``
    files (e.g. ``generations.jsonl``) into ``output``, all at once: into a staged copy of the
    folder that replaces it when complete (:func:`~remedi.atomic.atomic_dir`), so an
    interruption leaves the earlier files whole, never new records beside an old table. With
    ``append``, ``rows`` is the whole table and the lines are added to those already there."""
    with atomic_dir(output, update=True) as staged:

        def write_lines(name: str, lines: Sequence[str]) -> None:
            before = (output / name).read_text() if append and (output / name).exists() else ""
            (staged / name).write_text(before + "".join(lines), encoding="utf-8")

        write_lines("cases.jsonl", [json.dumps(r) + "\n" for r in records])
        for name, lines in (extra_lines or {}).items():
            write_lines(name, lines)
        summary: Any = rows[0] if len(rows) == 1 else list(rows)
        (staged / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", "utf-8")
        (staged / "summary.md").write_text(markdown_table(rows, columns), encoding="utf-8")
        if chart:
            from remedi.methods import figures

            figures.save_figure(figures.summary_bars(rows), staged / "chart.png")


def earlier_rows(output: Path) -> list[dict[str, Any]]:
    """The rows of the table already in ``output`` (none when it has no summary.json), for
    ``--append``."""
    path = output / "summary.json"
    if not path.exists():
        return []
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"--append: {path} is not valid JSON: {one_line(err)}") from err
    rows = summary if isinstance(summary, list) else [summary]
    if not all(isinstance(row, dict) and "method" in row for row in rows):
        raise UsageError(f"--append: {path} is not a summary.json of remedi.evaluate")
    return rows


def protocol_problem(
    earlier: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]], mixed: bool
) -> str | None:
    """Why ``rows`` (this run's rows or their planned protocols) may not share one table with
    each other and the ``earlier`` rows kept by ``--append``; None when they may."""
    if mixed:
        return None
    if earlier:
        why = protocol.mismatch(earlier, rows)
        if why:
            return (
                f"--append: the table in summary.json has another protocol ({why}); pass "
                "--mixed-protocols to put both in one table"
            )
    found = protocol.conflicts(rows)
    if found:
        name, values = next(iter(found.items()))
        shown = ", ".join(map(str, values))
        return f"the methods' rows differ in {name} ({shown}); pass --mixed-protocols to allow it"
    return None


def curve_records(curves: dict[str, Any]) -> dict[str, Any]:
    """``curves.json``'s content: per method, its schedule, each curve point and the seconds per
    edit and resident memory of every group along the stream."""
    return {
        name: {
            "schedule": stream.schedule,
            "supported": stream.supported,
            "points": [dataclasses.asdict(point) for point in stream.curve],
            "group_seconds_per_edit": stream.group_seconds,
            "group_rss_mib": stream.group_rss_mib,
        }
        for name, stream in curves.items()
    }


def write_curves(output: Path, curves: dict[str, Any]) -> list[str]:
    """Write an accumulating schedule's curves beside the table: ``curves.json``,
    ``curves.png`` (each metric against the number of edits) and TensorBoard scalars under
    ``tensorboard/<method>`` (``stream/<metric>`` at step = edits); returns the names written."""
    from remedi.methods import figures

    records = curve_records(curves)
    write_json(output / "curves.json", records)
    drawn = {name: r["points"] for name, r in records.items() if r["points"]}
    figures.save_figure(figures.stream_curves(drawn), output / "curves.png")
    from torch.utils.tensorboard import SummaryWriter

    for name, record in records.items():
        with SummaryWriter(str(output / "tensorboard" / name)) as writer:
            for point in record["points"]:
                for metric, value in point["means"].items():
                    writer.add_scalar(f"stream/{metric}", value, point["n_edits"])
                step = point["n_edits"]
                writer.add_scalar("stream/seconds_per_edit", point["seconds_per_edit"], step)
                writer.add_scalar("stream/rss_mib", point["rss_mib"], step)
    return ["curves.json", "curves.png", "tensorboard/"]
