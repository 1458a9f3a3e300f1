"""KE, KnowledgeEditor (De Cao et al. 2021): the edit's gradient reshaped by a rank-1 mask and a
rank-1 offset that a hyper-network predicts from the edit request (METHODS.md §2; plain PyTorch).

A bidirectional LSTM reads the request (``rewrite prompt + " " + target_new``, as the frozen LM's
input embeddings) into a condition ``c``. For each edited layer, linear heads give ``a, b``
(``[out]``), ``γ, ω`` (``[in]``) and ``η``, and the update is

    ΔW = −α_l σ(η) [ (σ(a) γᵀ) ⊙ Σ_t δ_t u_tᵀ + σ(b) ωᵀ ],

which stays factored: ``(σ(a) ⊙ δ_t)(γ ⊙ u_t)ᵀ`` per token plus one offset term. **Ours:** ``u``
and ``δ`` are first standardised per dimension by running statistics (as MEND does), so that the
learned step ``α_l`` does not depend on the model's gradient scale; the heads start at zero
weights, so an untrained KE takes the scaled gradient step ``−α_l/4 Σ δ uᵀ``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from remedi.data import EditCase
from remedi.editors.gradient import GradientEditor, LayerUpdate, RunningNorm, TokenGradients
from remedi.models import LoadedModel


class KeEditor(GradientEditor):
    """KE over the MLP output projections of ``layers``.

    Args:
        layers: edited blocks (0-indexed).
        in_features / out_features: the projection's input and output widths.
        embed_dim: width of the LM's input embeddings (what the request encoder reads).
        hidden: LSTM width per direction.
        init_step: initial step size ``α`` of every layer.
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
    ) -> None:
        super().__init__(layers, in_features, out_features)
        self.encoder = nn.LSTM(embed_dim, hidden, batch_first=True, bidirectional=True)
        width = 2 * out_features + 2 * in_features + 1
        heads = [nn.Linear(2 * hidden, width) for _ in self.layers]
        for head in heads:
            with torch.no_grad():
                head.weight.zero_()
                head.bias.zero_()
                head.bias[out_features : out_features + in_features] = 1.0  # γ = 1
        self.heads = nn.ModuleList(heads)
        self.norm = RunningNorm(in_features + out_features)
        self.steps = nn.Parameter(torch.full((len(self.layers),), float(init_step)))

    def step_parameters(self) -> list[nn.Parameter]:
        return [self.steps]

    def condition(self, lm: LoadedModel, cases: Sequence[EditCase]) -> torch.Tensor:
        """``[requests, 2 * hidden]``: the mean LSTM state over each request's tokens."""
        texts = [c.edit_statement for c in cases]
        rows = [lm.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        lengths = torch.tensor([max(len(r), 1) for r in rows])
        ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        with torch.no_grad():
            embedded = lm.arch.embed(ids.to(lm.device)).float()
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
