"""The one way to read, add to or replace a hidden state at (layer, token) of a causal LM.

A :class:`Site` names a state: the token embeddings, the output of a transformer block, of its
attention or MLP, or the input of the MLP output projection (``mlp_in``, the "neurons").
:func:`intervene` registers forward hooks for the sites it is given, records and/or edits their
tensors, and always removes the hooks on exit. Edits are out-of-place, so gradients flow
through them.

    with intervene(arch, record=[Site("block", 3)]) as states:
        model(**batch)
    h = states[Site("block", 3)]            # [batch, seq, hidden]

    delta = add_at(positions, vectors)       # per-row token positions
    with intervene(arch, edit={Site("block", 1): delta}):
        logits = model(**batch).logits
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch.utils.hooks import RemovableHandle

from remedi.models.architectures import Arch

SiteKind = Literal["embed", "block", "attn", "mlp", "mlp_in"]
SITE_KINDS: tuple[str, ...] = ("embed", "block", "attn", "mlp", "mlp_in")
EditFn = Callable[[torch.Tensor], torch.Tensor]
Positions = torch.Tensor | Sequence[int] | Sequence[Sequence[int]]


@dataclass(frozen=True)
class Site:
    """A hidden state: ``kind`` at transformer layer ``layer`` (0-indexed).

    ``embed`` is the output of the token embedding (use :data:`EMBEDDINGS`; its layer is 0).
    """

    kind: SiteKind
    layer: int

    def __post_init__(self) -> None:
        if self.kind not in SITE_KINDS:
            raise ValueError(f"site kind {self.kind!r} is not one of {', '.join(SITE_KINDS)}")


EMBEDDINGS = Site("embed", 0)


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early; :func:`intervene` swallows it."""


def _module_for(arch: Arch, site: Site) -> torch.nn.Module:
    if site.kind == "mlp_in":
        return arch.mlp_out(site.layer)
    if site.kind == "embed":
        return arch.embed
    return arch.module(site.kind, site.layer)


@contextmanager
def intervene(
    arch: Arch,
    *,
    record: Iterable[Site] = (),
    edit: Mapping[Site, EditFn] | None = None,
    stop_after: Site | None = None,
    prompt_pass_only: bool = False,
) -> Iterator[dict[Site, torch.Tensor]]:
    """Record and/or edit hidden states during the forward passes run inside the block.

    Args:
        arch: the architecture map of the model that will be run.
        record: sites whose (edited) tensors are stored in the yielded dict, keeping their graph.
        edit: per site, a function from the state ``[batch, seq, width]`` to its replacement.
        stop_after: end the forward pass once this site has been computed (saves the later
            layers when only early states are needed); the model call then returns nothing.
        prompt_pass_only: apply edits only on each module's first call, i.e. the prompt pass of
            ``generate`` with a KV cache, and not on the decoding steps.
    """
    edits = dict(edit or {})
    wanted = set(record)
    sites = wanted | set(edits)
    if stop_after is not None:
        sites.add(stop_after)
    recorded: dict[Site, torch.Tensor] = {}
    calls: dict[Site, int] = dict.fromkeys(sites, 0)

    def process(site: Site, state: torch.Tensor) -> torch.Tensor:
        calls[site] += 1
        fn = edits.get(site)
        if fn is not None and not (prompt_pass_only and calls[site] > 1):
            state = fn(state)
        if site in wanted:
            recorded[site] = state
        return state

    def output_hook(site: Site) -> Callable[..., Any]:
        def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> Any:
            if isinstance(output, tuple):
                result: Any = (process(site, output[0]), *output[1:])
            else:
                result = process(site, output)
            if site == stop_after:
                raise StopForward
            return result

        return hook

    def input_hook(site: Site) -> Callable[..., Any]:
        def hook(_module: torch.nn.Module, inputs: tuple[Any, ...]) -> Any:
            result = (process(site, inputs[0]), *inputs[1:])
            if site == stop_after:  # the module itself need not run
                raise StopForward
            return result

        return hook

    handles: list[RemovableHandle] = []
    try:
        for site in sites:
            module = _module_for(arch, site)
            if site.kind == "mlp_in":
                handles.append(module.register_forward_pre_hook(input_hook(site)))
            else:
                handles.append(module.register_forward_hook(output_hook(site)))
        yield recorded
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()


def count_hooks(model: torch.nn.Module) -> int:
    """How many forward, forward-pre and backward hooks are registered on ``model``'s modules.

    Zero on a frozen LM between edits: every hook placed by :func:`intervene` (or by a method's
    own recorder) is removed on exit, so a nonzero count after an edit or an evaluation is a leak.
    """
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return sum(len(getattr(module, kind, {})) for module in model.modules() for kind in kinds)


def position_index(positions: Positions, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn per-row token positions into ``(rows, cols)`` index tensors.

    ``positions`` is one position per row (``[batch]`` tensor or list of ints) or a list of
    position lists, one per row (rows may differ in length).
    """
    if isinstance(positions, torch.Tensor):
        if positions.dim() != 1:
            raise ValueError(f"positions tensor must be 1-D (one per row), got {positions.shape}")
        cols = positions.to(device=device, dtype=torch.long)
        return torch.arange(len(cols), device=device), cols
    rows: list[int] = []
    cols_list: list[int] = []
    for row, pos in enumerate(positions):
        row_positions = (
            [pos] if isinstance(pos, int) else [int(p) for p in cast(Sequence[int], pos)]
        )
        rows.extend([row] * len(row_positions))
        cols_list.extend(row_positions)
    return (
        torch.tensor(rows, dtype=torch.long, device=device),
        torch.tensor(cols_list, dtype=torch.long, device=device),
    )


def _per_index(values: torch.Tensor, rows: torch.Tensor, n_batch: int) -> torch.Tensor:
    """Broadcast ``values`` ([width], [batch, width] or [n_index, width]) to one row per index."""
    if values.dim() == 1:
        return values.expand(len(rows), -1)
    if values.shape[0] == n_batch and len(rows) != n_batch:
        return values[rows]
    if values.shape[0] == len(rows):
        return values
    raise ValueError(
        f"values of shape {tuple(values.shape)} match neither the batch ({n_batch}) "
        f"nor the number of edited positions ({len(rows)})"
    )


def add_at(positions: Positions, vectors: torch.Tensor, scale: float = 1.0) -> EditFn:
    """Edit that adds ``scale * vectors`` to the state at the given token positions of each row."""

    def fn(state: torch.Tensor) -> torch.Tensor:
        rows, cols = position_index(positions, state.device)
        delta = _per_index(vectors, rows, state.shape[0]).to(state.dtype)
        return state.index_put((rows, cols), state[rows, cols] + scale * delta)

    return fn


def replace_at(positions: Positions, values: torch.Tensor) -> EditFn:
    """Edit that overwrites the state at the given token positions of each row with ``values``."""

    def fn(state: torch.Tensor) -> torch.Tensor:
        rows, cols = position_index(positions, state.device)
        new = _per_index(values, rows, state.shape[0]).to(state.dtype)
        return state.index_put((rows, cols), new)

    return fn


def scale_at(
    positions: Positions, scale: torch.Tensor | float, units: torch.Tensor | None = None
) -> EditFn:
    """Edit that multiplies the state at the given positions by ``scale``.

    ``units`` (a 1-D index tensor) restricts the scaling to those hidden units, e.g. a few
    knowledge neurons of an ``mlp_in`` site; ``scale`` may be a scalar or one value per row.
    """

    def fn(state: torch.Tensor) -> torch.Tensor:
        rows, cols = position_index(positions, state.device)
        picked = state[rows, cols]
        factor = torch.as_tensor(scale, dtype=state.dtype, device=state.device)
        if factor.dim() == 1 and factor.shape[0] == state.shape[0]:
            factor = factor[rows]
        factor = factor.reshape(-1, 1) if factor.dim() == 1 else factor
        if units is None:
            new = picked * factor
        else:
            new = picked.clone()
            new[:, units] = picked[:, units] * factor
        return state.index_put((rows, cols), new)

    return fn
