"""remedi: locate and edit the factual knowledge stored inside causal language models.

The Python API (importing ``remedi`` loads nothing heavy; each name is imported on first use):

    import remedi
    lm = remedi.load_model()
    rome = remedi.editor("rome")
    with rome.edit(lm, [remedi.EditRequest("{} is in", "The Eiffel Tower", "Italy")]) as edited:
        print(remedi.generate(edited, "The Eiffel Tower is in"))
    rows = remedi.compare(lm, ["none", rome], remedi.load_cases("builtin:test")[:10])
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_API = {
    "load_model": ("remedi.models", "load_model"),
    "editor": ("remedi.registry", "editor"),
    "list_editors": ("remedi.registry", "names"),
    "register": ("remedi.registry", "register"),
    "Method": ("remedi.registry", "Method"),
    "EditRequest": ("remedi.methods.requests", "EditRequest"),
    "EditCase": ("remedi.data", "EditCase"),
    "load_cases": ("remedi.data", "load_spec"),
    "compare": ("remedi.evaluation.compare", "compare"),
    "generate": ("remedi.api", "generate"),
}
"""Public name -> (module, attribute)."""

__all__ = [
    "EditCase",
    "EditRequest",
    "Method",
    "__version__",
    "compare",
    "editor",
    "generate",
    "list_editors",
    "load_cases",
    "load_model",
    "register",
]

if TYPE_CHECKING:
    from remedi.api import generate
    from remedi.data import EditCase
    from remedi.data import load_spec as load_cases
    from remedi.evaluation.compare import compare
    from remedi.methods.requests import EditRequest
    from remedi.models import load_model
    from remedi.registry import Method, editor, register
    from remedi.registry import names as list_editors


def __getattr__(name: str) -> Any:
    if name in _API:
        module, attribute = _API[name]
        value = getattr(import_module(module), attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'remedi' has no attribute {name!r}")
