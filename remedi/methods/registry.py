"""Apply any non-learned method to edit cases by name, so that ``remedi.evaluate`` and the
Lightning evaluation callbacks score them the same way.

``score_method(lm, "rome", cases, stats=...)`` edits one case at a time (MEMIT: all at once),
scores it with :func:`remedi.metrics.evaluate_cases` and restores the LM before the next.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from remedi.data import EditCase
from remedi.methods.weights import EditHandle
from remedi.metrics import evaluate_cases
from remedi.models import LoadedModel

BASELINES = ("none", "prefix", "replace", "ft", "ft-l", "rome", "memit", "kn")
"""Methods that need no training (REMEDI, MEND and KE are scored through their checkpoints)."""
STATS_METHODS = ("rome", "memit")
SCORE_GROUP = 8
"""Cases scored per call when no edit separates them (none, prefix): a progress bar step."""


@dataclass
class MethodResult:
    """Per-case metrics of one method and the seconds each edit took to apply; ``skipped``
    lists the cases the method could not score (``replace`` without a partner: empty metrics)."""

    method: str
    per_case: list[dict[str, float]]
    edit_seconds: list[float] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)


def prefix_case(case: EditCase) -> EditCase:
    """The case with its new fact stated before every prompt (the ``prefix`` baseline)."""
    context = f"{case.rewrite_prompt} {str(case.target_new).strip()}. "
    return dataclasses.replace(
        case,
        prompt=context + case.prompt,
        paraphrase_prompts=[context + p for p in case.paraphrase_prompts],
        neighborhood_prompts=[context + p for p in case.neighborhood_prompts],
    )


def case_editor(
    lm: LoadedModel,
    method: str,
    layer: int | None = None,
    stats: Any = None,
    hparams: Any = None,
) -> Callable[[EditCase], EditHandle]:
    """A function that writes one case into ``lm``'s weights and returns the restoring handle.

    ``method`` is ft, ft-l, rome or kn; ``stats`` is ROME's second moment of ``layer`` (None:
    identity); ``hparams`` the method's hyperparameter dataclass (or KN keyword dict).
    """
    if method in ("ft", "ft-l"):
        from remedi.methods import finetune

        ft_hp = hparams or finetune.FinetuneHyperParams()
        ft_hp = dataclasses.replace(ft_hp, layer=layer if layer is not None else ft_hp.layer)
        if method == "ft-l" and ft_hp.eps is None:
            ft_hp.eps = 5e-4
        if method == "ft":
            ft_hp.eps = None
        return lambda case: finetune.apply_edit(lm, case, ft_hp)
    if method == "rome":
        from remedi.methods import rome

        return lambda case: rome.apply_edit(lm, case, layer=layer, stats=stats, hparams=hparams)
    if method == "kn":
        from remedi.methods import knowledge_neurons

        kn_hp: dict[str, Any] = dict(hparams or {})
        return lambda case: knowledge_neurons.apply_update(lm, case, **kn_hp)
    raise ValueError(f"method {method!r} has no per-case weight editor; use ft, ft-l, rome or kn")


def score_method(
    lm: LoadedModel,
    method: str,
    cases: Sequence[EditCase],
    layer: int | None = None,
    stats: Any = None,
    hparams: Any = None,
    memit_batch: int | None = None,
    batch_size: int = 32,
    progress: bool = True,
    under_edit: Callable[[range], None] | None = None,
    editor: Callable[[EditCase], EditHandle] | None = None,
    pool: Sequence[EditCase] | None = None,
    seed: int = 0,
) -> MethodResult:
    """Edit with ``method`` and score every case with the shared CounterFact metrics.

    ``stats``: for rome the second moment of its layer; for memit a mapping layer -> second
    moment. ``editor`` writes one case into the LM for methods that bring their own (a trained
    MEND or KE editor). The LM is restored after every case (or MEMIT group), exceptions
    included. ``under_edit(indices)`` runs after scoring, while the cases ``indices`` are still
    written into the LM (e.g. to sample generations under the same edit). ``replace`` takes its
    partner subjects from ``pool`` (default ``cases``; see :mod:`remedi.methods.replace`).
    """
    if method not in BASELINES and editor is None:
        raise ValueError(f"method {method!r} must be one of {', '.join(BASELINES)}")

    def score(first: int, group: Sequence[EditCase]) -> list[dict[str, float]]:
        per_case = evaluate_cases(lm.model, lm.tokenizer, group, batch_size=batch_size)[1]
        if under_edit is not None:
            under_edit(range(first, first + len(group)))
        return per_case

    if method in ("none", "prefix"):
        scored = [prefix_case(c) for c in cases] if method == "prefix" else list(cases)
        result = MethodResult(method, [])
        with tqdm(
            total=len(cases), desc=f"evaluate {method}", unit="case", disable=not progress
        ) as bar:
            for first in range(0, len(scored), SCORE_GROUP):
                group = scored[first : first + SCORE_GROUP]
                result.per_case += score(first, group)
                bar.update(len(group))
        return result
    if method == "replace":
        return _score_replace(lm, cases, pool, seed, batch_size, progress, under_edit)
    if method == "memit":
        return _score_memit(lm, cases, stats, hparams, memit_batch, score)
    edit = editor or case_editor(lm, method, layer, stats, hparams)
    result = MethodResult(method, [])
    for i, case in enumerate(
        tqdm(cases, desc=f"evaluate {method}", unit="case", disable=not progress)
    ):
        start = time.perf_counter()
        with edit(case):
            result.edit_seconds.append(time.perf_counter() - start)
            result.per_case += score(i, [case])
    return result


def _score_memit(
    lm: LoadedModel,
    cases: Sequence[EditCase],
    stats: Mapping[int, Any] | None,
    hparams: Any,
    group_size: int | None,
    score: Callable[[int, Sequence[EditCase]], list[dict[str, float]]],
) -> MethodResult:
    from remedi.methods import memit

    size = group_size or len(cases)
    result = MethodResult("memit", [])
    for start in range(0, len(cases), size):
        group = list(cases[start : start + size])
        began = time.perf_counter()
        with memit.apply_edits(lm, group, stats=stats, hparams=hparams):
            result.edit_seconds += [(time.perf_counter() - began) / len(group)] * len(group)
            result.per_case += score(start, group)
    return result


def _score_replace(
    lm: LoadedModel,
    cases: Sequence[EditCase],
    pool: Sequence[EditCase] | None,
    seed: int,
    batch_size: int,
    progress: bool,
    under_edit: Callable[[range], None] | None,
) -> MethodResult:
    """Score each case with a partner's subject put in (no edit); cases without one are
    skipped, with empty metrics."""
    from remedi.methods.replace import replaced_cases

    swapped = replaced_cases(cases, pool, seed)
    kept = [i for i, case in enumerate(swapped) if case is not None]
    result = MethodResult("replace", [{} for _ in cases])
    result.skipped = [i for i, case in enumerate(swapped) if case is None]
    with tqdm(total=len(kept), desc="evaluate replace", unit="case", disable=not progress) as bar:
        for first in range(0, len(kept), SCORE_GROUP):
            group = kept[first : first + SCORE_GROUP]
            scored = [case for i in group if (case := swapped[i]) is not None]
            per_case = evaluate_cases(lm.model, lm.tokenizer, scored, batch_size=batch_size)[1]
            for i, metrics in zip(group, per_case, strict=True):
                result.per_case[i] = metrics
                if under_edit is not None:
                    under_edit(range(i, i + 1))
            bar.update(len(group))
    return result
