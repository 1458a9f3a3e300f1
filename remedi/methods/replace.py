"""The ``replace`` baseline (REMEDI, Hernandez et al. 2023): instead of editing the LM, put in the
prompts another entity that truly has the requested attribute.

For a CounterFact case asking that ``subject`` get ``target_new``, the partner is another case of
the same relation whose true object is ``target_new``; the rewrite, paraphrase and generation
prompts are scored with the partner's subject in place of this case's subject (neighborhood
prompts are about other subjects and stay as they are, so NS is the unedited LM's). A case with
no partner is skipped and counted, not scored.

Like REMEDI's reference (``scripts/eval_fact_gen.py``), the partner is drawn at random among the
candidates; here the draw is seeded per case (``seed`` and the case id), so runs repeat. Where the
reference found candidates in Wikidata attribute snippets by relation and object id, we look in
the cases given (the evaluated data): "same relation" means equal ``relation_id`` when both cases
have one, else the same prompt template (MEND's CounterFact layout has no relation ids), and the
objects match after stripping spaces, case-insensitively.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from remedi.data import EditCase
from remedi.methods.requests import EditRequest
from remedi.models import LoadedModel
from remedi.registry import Edited, Method, as_cases, register


def same_relation(a: EditCase, b: EditCase) -> bool:
    """Whether two cases ask about the same relation (see the module docstring)."""
    if a.relation_id and b.relation_id:
        return a.relation_id == b.relation_id
    return a.prompt == b.prompt


def _norm(text: str | None) -> str:
    return " ".join(str(text or "").split()).casefold()


def partners(case: EditCase, pool: Sequence[EditCase]) -> list[EditCase]:
    """Cases of ``pool`` about another subject, of the same relation, whose true object is
    ``case.target_new``, one per subject, in pool order."""
    wanted = _norm(case.target_new)
    found: dict[str, EditCase] = {}
    for other in pool:
        if (
            _norm(other.target_true) == wanted
            and other.subject != case.subject
            and other.subject not in found
            and same_relation(case, other)
        ):
            found[other.subject] = other
    return list(found.values())


def replace_subject(case: EditCase, subject: str) -> EditCase:
    """``case`` with ``subject`` in place of its subject in the prompts that mention it (rewrite
    template, paraphrase and generation prompts); neighborhood and attribute prompts are kept."""
    return dataclasses.replace(
        case,
        subject=subject,
        paraphrase_prompts=[p.replace(case.subject, subject) for p in case.paraphrase_prompts],
        generation_prompts=[p.replace(case.subject, subject) for p in case.generation_prompts],
    )


def replaced_cases(
    cases: Sequence[EditCase], pool: Sequence[EditCase] | None = None, seed: int = 0
) -> list[EditCase | None]:
    """Each case with a partner's subject put in (None where no partner exists in ``pool``,
    default ``cases``); the partner is a seeded random choice among :func:`partners`."""
    pool = cases if pool is None else pool
    out: list[EditCase | None] = []
    for case in cases:
        found = partners(case, pool)
        if not found:
            out.append(None)
            continue
        other = random.Random(f"{seed}:{case.case_id}").choice(found)
        out.append(replace_subject(case, other.subject))
    return out


class Replaced(Edited):
    """The model unchanged; each request's prompts carry its partner's subject instead."""

    def __init__(self, lm: LoadedModel, cases: Sequence[EditCase], swapped: list[EditCase | None]):
        super().__init__(lm, cases)
        self.swapped = swapped

    def scored_case(self, index: int, case: EditCase) -> EditCase | None:
        return self.swapped[index]

    def sampled_case(self, index: int, case: EditCase) -> EditCase:
        return self.swapped[index] or case


@register
class Replace(Method):
    """``replace``: score the prompts with another subject that truly has the new object,
    drawn from the evaluation's pool of cases (cases without one are skipped)."""

    name = "replace"
    order = 2
    timed = False
    summary = "no edit: another subject whose true object is target_new put in (REMEDI's baseline)"
    edits_input = True
    edits_neighbors = False
    random = True
    group_size = 8

    @contextmanager
    def edit(self, lm: LoadedModel, requests: Sequence[EditRequest | EditCase]) -> Iterator[Edited]:
        cases = as_cases(requests)
        pool = self.environment.pool or cases
        yield Replaced(lm, cases, replaced_cases(cases, pool, self.environment.seed))
