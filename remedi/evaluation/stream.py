"""Edits that accumulate: one model edited again and again, as users of editing toolkits do.

A :class:`Schedule` says how cases are edited:

- ``independent``: each case (or group, for methods that edit many at once) on the unedited
  model, restored after it is scored (:func:`remedi.evaluation.runner.run_method`);
- ``sequential``: one case at a time, each edit written on top of the earlier ones;
- ``batch:N``: N cases at a time, accumulating.

Under an accumulating schedule (:func:`run_stream`) the cases are scored on the model *after*
edits, never on a model restored in between: at the end of the stream (every case on the
final model) and, with ``score_at``, at points along it (the cases edited so far, on the model
as it is then), which give curves of every metric against the number of edits. The model is
restored bitwise when the stream ends, exceptions included.

Weight editors (learned or not) write each group with :meth:`~remedi.registry.WeightMethod.write`
on top of the earlier ones. Only the first backup of each parameter is kept (a later write's
backup of the same parameter is dropped), so memory does not grow with the number of edits.
A memory-based editor (SERAC) adds each group to its memory, and every scored prompt is routed
against all of it. Methods whose edit lives in the input (prefix, replace, REMEDI) do not
accumulate into one model: under these schedules they report no metrics (``n/a``), and
``none`` is the unedited model at every point. A method with stream state (AlphaEdit's
accumulated keys, SERAC's memory) is told when the stream begins and ends
(:meth:`~remedi.registry.Method.begin_stream`).
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from remedi.data import EditCase
from remedi.evaluation.runner import MethodResult, score_cases
from remedi.metrics.counterfact import summarize
from remedi.models import LoadedModel
from remedi.registry import Method, WeightMethod

ScheduleKind = Literal["independent", "sequential", "batch"]


@dataclass(frozen=True)
class Schedule:
    """How the cases are edited (see the module docstring)."""

    kind: ScheduleKind = "independent"
    size: int = 1

    @classmethod
    def parse(cls, text: str) -> Schedule:
        """``independent``, ``sequential`` or ``batch:N``; a one-line ``ValueError`` otherwise."""
        name, _, count = text.partition(":")
        if name in ("independent", "sequential") and not count:
            return cls(name, 1)  # type: ignore[arg-type]
        if name == "batch" and count.isdigit() and int(count) > 0:
            return cls("batch", int(count))
        raise ValueError(
            f"schedule {text!r} must be 'independent', 'sequential' or 'batch:N' (N > 0)"
        )

    @property
    def accumulates(self) -> bool:
        return self.kind != "independent"

    @property
    def name(self) -> str:
        return f"batch:{self.size}" if self.kind == "batch" else self.kind


def parse_score_at(text: str) -> list[int] | None:
    """``end`` -> None; ``10,100,1000`` -> the sorted edit counts at which to score."""
    if text.strip() == "end":
        return None
    try:
        points = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        points = []
    if not points or points[0] < 1:
        raise ValueError(f"score-at {text!r} must be 'end' or edit counts such as 10,100,1000")
    return points


def streams(method: Method) -> bool:
    """Whether ``method``'s edits accumulate in one model (weights) or in a memory it keeps,
    or it makes none."""
    return isinstance(method, WeightMethod) or method.keeps_memory or method.name == "none"


@dataclass
class CurvePoint:
    """The metrics' means over the cases edited so far, after ``n_edits`` edits, with the last
    group's seconds per edit and the process's memory then."""

    n_edits: int
    means: dict[str, float]
    seconds_per_edit: float
    rss_mib: float
    gpu_mib: float | None = None


@dataclass
class StreamResult(MethodResult):
    """A method's result under an accumulating schedule: the final per-case metrics (as
    :class:`MethodResult`), the curve, and each group's cost along the stream."""

    schedule: str = "sequential"
    curve: list[CurvePoint] = field(default_factory=list)
    group_seconds: list[float] = field(default_factory=list)
    """Seconds per edit of each group, in stream order."""
    group_rss_mib: list[float] = field(default_factory=list)
    supported: bool = True


def resident_mib() -> float:
    """The process's resident memory now (MiB; peak RSS where /proc is absent)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _gpu_mib(lm: LoadedModel) -> float | None:
    if lm.device.type != "cuda":
        return None
    return torch.cuda.memory_allocated(lm.device) / 2**20


def run_stream(
    lm: LoadedModel,
    method: Method,
    cases: Sequence[EditCase],
    schedule: Schedule,
    score_at: Sequence[int] | None = None,
) -> StreamResult:
    """Edit ``cases`` with ``method`` under the accumulating ``schedule``; score every case on
    the final model and, at each count of ``score_at`` (rounded up to a group's end), the cases
    edited so far; restore the model bitwise at the end."""
    if not schedule.accumulates:
        raise ValueError("run_stream takes an accumulating schedule (sequential or batch:N)")
    env = method.environment
    result = StreamResult(method.name, [{} for _ in cases], schedule=schedule.name)
    if not streams(method):
        result.supported = False
        return result
    points = [p for p in (score_at or []) if p < len(cases)]
    originals: dict[str, Any] = {}  # parameter name -> the earliest handle backing it up
    method.begin_stream(lm)
    try:
        with tqdm(
            total=len(cases),
            desc=f"{method.name} ({schedule.name})",
            unit="edit",
            disable=not env.progress,
        ) as bar:
            for first in range(0, len(cases), schedule.size):
                group = list(cases[first : first + schedule.size])
                start = time.perf_counter()
                if isinstance(method, WeightMethod):
                    for handle in method.write(lm, group):
                        for name in handle.names:  # a later backup of a name is dropped
                            originals.setdefault(name, handle)
                elif method.keeps_memory:
                    method.remember(lm, group)
                seconds = (time.perf_counter() - start) / len(group)
                done = first + len(group)
                result.group_seconds.append(seconds)
                result.group_rss_mib.append(resident_mib())
                if method.timed and (isinstance(method, WeightMethod) or method.keeps_memory):
                    result.edit_seconds += [seconds] * len(group)
                while points and points[0] <= done:
                    points.pop(0)
                    metrics = score_cases(
                        lm,
                        env,
                        cases[:done],
                        range(done),
                        method.stream_edit(lm),
                        free_text=method.scores_free_text,
                    )
                    result.curve.append(
                        CurvePoint(done, summarize(metrics), seconds, resident_mib(), _gpu_mib(lm))
                    )
                bar.update(len(group))
        result.per_case = score_cases(
            lm,
            env,
            cases,
            range(len(cases)),
            method.stream_edit(lm),
            free_text=method.scores_free_text,
        )
        result.curve.append(
            CurvePoint(
                len(cases),
                summarize(result.per_case),
                result.group_seconds[-1] if result.group_seconds else 0.0,
                resident_mib(),
                _gpu_mib(lm),
            )
        )
    finally:
        for name, handle in originals.items():
            handle.restore_one(name)
        method.end_stream(lm)
    return result
