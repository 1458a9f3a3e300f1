"""REMEDI editor networks: map an attribute representation h_a (and, for biaffine, the entity
state h_e) to a direction d that is added to the entity's hidden state."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

EditorKind = Literal["affine", "low_rank", "biaffine", "mlp", "identity", "null"]
EDITOR_KINDS: tuple[str, ...] = ("affine", "low_rank", "biaffine", "mlp", "identity", "null")


class Editor(nn.Module):
    """Base class: ``forward(attribute [n, hidden], entity [n, hidden] | None) -> d [n, hidden]``.

    Trainable editors start with a zero output layer, i.e. as the unedited model (d = 0), so
    training starts from KL = 0 instead of from a random, possibly huge, direction.

    ``uses_entity`` says whether the editor reads the entity state (then the caller must pass it).
    """

    uses_entity: bool = False

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        if hidden_size <= 0:
            raise ValueError(f"hidden_size must be positive, got {hidden_size}")
        self.hidden_size = hidden_size

    def direction(self, attribute: torch.Tensor, entity: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, attribute: torch.Tensor, entity: torch.Tensor | None = None) -> torch.Tensor:
        if self.uses_entity and entity is None:
            raise ValueError(f"{type(self).__name__} needs the entity state")
        param = next(self.parameters(), None)
        dtype = param.dtype if param is not None else torch.float32
        ent = None if entity is None else entity.to(dtype)
        return self.direction(attribute.to(dtype), ent)


class AffineEditor(Editor):
    """``d = W h_a + b`` with a full ``hidden x hidden`` matrix (REMEDI's default)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__(hidden_size)
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def direction(self, attribute: torch.Tensor, entity: torch.Tensor | None) -> torch.Tensor:
        return self.linear(attribute)


class LowRankEditor(Editor):
    """``d = W2 W1 h_a + b`` with ``W1: rank x hidden`` and ``W2: hidden x rank``."""

    def __init__(self, hidden_size: int, rank: int = 64) -> None:
        super().__init__(hidden_size)
        if not 0 < rank <= hidden_size:
            raise ValueError(f"rank must be in 1..{hidden_size}, got {rank}")
        self.down = nn.Linear(hidden_size, rank, bias=False)
        self.up = nn.Linear(rank, hidden_size)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def direction(self, attribute: torch.Tensor, entity: torch.Tensor | None) -> torch.Tensor:
        return self.up(self.down(attribute))


class BiaffineEditor(Editor):
    """``d = W_a h_a + W_e h_e + b``: the direction may depend on the entity being edited."""

    uses_entity = True

    def __init__(self, hidden_size: int) -> None:
        super().__init__(hidden_size)
        self.attribute_map = nn.Linear(hidden_size, hidden_size)
        self.entity_map = nn.Linear(hidden_size, hidden_size, bias=False)
        for param in self.parameters():
            nn.init.zeros_(param)

    def direction(self, attribute: torch.Tensor, entity: torch.Tensor | None) -> torch.Tensor:
        assert entity is not None
        return self.attribute_map(attribute) + self.entity_map(entity)


class MLPEditor(Editor):
    """``d = W2 gelu(W1 h_a + b1) + b2``, a one-hidden-layer network."""

    def __init__(self, hidden_size: int, width: int | None = None) -> None:
        super().__init__(hidden_size)
        width = width or hidden_size
        if width <= 0:
            raise ValueError(f"mlp width must be positive, got {width}")
        out = nn.Linear(width, hidden_size)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.net = nn.Sequential(nn.Linear(hidden_size, width), nn.GELU(), out)

    def direction(self, attribute: torch.Tensor, entity: torch.Tensor | None) -> torch.Tensor:
        return self.net(attribute)


class IdentityEditor(Editor):
    """``d = h_a``: adds the attribute representation itself (a control with no parameters)."""

    def direction(self, attribute: torch.Tensor, entity: torch.Tensor | None) -> torch.Tensor:
        return attribute.float()


class NullEditor(Editor):
    """``d = 0``: the unedited model behind the same interface (a control)."""

    def direction(self, attribute: torch.Tensor, entity: torch.Tensor | None) -> torch.Tensor:
        return torch.zeros_like(attribute, dtype=torch.float32)


def build_editor(
    kind: str, hidden_size: int, rank: int = 64, mlp_width: int | None = None
) -> Editor:
    """An editor of ``kind`` (see :data:`EDITOR_KINDS`) for states of width ``hidden_size``."""
    if kind == "affine":
        return AffineEditor(hidden_size)
    if kind == "low_rank":
        return LowRankEditor(hidden_size, rank)
    if kind == "biaffine":
        return BiaffineEditor(hidden_size)
    if kind == "mlp":
        return MLPEditor(hidden_size, mlp_width)
    if kind == "identity":
        return IdentityEditor(hidden_size)
    if kind == "null":
        return NullEditor(hidden_size)
    raise ValueError(f"editor {kind!r} is not one of {', '.join(EDITOR_KINDS)}")
