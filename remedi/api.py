"""Helpers of the Python API that belong to no single module (see :mod:`remedi`)."""

from __future__ import annotations

from typing import Any

from remedi.models import LoadedModel
from remedi.registry import Edited
from remedi.tokens import generate_text


def generate(
    model: LoadedModel | Edited, prompt: str, max_new_tokens: int = 20, **kwargs: Any
) -> str:
    """The continuation of ``prompt`` by ``model``: a loaded model, or one under an edit (then
    with the edit's prefix or hooks), greedy unless ``kwargs`` (``model.generate``'s) say
    otherwise; the new text only."""
    if isinstance(model, Edited):
        return model.generate(prompt, max_new_tokens, **kwargs)
    return generate_text(model, prompt, max_new_tokens, **kwargs)
