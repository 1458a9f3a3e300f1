"""Gradient-based learned editors (MEND, KE): the machinery they share, in plain PyTorch.

For a linear layer ``y = W u`` the gradient of a loss is ``Σ_t δ_t u_tᵀ`` over tokens ``t``
(``u``: the layer's input, ``δ``: the loss gradient with respect to its output). A learned editor
maps each token's ``(u, δ)`` to ``(ũ, δ̃)``; the update is ``ΔW = −α Σ_t δ̃_t ũ_tᵀ``. Here the edited
layers are MLP output projections (``arch.mlp_out``), read through :mod:`remedi.hooks`:
``u`` is the ``mlp_in`` site and ``δ`` the gradient at the ``mlp`` site.

Updates stay factored (:class:`LayerUpdate`). During training they are applied by hooks
(:func:`apply_updates`), so the frozen LM's stored weights never change and every request edits
only its own rows of a batch; at evaluation time :func:`write_updates` adds them to the weights
and returns an :class:`~remedi.methods.weights.EditHandle` that restores them exactly.

    editor = MendEditor(layers=[15, 16, 17], in_features=2048, out_features=640)
    with editor.apply_edit(lm, cases):     # one summed update for all cases
        ...the LM is edited...
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from remedi.data import EditCase
from remedi.hooks import EditFn, Site, intervene
from remedi.methods.rome import mlp_out_param
from remedi.methods.weights import EditHandle, backup, param_name, restored_on_error
from remedi.models import LoadedModel
from remedi.tokens import ContinuationBatch, encode_continuations, score_continuations

Positions = Literal["all", "subject", "subject_last"]
"""Which tokens of the rewrite prompt feed an editor's ``(u, δ)``: every token with a gradient
(MEND's reference), the subject's tokens, or the subject's last token only (ROME's key)."""
POSITIONS: tuple[Positions, ...] = ("all", "subject", "subject_last")


@dataclass
class TokenGradients:
    """One layer's per-token inputs ``u`` ``[n, in]`` and output gradients ``δ`` ``[n, out]`` of
    its MLP output projection, with the request each token belongs to (``groups`` ``[n]``)."""

    layer: int
    inputs: torch.Tensor
    grads: torch.Tensor
    groups: torch.Tensor


@dataclass
class LayerUpdate:
    """Factored update of one MLP output projection, one per group (request):
    ``ΔW_g = −scale · Σ_{t: groups[t] = g} outputs_t inputs_tᵀ`` in ``[out, in]`` layout."""

    layer: int
    inputs: torch.Tensor
    outputs: torch.Tensor
    groups: torch.Tensor
    scale: torch.Tensor

    def delta(self, group: int | None = None) -> torch.Tensor:
        """``ΔW`` ``[out, in]`` of one group, or of all groups summed (``None``)."""
        keep = slice(None) if group is None else self.groups == group
        return -self.scale * (self.outputs[keep].T @ self.inputs[keep])

    def apply_to(self, x: torch.Tensor, row_groups: torch.Tensor) -> torch.Tensor:
        """``ΔW_{g(r)} x[r]`` for every row ``r`` of the layer input ``x`` ``[batch, seq, in]``;
        rows whose group matches no token (e.g. ``-1``) get zeros."""
        mask = (row_groups[:, None] == self.groups[None, :]).to(x.dtype)  # [batch, n]
        coef = torch.einsum("bsi,ni->bsn", x, self.inputs) * mask[:, None, :]
        return -self.scale * torch.einsum("bsn,no->bso", coef, self.outputs)


def edit_batch(lm: LoadedModel, cases: Sequence[EditCase]) -> ContinuationBatch:
    """Each request's rewrite prompt followed by ``target_new``, with the subject located."""
    return encode_continuations(
        lm.tokenizer,
        [c.rewrite_prompt for c in cases],
        [str(c.target_new) for c in cases],
        [c.subject for c in cases],
        [c.subject_start for c in cases],
    ).to(lm.device)


def edit_batch_loss(
    lm: LoadedModel, cases: Sequence[EditCase], batch: ContinuationBatch | None = None
) -> torch.Tensor:
    """The edit loss whose gradient the editors transform: Σ over requests of the mean NLL of
    ``target_new`` after the rewrite prompt (a request's gradient does not depend on the batch)."""
    batch = edit_batch(lm, cases) if batch is None else batch
    return -score_continuations(lm.model, batch).mean.sum()


def position_mask(batch: ContinuationBatch, positions: Positions) -> torch.Tensor:
    """``[rows, seq]``: the tokens whose ``(u, δ)`` an editor reads under ``positions``."""
    if positions not in POSITIONS:
        raise ValueError(f"positions {positions!r} must be one of {', '.join(POSITIONS)}")
    if positions == "all":
        return batch.attention_mask.bool()
    assert batch.subject_spans is not None
    mask = torch.zeros_like(batch.attention_mask, dtype=torch.bool)
    for row, span in enumerate(batch.subject_spans):
        start = span.last if positions == "subject_last" else span.start
        mask[row, start : span.end] = True
    return mask


def token_gradients(
    lm: LoadedModel,
    layers: Sequence[int],
    cases: Sequence[EditCase],
    positions: Positions = "all",
) -> list[TokenGradients]:
    """Per-token ``(u, δ)`` of each layer's MLP output projection from one forward and backward
    pass of :func:`edit_batch_loss`; token ``t`` of request ``i`` has group ``i``. Only the
    tokens ``positions`` names are kept, and of those only tokens with a gradient (padding and
    the final target token have none). The LM needs no gradients: ``δ`` is taken with respect
    to zeros added at the MLP output."""
    outputs = [Site("mlp", lm.arch.check_layer(layer)) for layer in layers]
    inputs = [Site("mlp_in", layer) for layer in layers]
    zeros: dict[Site, torch.Tensor] = {}

    def with_zeros(site: Site) -> EditFn:
        def fn(state: torch.Tensor) -> torch.Tensor:
            zeros[site] = torch.zeros_like(state, requires_grad=True)
            return state + zeros[site]

        return fn

    with (
        torch.enable_grad(),
        intervene(lm.arch, record=inputs, edit={s: with_zeros(s) for s in outputs}) as states,
    ):
        batch = edit_batch(lm, cases)
        loss = edit_batch_loss(lm, cases, batch)
        grads = torch.autograd.grad(loss, [zeros[s] for s in outputs])
    keep = position_mask(batch, positions)
    result = []
    for layer, site, grad in zip(layers, inputs, grads, strict=True):
        u = states[site].detach().float()
        delta = grad.float()
        rows, cols = ((delta.abs().sum(-1) > 0) & keep).nonzero(as_tuple=True)
        result.append(TokenGradients(layer, u[rows, cols], delta[rows, cols], rows))
    return result


@contextmanager
def apply_updates(
    lm: LoadedModel, updates: Sequence[LayerUpdate], row_groups: Sequence[int] | torch.Tensor
) -> Iterator[None]:
    """Run ``lm`` inside the block as if row ``r`` of every batch had group ``row_groups[r]``'s
    update added to each edited MLP output projection (``-1``: unedited). The stored weights are
    untouched and gradients flow into the updates."""
    groups = torch.as_tensor(row_groups, device=lm.device, dtype=torch.long)
    recorded: dict[Site, torch.Tensor] = {}

    def adder(update: LayerUpdate) -> EditFn:
        def fn(state: torch.Tensor) -> torch.Tensor:
            x = recorded[Site("mlp_in", update.layer)].float()
            return state + update.apply_to(x, groups).to(state.dtype)

        return fn

    record = [Site("mlp_in", u.layer) for u in updates]
    edit = {Site("mlp", u.layer): adder(u) for u in updates}
    with intervene(lm.arch, record=record, edit=edit) as states:
        recorded = states
        yield


def write_updates(lm: LoadedModel, updates: Sequence[LayerUpdate]) -> EditHandle:
    """Add every update (all groups summed) to the LM's weights, in their dtype and layout;
    the returned handle restores the originals exactly."""
    names = [param_name(lm.model, mlp_out_param(lm, u.layer)) for u in updates]
    handle = backup(lm.model, names)
    norms = []
    with restored_on_error(handle):
        with torch.no_grad():
            for update in updates:
                weight = lm.arch.mlp_out_weight(update.layer)
                delta = update.delta()
                # summed in float32 and rounded once: a small update survives a bf16 weight
                weight.copy_((weight.float() + delta).to(weight.dtype))
                norms.append(float(delta.norm()))
        handle.info.update(layers=[u.layer for u in updates], update_norms=norms)
    return handle


class GradientEditor(nn.Module):
    """Base of the learned gradient editors: subclasses turn token gradients into updates."""

    method = "gradient"

    def __init__(
        self,
        layers: Sequence[int],
        in_features: int,
        out_features: int,
        positions: Positions = "all",
    ) -> None:
        super().__init__()
        if positions not in POSITIONS:
            raise ValueError(f"positions {positions!r} must be one of {', '.join(POSITIONS)}")
        self.positions: Positions = positions
        if not layers:
            raise ValueError("layers: give at least one layer to edit")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers: {list(layers)} names a layer twice")
        self.layers = [int(layer) for layer in layers]
        self.in_features = in_features
        self.out_features = out_features

    def transform(
        self, lm: LoadedModel, grads: Sequence[TokenGradients], cases: Sequence[EditCase]
    ) -> list[LayerUpdate]:
        """The updates of every layer from its token gradients (what a subclass learns)."""
        raise NotImplementedError

    def step_parameters(self) -> list[nn.Parameter]:
        """The learned step sizes (their own optimiser group); the rest are network weights."""
        raise NotImplementedError

    def updates(self, lm: LoadedModel, cases: Sequence[EditCase]) -> list[LayerUpdate]:
        """One factored update per request (group ``i`` = ``cases[i]``) for every edited layer."""
        if not cases:
            raise ValueError("no edit requests given")
        for case in cases:
            if case.target_new is None or not case.target_new.strip():
                raise ValueError(f"case {case.case_id}: target_new is missing")
        grads = token_gradients(lm, self.layers, cases, self.positions)
        return self.transform(lm, grads, cases)

    def apply_edit(self, lm: LoadedModel, cases: Sequence[EditCase]) -> EditHandle:
        """Write the summed update of all ``cases`` into ``lm``; the handle restores it."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                updates = self.updates(lm, cases)
        finally:
            self.train(was_training)
        handle = write_updates(lm, updates)
        with restored_on_error(handle):
            handle.info.update(method=self.method, n_requests=len(cases))
        return handle


class RunningNorm(nn.Module):
    """Per-dimension standardisation by a running mean and standard deviation, updated from
    every batch seen in training mode (Chan et al.'s parallel update). Until two values have
    been seen it is the identity."""

    def __init__(self, dim: int, eps: float = 1e-7) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    count: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        n_b = x.shape[0]
        if n_b == 0:
            return
        x = x.detach().double()
        mean_b = x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        total = self.count + n_b
        diff = mean_b - self.mean
        self.mean += diff * n_b / total
        self.m2 += m2_b + diff**2 * self.count * n_b / total
        self.count.copy_(total)

    @property
    def std(self) -> torch.Tensor:
        if self.count < 2:
            return torch.ones_like(self.mean)
        return (self.m2 / (self.count - 1)).sqrt()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.observe(x)
        if self.count < 2:
            return x
        mean = self.mean.to(x.dtype)
        return (x - mean) / (self.std.to(x.dtype) + self.eps)
