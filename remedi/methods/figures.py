"""Matplotlib figures of the locators (causal-trace heatmaps, knowledge-neuron summaries) and of
evaluation tables, written atomically to a path the caller chose. Uses the object API (no pyplot
global state)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from remedi.atomic import atomic_path
from remedi.methods.causal_trace import TraceResult

_TITLES = {
    "hidden": "Restoring the block output",
    "mlp": "Restoring MLP outputs",
    "attn": "Restoring attention outputs",
}
_COLORMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically (temp file in the same directory)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return path


def trace_heatmap(result: TraceResult, kind: str) -> Figure:
    """Tokens × layers heatmap of P(target) with one state (or window) restored."""
    scores = result.scores[kind].numpy()
    fig = Figure(figsize=(max(4.0, 0.3 * scores.shape[1] + 2), 0.35 * len(result.tokens) + 1.5))
    ax = fig.add_subplot()
    image = ax.pcolormesh(scores, cmap=_COLORMAPS.get(kind, "viridis"), vmin=result.corrupted_prob)
    ax.invert_yaxis()
    start, end = result.subject_range
    labels = [f"{t!r}*" if start <= i < end else repr(t) for i, t in enumerate(result.tokens)]
    ax.set_yticks([i + 0.5 for i in range(len(labels))], labels)
    ticks = range(0, scores.shape[1], 2)
    ax.set_xticks([i + 0.5 for i in ticks], [str(i) for i in ticks])
    window = "" if kind == "hidden" else f" (window {result.window})"
    ax.set_title(f"{_TITLES.get(kind, kind)}{window}")
    ax.set_xlabel("layer")
    bar = fig.colorbar(image, ax=ax)
    bar.set_label(f"p({result.target.strip()!r})  clean {result.clean_prob:.3f}")
    return fig


def attribution_figure(attribution: torch.Tensor, neurons: Sequence[tuple[int, int]]) -> Figure:
    """Per layer, the largest attribution of any neuron; identified neurons marked."""
    top = attribution.max(dim=1).values.numpy()
    fig = Figure(figsize=(6, 3))
    ax = fig.add_subplot()
    ax.bar(range(len(top)), top, color="tab:blue")
    for layer, index in neurons:
        ax.plot([layer], [float(attribution[layer, index])], "r*", markersize=10)
    ax.set_xticks(range(len(top)))
    ax.set_xlabel("layer")
    ax.set_ylabel("max IG attribution")
    ax.set_title("Knowledge-neuron attribution (stars: identified neurons)")
    return fig


def layer_histogram(histogram: Mapping[int, int], num_layers: int) -> Figure:
    """Number of knowledge neurons per layer across facts."""
    fig = Figure(figsize=(6, 3))
    ax = fig.add_subplot()
    ax.bar(range(num_layers), [histogram.get(x, 0) for x in range(num_layers)], color="tab:green")
    ax.set_xticks(range(num_layers))
    ax.set_xlabel("layer")
    ax.set_ylabel("knowledge neurons")
    ax.set_title("Layer distribution of knowledge neurons")
    return fig


def intervention_bars(changes: Mapping[str, Mapping[str, float]]) -> Figure:
    """Grouped bars: mean relative probability change per intervention (suppress, amplify) for
    the fact itself and for unrelated facts, in percent."""
    groups = list(changes)
    series = sorted({k for v in changes.values() for k in v})
    fig = Figure(figsize=(5, 3))
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(series))
    for j, name in enumerate(series):
        values = [100 * changes[g].get(name, 0.0) for g in groups]
        ax.bar([i + j * width for i in range(len(groups))], values, width, label=name)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(groups))], groups)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("mean relative change of p(answer), %")
    ax.legend()
    return fig


SUMMARY_BARS = {
    "efficacy_score": "ES",
    "paraphrase_score": "PS",
    "neighborhood_score": "NS",
    "neighborhood_plus_score": "NS+",
    "score": "Score",
}
"""The summary-table columns :func:`summary_bars` draws, with their short names."""
OPTIONAL_BARS = ("neighborhood_plus_score",)
"""Columns drawn only when some row has them (tables written before CounterFact+)."""
ZSRE_SUMMARY_BARS = {
    "efficacy_accuracy": "Efficacy",
    "paraphrase_accuracy": "Paraphrase",
    "specificity_accuracy": "Specificity",
}
"""The columns drawn for a zsRE table (teacher-forced token accuracies)."""


def _error(row: Mapping[str, Any], column: str) -> tuple[float, float]:
    """``(below, above)`` the value of ``column`` that its ``_ci95`` interval reaches (NaN, so
    no error bar, where the row has no interval)."""
    interval, value = row.get(f"{column}_ci95"), row.get(column)
    if not interval or value is None:
        return (math.nan, math.nan)  # no bar drawn
    return (max(0.0, float(value) - interval[0]), max(0.0, interval[1] - float(value)))


def summary_bars(rows: Sequence[Mapping[str, Any]]) -> Figure:
    """Grouped bars of an evaluation table: one group per method (in ``rows`` order), one bar per
    score in :data:`SUMMARY_BARS` (:data:`ZSRE_SUMMARY_BARS` for a zsRE table; the
    :data:`OPTIONAL_BARS` where some row has them); a missing score (n/a) leaves a gap rather
    than a misleading zero, and a row's ``<score>_ci95`` interval is drawn as an error bar."""
    methods = [str(row["method"]) for row in rows]
    zsre = any("efficacy_accuracy" in row for row in rows)
    columns = ZSRE_SUMMARY_BARS if zsre else SUMMARY_BARS
    columns = {
        c: label
        for c, label in columns.items()
        if c not in OPTIONAL_BARS or any(c in row for row in rows)
    }
    width = 0.8 / len(columns)
    fig = Figure(figsize=(max(4.0, 1.2 * len(methods) + 1.5), 3.5))
    ax = fig.add_subplot()
    for j, (column, label) in enumerate(columns.items()):
        values = [math.nan if row.get(column) is None else float(row[column]) for row in rows]
        errors = [_error(row, column) for row in rows]
        drawn = any(not math.isnan(below) for below, _ in errors)
        bars = ax.bar(
            [i + j * width for i in range(len(methods))],
            values,
            width,
            label=label,
            yerr=list(zip(*errors, strict=True)) if drawn else None,
            error_kw={"elinewidth": 0.8, "capsize": 1.5},
        )
        labels = ["" if math.isnan(v) else f"{v:.2f}" for v in values]
        ax.bar_label(bars, labels=labels, fontsize=7, padding=1)
    ax.set_xticks([i + width * (len(columns) - 1) / 2 for i in range(len(methods))], methods)
    ax.set_ylim(0.0, 1.1)
    ax.set_ylabel("token accuracy" if zsre else "score")
    models = sorted({str(row["model"]) for row in rows if row.get("model")})
    cases = sorted({int(row["n_cases"]) for row in rows if row.get("n_cases") is not None})
    details = ", ".join([*models, *(f"{n} cases" for n in cases)])
    name = "zsRE accuracies" if zsre else "CounterFact scores"
    ax.set_title(f"{name} per method ({details})" if details else f"{name} per method")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


CURVE_PANELS = {
    "efficacy_score": "efficacy",
    "paraphrase_score": "paraphrase",
    "neighborhood_score": "neighbourhood",
    "neighborhood_plus_score": "CounterFact+ neighbourhood",
    "perplexity_ratio": "held-out perplexity ratio",
}
"""The metrics drawn against the number of edits, one panel each (where some method has them)."""


def stream_curves(curves: Mapping[str, Sequence[Mapping[str, Any]]]) -> Figure:
    """One panel per metric of :data:`CURVE_PANELS`, one line per method: the metric's mean
    over the cases edited so far against the number of edits (log scale), from each method's
    curve points (``{"n_edits": N, "means": {...}}``)."""
    panels = [
        (name, label)
        for name, label in CURVE_PANELS.items()
        if any(name in p["means"] for points in curves.values() for p in points)
    ]
    fig = Figure(figsize=(3.2 * max(1, len(panels)), 3.0))
    for k, (name, label) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        for method, points in curves.items():
            drawn = [(p["n_edits"], p["means"][name]) for p in points if name in p["means"]]
            if drawn:
                xs, ys = zip(*drawn, strict=True)
                ax.plot(xs, ys, marker="o", markersize=3, label=method)
        ax.set_xscale("log")
        ax.set_xlabel("edits")
        ax.set_title(label, fontsize=9)
        if name != "perplexity_ratio":
            ax.set_ylim(-0.02, 1.02)
    if panels:
        fig.axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig
