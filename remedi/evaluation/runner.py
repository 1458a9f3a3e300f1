"""Run one registered method over edit cases and score each case with the shared metrics.

Each case is scored on its own edit: the method edits the model for a group of cases (one for
weight editors, a batch for MEMIT, all of them for edits that treat each request apart, such as
REMEDI's or a prefix), the group is scored under :meth:`~remedi.registry.Method.edit`, and the
model is restored before the next group, exceptions included.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from remedi.data import EditCase
from remedi.metrics import evaluate_cases
from remedi.metrics.generation import unrelated_entropy
from remedi.metrics.perplexity import perplexity
from remedi.metrics.rows import EditContext, renumbered
from remedi.metrics.specificity import compared_with_reference
from remedi.models import LoadedModel
from remedi.registry import Edited, Environment, Method

UnderEdit = Callable[[range, Edited], None]
"""Called after a group is scored, while its edit is applied: the cases' indices (in the
evaluated list) and the edited model (e.g. to sample generations under the same edit)."""


@dataclass
class MethodResult:
    """Per-case metrics of one method and the seconds each edit took to apply; ``skipped``
    lists the cases the method could not score (``replace`` without a partner: empty metrics)."""

    method: str
    per_case: list[dict[str, float]]
    edit_seconds: list[float] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)


def run_method(
    lm: LoadedModel,
    method: Method,
    cases: Sequence[EditCase],
    under_edit: UnderEdit | None = None,
) -> MethodResult:
    """Edit with ``method`` and score every case on its own edit (see the module docstring);
    ``method.environment`` lends the statistics, the partner pool, the batch size and whether
    to show progress."""
    env = method.environment
    result = MethodResult(method.name, [{} for _ in cases])
    size = max(1, method.group(len(cases)))
    with tqdm(
        total=len(cases), desc=f"evaluate {method.name}", unit="case", disable=not env.progress
    ) as bar:
        for first in range(0, len(cases), size):
            group = list(cases[first : first + size])
            start = time.perf_counter()
            with method.edit(lm, group) as edited:
                seconds = (time.perf_counter() - start) / len(group)
                scored = [edited.scored_case(i, case) for i, case in enumerate(group)]
                kept = [i for i, case in enumerate(scored) if case is not None]
                shown = [case for case in scored if case is not None]
                if shown:
                    per_case = score_cases(
                        lm,
                        env,
                        shown,
                        [first + i for i in kept],
                        renumbered(edited.row_edit, kept),
                        edited.text_prefix(),
                        method.scores_free_text,
                    )
                    for i, metrics in zip(kept, per_case, strict=True):
                        result.per_case[first + i] = metrics
                result.skipped += [first + i for i in range(len(group)) if i not in kept]
                if method.timed:
                    result.edit_seconds += [seconds] * len(group)
                if under_edit is not None:
                    under_edit(range(first, first + len(group)), edited)
            bar.update(len(group))
    return result


def score_cases(
    lm: LoadedModel,
    env: Environment,
    cases: Sequence[EditCase],
    indices: Sequence[int],
    row_edit: EditContext | None = None,
    text_prefix: str = "",
    free_text: bool = True,
) -> list[dict[str, float]]:
    """Every metric of ``cases`` (entries ``indices`` of the evaluated list) on the model as it
    is now, with ``row_edit`` around each scored batch: the shared CounterFact / zsRE metrics,
    and what ``env`` asks for (CounterFact+ against the unedited references, unrelated-text
    entropy and held-out perplexity, both read after ``text_prefix``; with ``free_text`` False
    neither, as the edit does not reach free text)."""
    _, per_case = evaluate_cases(
        lm.model,
        lm.tokenizer,
        cases,
        edit=row_edit,
        batch_size=env.batch_size,
        plus=env.references is not None,
    )
    if env.references is not None:
        reference = [env.references[i] for i in indices]
        found = compared_with_reference(
            lm.model, lm.tokenizer, cases, reference, row_edit, env.batch_size
        )
        for metrics, extra in zip(per_case, found, strict=True):
            metrics.update(extra)
    if env.unrelated_tokens > 0 and free_text:
        entropy = unrelated_entropy(lm, env.unrelated_tokens, text_prefix, env.seed)
        for metrics in per_case:
            metrics["unrelated_entropy"] = entropy
    if env.heldout is not None and free_text:
        ratio = perplexity(lm, env.heldout, text_prefix) / env.heldout_perplexity
        for metrics in per_case:
            metrics["perplexity_ratio"] = ratio
    return per_case
