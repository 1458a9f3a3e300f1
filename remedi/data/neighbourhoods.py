"""More neighbourhood prompts for training cases that carry few (MEND's CounterFact layout has
one a case): other cases' neighbourhood prompts whose answer is the same true object.

A CounterFact neighbourhood prompt names another subject whose true object is the edited case's
(e.g. "John Lennon performs on the" for an edit of Toko Yasuda's instrument, guitar): an edit
that leaks through the relation's wording changes it. Pooling them by true object gives each
training case up to ten, as the ROME layout has.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace

from remedi.data.cases import EditCase


def pool_neighbourhoods(cases: Sequence[EditCase], up_to: int = 10) -> list[EditCase]:
    """Copies of ``cases`` with up to ``up_to`` neighbourhood prompts each: its own first, then
    prompts of other cases with the same true object that do not mention its subject, in an
    order drawn per case (so cases of one object do not all share the same few). Cases whose
    neighbourhood prompts carry their own answers (zsRE) are returned unchanged."""
    if up_to < 0:
        raise ValueError(f"up_to must be >= 0, got {up_to}")
    pool: dict[str, list[str]] = defaultdict(list)
    for case in cases:
        if case.neighborhood_targets is None:
            pool[case.target_true].extend(case.neighborhood_prompts)
    result = []
    for case in cases:
        if case.neighborhood_targets is not None:
            result.append(case)
            continue
        own = list(dict.fromkeys(case.neighborhood_prompts))
        others = sorted(
            {p for p in pool[case.target_true] if p not in own and case.subject not in p},
            key=lambda p: zlib.crc32(f"{case.case_id}:{p}".encode()),
        )
        prompts = (own + others)[:up_to]
        result.append(replace(case, neighborhood_prompts=prompts))
    return result
