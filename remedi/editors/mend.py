"""MEND (Mitchell et al. 2021): a meta-learned network that rewrites the fine-tuning gradient of an
edit request into a weight update (METHODS.md §2; plain PyTorch).

Each token's layer input ``u`` and output gradient ``δ`` are concatenated, standardised per
dimension by running statistics, and passed through two residual low-rank blocks
``z + relu(s_l ⊙ (U V z + b) + o_l)`` with a per-layer scale ``s_l`` and shift ``o_l``; ``U``
starts at zero, so an untrained network is the identity. One network serves every edited layer
of the same weight shape. The update is ``ΔW = −α_l Σ_t δ̃_t ũ_tᵀ`` with a learned step ``α_l``
per layer (the reference adds instead of subtracting, a known bug; this subtracts).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from remedi.data import EditCase
from remedi.editors.gradient import (
    GradientEditor,
    LayerUpdate,
    Positions,
    RunningNorm,
    TokenGradients,
)
from remedi.models import LoadedModel


class LowRankBlock(nn.Module):
    """``z + relu(s_l ⊙ (U V z + b) + o_l)``; ``U = 0`` at initialisation (identity).

    The ReLU is ``clamp(min=0)``, whose gradient at 0 is 1, so the zero-initialised ``U`` gets
    a gradient on the first step.
    """

    def __init__(self, dim: int, rank: int, n_layers: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Parameter(torch.zeros(dim, rank))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.scale = nn.Parameter(torch.ones(n_layers, dim))
        self.shift = nn.Parameter(torch.zeros(n_layers, dim))

    def forward(self, z: torch.Tensor, slot: int) -> torch.Tensor:
        hidden = self.down(z) @ self.up.T + self.bias
        return z + (hidden * self.scale[slot] + self.shift[slot]).clamp(min=0)


class MendNetwork(nn.Module):
    """The gradient transform ``g`` for one weight shape ``[out, in]``, shared by ``n_layers``."""

    def __init__(self, in_features: int, out_features: int, rank: int, n_layers: int) -> None:
        super().__init__()
        dim = in_features + out_features
        self.in_features = in_features
        self.norm = RunningNorm(dim)
        self.blocks = nn.ModuleList(LowRankBlock(dim, rank, n_layers) for _ in range(2))

    def forward(
        self, u: torch.Tensor, delta: torch.Tensor, slot: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.norm(torch.cat([u, delta], -1))
        for block in self.blocks:
            z = block(z, slot)
        return z[:, : self.in_features], z[:, self.in_features :]


class MendEditor(GradientEditor):
    """MEND over the MLP output projections of ``layers``.

    Args:
        layers: edited blocks (0-indexed).
        in_features / out_features: the projection's input and output widths.
        rank: rank of the low-rank blocks.
        init_step: initial step size ``α`` of every layer.
        positions: which prompt tokens feed ``(u, δ)`` (:data:`~remedi.editors.gradient.POSITIONS`).
    """

    method = "mend"

    def __init__(
        self,
        layers: Sequence[int],
        in_features: int,
        out_features: int,
        rank: int = 256,
        init_step: float = 1e-4,
        positions: Positions = "all",
    ) -> None:
        super().__init__(layers, in_features, out_features, positions)
        if rank < 1:
            raise ValueError(f"rank must be positive, got {rank}")
        self.network = MendNetwork(in_features, out_features, rank, len(self.layers))
        self.steps = nn.Parameter(torch.full((len(self.layers),), float(init_step)))

    def step_parameters(self) -> list[nn.Parameter]:
        return [self.steps]

    def transform(
        self, lm: LoadedModel, grads: Sequence[TokenGradients], cases: Sequence[EditCase]
    ) -> list[LayerUpdate]:
        updates = []
        for slot, g in enumerate(grads):
            u, delta = self.network(g.inputs, g.grads, slot)
            updates.append(LayerUpdate(g.layer, u, delta, g.groups, self.steps[slot]))
        return updates
