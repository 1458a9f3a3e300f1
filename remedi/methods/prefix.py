"""``prefix``: the edit stated in the input. Each prompt of a request is scored after the
request's statement (``rewrite_prompt + " " + target_new + ". "``); the weights stay as they are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from remedi.data import EditCase
from remedi.metrics.generation import GenerationEdit
from remedi.models import LoadedModel
from remedi.registry import Edited, Method, as_cases, register


def statement(case: EditCase) -> str:
    """The text put before every prompt of ``case``."""
    return f"{case.edit_statement}. "


def prefix_case(case: EditCase) -> EditCase:
    """The case with its new fact stated before every prompt."""
    context = statement(case)
    return dataclasses.replace(
        case,
        prompt=context + case.prompt,
        paraphrase_prompts=[context + p for p in case.paraphrase_prompts],
        neighborhood_prompts=[context + p for p in case.neighborhood_prompts],
    )


class Prefixed(Edited):
    """The model unchanged; each request's prompts are read after its statement (free text
    after every request's statement)."""

    def scored_case(self, index: int, case: EditCase) -> EditCase | None:
        return prefix_case(case)

    def generation(self, index: int) -> tuple[str, GenerationEdit | None]:
        return statement(self.cases[index]), None

    def text_prefix(self) -> str:
        return "".join(statement(case) for case in self.cases)

    def generate(self, prompt: str, max_new_tokens: int = 20, **kwargs: Any) -> str:
        return super().generate(self.text_prefix() + prompt, max_new_tokens, **kwargs)


@register
class Prefix(Method):
    """State the new fact before the prompt (in-context editing)."""

    name = "prefix"
    order = 1
    timed = False
    summary = "no weight change: the new fact stated before every prompt"
    edits_input = True
    group_size = 8

    @contextmanager
    def edit(self, lm: LoadedModel, requests: Sequence[Any]) -> Iterator[Edited]:
        yield Prefixed(lm, as_cases(requests))
