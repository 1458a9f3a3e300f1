"""Reversible weight edits: every method that writes LM weights returns an :class:`EditHandle`.

handle = backup(model, ["model.layers.4.mlp.down_proj.weight"])
...write the weights in place...
handle.restore()          # bitwise the original values

with rome.apply_edit(lm, request) as handle:   # methods return a handle; `with` restores
    ...evaluate the edited model...

A method writes its weights, and records its ``info``, inside ``with restored_on_error(handle):``
so that a failure midway (an error, a ``KeyboardInterrupt``) never leaves the LM half-edited.
Restoring copies the saved originals back rather than subtracting the update, which would not
round-trip in bfloat16 or float16.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from types import TracebackType

import torch
from torch import nn


class EditHandle:
    """Copies of the original values of edited parameters; :meth:`restore` writes them back.

    Also a context manager that restores on exit, exceptions included. ``info`` carries whatever
    the method wants to report (e.g. ROME's key and value vectors).
    """

    def __init__(self, params: dict[str, nn.Parameter], info: dict[str, object] | None = None):
        self._params = params
        self._originals = {name: p.detach().clone() for name, p in params.items()}
        self.info: dict[str, object] = dict(info or {})
        self.restored = False

    @property
    def names(self) -> list[str]:
        return list(self._params)

    def original(self, name: str) -> torch.Tensor:
        return self._originals[name]

    def restore_one(self, name: str) -> None:
        """Put parameter ``name`` back exactly as it was."""
        with torch.no_grad():
            self._params[name].copy_(self._originals[name])

    def restore(self) -> None:
        """Put every edited parameter back exactly as it was (idempotent)."""
        with torch.no_grad():
            for name, param in self._params.items():
                param.copy_(self._originals[name])
        self.restored = True

    def __enter__(self) -> EditHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.restore()


@contextmanager
def restored_on_error(handle: EditHandle) -> Iterator[EditHandle]:
    """Restore ``handle``'s parameters bitwise if the block raises (then re-raise): a method
    wraps its weight writes and its bookkeeping in this, so it returns a handle or leaves the
    LM exactly as it found it."""
    try:
        yield handle
    except BaseException:
        handle.restore()
        raise


def backup(model: nn.Module, names: Iterable[str]) -> EditHandle:
    """Snapshot the named parameters of ``model`` before editing them in place."""
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise KeyError(f"model has no parameter(s) {missing}")
    return EditHandle({n: params[n] for n in names})


def param_name(model: nn.Module, param: torch.Tensor) -> str:
    """The qualified name of ``param`` inside ``model`` (for a module's ``weight``, say)."""
    for name, candidate in model.named_parameters():
        if candidate is param:
            return name
    raise KeyError("parameter does not belong to the model")
