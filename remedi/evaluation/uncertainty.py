"""How sure a summary's means are: a 95% bootstrap interval for each mean metric (the cases
resampled with replacement, scipy's percentile bootstrap, seeded), and for Score, the harmonic mean
of three means, resampled with its cases paired."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats

RESAMPLES = 1000
SEED = 0


def _interval(data: tuple[np.ndarray, ...], statistic: object) -> list[float] | None:
    if len(data[0]) < 2 or np.all(np.concatenate(data) == data[0][0]):
        value = float(statistic(*(d[None, :] for d in data))[0])  # type: ignore[operator]
        return [value, value]
    found = stats.bootstrap(
        data,
        statistic,
        paired=len(data) > 1,
        vectorized=True,
        n_resamples=RESAMPLES,
        confidence_level=0.95,
        method="percentile",
        random_state=np.random.default_rng(SEED),
    )
    return [float(found.confidence_interval.low), float(found.confidence_interval.high)]


def _mean(*samples: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.asarray(samples[0]).mean(axis=axis)


def _harmonic(*samples: np.ndarray, axis: int = -1) -> np.ndarray:
    means = np.stack([np.asarray(s).mean(axis=axis) for s in samples])
    with np.errstate(divide="ignore"):
        inverse = np.where(means > 0, 1.0 / np.maximum(means, 1e-300), np.inf)
    return np.where(np.all(means > 0, axis=0), len(samples) / inverse.sum(axis=0), 0.0)


def intervals(
    per_case: Sequence[dict[str, float]],
    names: Sequence[str],
    score_parts: Sequence[str] | None = None,
) -> dict[str, list[float] | None]:
    """``<name>_ci95`` ``[low, high]`` for each metric of ``names`` the cases have, and for
    ``score`` (the harmonic mean of the ``score_parts`` means) over the cases that have all of
    them; None where no case has the metric."""
    found: dict[str, list[float] | None] = {}
    for name in names:
        values = np.array([m[name] for m in per_case if m.get(name) is not None], dtype=float)
        found[f"{name}_ci95"] = _interval((values,), _mean) if len(values) else None
    if score_parts:
        rows = [m for m in per_case if all(m.get(p) is not None for p in score_parts)]
        data = tuple(np.array([m[p] for m in rows], dtype=float) for p in score_parts)
        found["score_ci95"] = _interval(data, _harmonic) if rows else None
    return found
