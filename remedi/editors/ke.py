"""KE, KnowledgeEditor (De Cao et al. 2021): the edit's gradient reshaped by a rank-1 mask and a
rank-1 offset that a hyper-network predicts from the edit request (METHODS.md §2; plain PyTorch).

A bidirectional LSTM reads the request, as the paper conditions it: the rewrite prompt ``x``,
the true object ``y`` and the new object ``a``, each as the frozen LM's input embeddings plus a
learned embedding of its segment, into a condition ``c`` (the mean of its states). For each edited
layer a conditioner (a two-layer tanh network) gives ``a, b`` (``[out]``), ``γ, ω`` (``[in]``) and
``η``, and the update is

    ΔW = −α_l σ(η) [ (σ(a) γᵀ) ⊙ Σ_t δ_t u_tᵀ + σ(b) ωᵀ ],

which stays factored: ``(σ(a) ⊙ δ_t)(γ ⊙ u_t)ᵀ`` per token plus one offset term. **Ours:** ``u``
and ``δ`` are first standardised per dimension by running statistics (as MEND does), so that the
learned step ``α_l`` does not depend on the model's gradient scale; each conditioner's output
layer starts at zero, so an untrained KE takes the scaled gradient step ``−α_l/4 Σ δ uᵀ``.
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


class KeEditor(GradientEditor):
    """KE over the MLP output projections of ``layers``.

    Args:
        layers: edited blocks (0-indexed).
        in_features / out_features: the projection's input and output widths.
        embed_dim: width of the LM's input embeddings (what the request encoder reads).
        hidden: LSTM width per direction.
        init_step: initial step size ``α`` of every layer.
        positions: which prompt tokens feed ``(u, δ)`` (:data:`~remedi.editors.gradient.POSITIONS`).
    """

    method = "ke"

    def __init__(
        self,
        layers: Sequence[int],
        in_features: int,
        out_features: int,
        embed_dim: int,
        hidden: int = 128,
        init_step: float = 1e-4,
        positions: Positions = "all",
    ) -> None:
        super().__init__(layers, in_features, out_features, positions)
        self.segments = nn.Parameter(torch.zeros(3, embed_dim))  # prompt, true, new object
        self.encoder = nn.LSTM(embed_dim, hidden, batch_first=True, bidirectional=True)
        width = 2 * out_features + 2 * in_features + 1
        self.heads = nn.ModuleList(
            _conditioner(2 * hidden, width, out_features, in_features) for _ in self.layers
        )
        self.norm = RunningNorm(in_features + out_features)
        self.steps = nn.Parameter(torch.full((len(self.layers),), float(init_step)))

    def step_parameters(self) -> list[nn.Parameter]:
        return [self.steps]

    def condition(self, lm: LoadedModel, cases: Sequence[EditCase]) -> torch.Tensor:
        """``[requests, 2 * hidden]``: the mean LSTM state over each request's tokens (its
        rewrite prompt, `` target_true`` and `` target_new``, each with its segment's
        embedding)."""
        rows: list[list[int]] = []
        kinds: list[list[int]] = []
        for case in cases:
            parts = (case.rewrite_prompt, f" {case.target_true}", f" {case.target_new}")
            pieces = [lm.tokenizer(t, add_special_tokens=False)["input_ids"] for t in parts]
            rows.append([t for piece in pieces for t in piece])
            kinds.append([k for k, piece in enumerate(pieces) for _ in piece])
        lengths = torch.tensor([max(len(r), 1) for r in rows])
        ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
        segment = torch.zeros_like(ids)
        for i, (row, kind) in enumerate(zip(rows, kinds, strict=True)):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            segment[i, : len(kind)] = torch.tensor(kind, dtype=torch.long)
        with torch.no_grad():
            embedded = lm.arch.embed(ids.to(lm.device)).float()
        embedded = embedded + self.segments[segment.to(lm.device)]
        packed = nn.utils.rnn.pack_padded_sequence(
            embedded, lengths, batch_first=True, enforce_sorted=False
        )
        out, _ = self.encoder(packed)
        states, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True)
        mask = (torch.arange(states.shape[1])[None, :] < lengths[:, None]).to(states)
        return (states * mask[..., None]).sum(1) / lengths[:, None].to(states)

    def transform(
        self, lm: LoadedModel, grads: Sequence[TokenGradients], cases: Sequence[EditCase]
    ) -> list[LayerUpdate]:
        cond = self.condition(lm, cases)
        n_out, n_in = self.out_features, self.in_features
        updates = []
        for slot, g in enumerate(grads):
            z = self.norm(torch.cat([g.inputs, g.grads], -1))
            u, delta = z[:, :n_in], z[:, n_in:]
            head = self.heads[slot](cond)
            a, gamma, b, omega, eta = head.split([n_out, n_in, n_out, n_in, 1], -1)
            gate = torch.sigmoid(eta)  # [requests, 1]
            out_mask = torch.sigmoid(a) * gate
            groups = torch.arange(len(cases), device=g.groups.device)
            updates.append(
                LayerUpdate(
                    g.layer,
                    torch.cat([gamma[g.groups] * u, omega]),
                    torch.cat([out_mask[g.groups] * delta, torch.sigmoid(b) * gate]),
                    torch.cat([g.groups, groups]),
                    self.steps[slot],
                )
            )
        return updates


def _conditioner(width_in: int, width_out: int, n_out: int, n_in: int) -> nn.Sequential:
    """One layer's conditioner ``c ↦ (a, γ, b, ω, η)``: linear, tanh, linear; the output layer
    starts at zero weights with ``γ = 1`` (an untrained editor scales the gradient step)."""
    out = nn.Linear(width_in, width_out)
    with torch.no_grad():
        out.weight.zero_()
        out.bias.zero_()
        out.bias[n_out : n_out + n_in] = 1.0
    return nn.Sequential(nn.Linear(width_in, width_in), nn.Tanh(), out)
