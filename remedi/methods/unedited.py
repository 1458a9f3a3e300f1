"""``none``: the unedited model, scored like every method (the table's reference row)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

from remedi.models import LoadedModel
from remedi.registry import Edited, Method, as_cases, no_edit, register


@register
class Unedited(Method):
    """No edit at all."""

    name = "none"
    order = 0
    timed = False
    summary = "the unedited model (the reference row)"
    group_size = 8

    def edit(self, lm: LoadedModel, requests: Sequence[Any]) -> AbstractContextManager[Edited]:
        return no_edit(lm, as_cases(requests))
