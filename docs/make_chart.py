"""Redraw ``docs/chart.png``, the README's headline chart, from the headline table's numbers.

Run from the repository root: ``python docs/make_chart.py``. The figure is drawn by the same code
that writes ``chart.png`` for ``python -m remedi.evaluate`` (``remedi.methods.figures``). Every
number below is copied from the README's headline table; where each came from (command, cases,
settings) is in ``docs/results.md``. A score that was not measured is None and left as a gap.
"""

from __future__ import annotations

from pathlib import Path

from remedi.methods.figures import save_figure, summary_bars

MODEL = "gemma3-270m"


def row(
    method: str,
    es: float,
    ps: float,
    ns: float,
    score: float | None,
    n: int,
    intervals: dict[str, list[float]] | None = None,
) -> dict:
    """One summary row in the shape ``remedi.evaluate`` writes (the columns the chart draws),
    with each measured mean's 95% interval (``<metric>_ci95``; drawn as error bars) where the
    row has them."""
    return {
        "method": method,
        "efficacy_score": es,
        "paraphrase_score": ps,
        "neighborhood_score": ns,
        "score": score,
        "n_cases": n,
        "model": MODEL,
        **{f"{name}_ci95": value for name, value in (intervals or {}).items()},
    }


INTERVALS = ("efficacy_score", "paraphrase_score", "neighborhood_score", "score")


def ci(*bounds: tuple[float, float]) -> dict[str, list[float]]:
    """The 95% intervals of ES, PS, NS and Score, in that order."""
    return {name: list(pair) for name, pair in zip(INTERVALS, bounds, strict=True)}


ROWS = [
    row("none", 0.000, 0.140, 0.850, 0.000, 100, ci((0, 0), (0.08, 0.2), (0.808, 0.891), (0, 0))),
    row(
        "prefix",
        *(0.920, 0.905, 0.464, 0.690, 100),
        ci((0.86, 0.97), (0.855, 0.945), (0.394, 0.532), (0.637, 0.734)),
    ),
    row(
        "rome",
        *(0.990, 0.935, 0.834, 0.915, 100),
        ci((0.97, 1.0), (0.895, 0.965), (0.787, 0.874), (0.892, 0.935)),
    ),
    row("memit (100)", 0.66, 0.53, 0.847, None, 100),
    row("remedi L1", 0.260, 0.290, 0.843, 0.354, 200),
    row("remedi L3 α3", 0.910, 0.910, 0.843, None, 200),
    row("mend", 0.580, 0.512, 0.579, 0.555, 200),
    row("ke", 0.950, 0.833, 0.532, 0.726, 200),
]


def main() -> None:
    path = save_figure(summary_bars(ROWS), Path(__file__).with_name("chart.png"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
