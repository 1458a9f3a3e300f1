"""zsRE locality prompts that are not edit questions of the same evaluation.

Some zsRE files (EasyEdit's conversion of the zsRE dev set among them: 424 of its 500 records)
use another record's question as a record's locality prompt, so an evaluation that edits both
records, or MEMIT's batch, confounds locality with its own edits. :func:`disjoint_locality`
replaces every locality prompt that is some record's question by the question of a held-out
record: one of the file not edited in this run, whose subject no edited record has.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from remedi.data.cases import EditCase


def disjoint_locality(
    cases: Sequence[EditCase], pool: Sequence[EditCase]
) -> tuple[list[EditCase], str]:
    """``cases`` with their locality prompts disjoint from every edit question of ``pool``
    (the whole file), and how they were chosen, in words for the protocol. CounterFact cases
    pass through. A ``ValueError`` when prompts need replacing and no held-out record is left."""
    questions = {q for c in pool for q in (c.rewrite_prompt, *c.paraphrase_prompts)}
    edited_ids = {c.case_id for c in cases}
    edited_subjects = {c.subject for c in cases}
    held_out = [
        c
        for c in pool
        if c.benchmark == "zsre"
        and c.case_id not in edited_ids
        and c.subject not in edited_subjects
    ]
    out: list[EditCase] = []
    replaced = total = 0
    for case in cases:
        if case.benchmark != "zsre":
            out.append(case)
            continue
        answers = case.neighborhood_targets or [case.target_true] * len(case.neighborhood_prompts)
        prompts: list[str] = []
        targets: list[str] = []
        for prompt, answer in zip(case.neighborhood_prompts, answers, strict=True):
            total += 1
            if prompt not in questions:
                prompts.append(prompt)
                targets.append(answer)
                continue
            if not held_out:
                raise ValueError(
                    f"case {case.case_id}: its locality prompt is an edit question of the data, "
                    "and no record is left out of the evaluation to take one from (use --limit)"
                )
            donor = held_out[replaced % len(held_out)]
            prompts.append(donor.rewrite_prompt)
            targets.append(donor.target_true)
            replaced += 1
        out.append(
            dataclasses.replace(case, neighborhood_prompts=prompts, neighborhood_targets=targets)
        )
    if total == 0:
        return out, "none"
    if replaced == 0:
        return out, "the file's own"
    return out, (
        f"{replaced} of {total} replaced by held-out records' questions (the file's were edit "
        "questions of its records)"
    )
