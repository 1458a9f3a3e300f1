"""Fine-tuning baselines: FT and FT-L (L∞-constrained) of one MLP output projection.

The weight is optimised with Adam on the new target's NLL after the rewrite prompt; FT-L clamps
the change to ``[-eps, eps]`` elementwise after every step (ROME's baseline). Only the layers from
the edited one up are recomputed each step.

    with finetune.apply_edit(lm, request, FinetuneHyperParams(eps=5e-4)) as handle: ...
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import torch

from remedi.data import EditCase
from remedi.methods.requests import EditRequest, as_request
from remedi.methods.rome import ForwardTail, default_layer
from remedi.methods.weights import EditHandle, backup, param_name, restored_on_error
from remedi.models import LoadedModel
from remedi.registry import WeightMethod, register, sequential_handles
from remedi.tokens import encode_continuations


@dataclass
class FinetuneHyperParams:
    """``eps=None``: plain FT; a float: FT-L with that L∞ bound. ``layer=None``: ROME's default."""

    layer: int | None = None
    lr: float = 5e-4
    steps: int = 25
    eps: float | None = None
    loss_threshold: float = 1e-2


def apply_edit(
    lm: LoadedModel,
    request: EditRequest | EditCase,
    hparams: FinetuneHyperParams | None = None,
) -> EditHandle:
    """Fine-tune the MLP output projection of one layer towards ``target_new``; restorable."""
    start = time.perf_counter()
    hp = hparams or FinetuneHyperParams()
    req = as_request(request).validate()
    layer = lm.arch.check_layer(hp.layer if hp.layer is not None else default_layer(lm))
    if hp.eps is not None and hp.eps <= 0:
        raise ValueError(f"eps must be positive, got {hp.eps}")
    param = lm.arch.mlp_out(layer).weight
    assert isinstance(param, torch.nn.Parameter)
    handle = backup(lm.model, [param_name(lm.model, param)])
    original = handle.original(handle.names[0])

    batch = encode_continuations(lm.tokenizer, [req.rewrite_prompt], [req.target_new])
    rows, cols = batch.target_mask.nonzero(as_tuple=True)
    positions = batch.target_positions()[rows, cols].to(lm.device)
    targets = batch.target_ids[rows, cols].to(lm.device)
    tail = ForwardTail(lm, layer, batch.input_ids, batch.attention_mask)
    optimiser = torch.optim.Adam([param], lr=hp.lr)
    losses: list[float] = []
    frozen = not param.requires_grad
    param.requires_grad_(True)
    with restored_on_error(handle):
        try:
            for _ in range(hp.steps):
                optimiser.zero_grad()
                logits = tail.logits_at(rows.to(lm.device), positions)
                loss = torch.nn.functional.cross_entropy(logits, targets)
                losses.append(float(loss.detach()))
                if losses[-1] < hp.loss_threshold:
                    break
                loss.backward()
                optimiser.step()
                if hp.eps is not None:
                    with torch.no_grad():
                        param.copy_(torch.clamp(param, original - hp.eps, original + hp.eps))
        finally:
            param.requires_grad_(not frozen)
            param.grad = None
        handle.info.update(
            method="ft-l" if hp.eps is not None else "ft",
            layer=layer,
            losses=losses,
            hparams=asdict(hp),
            seconds=time.perf_counter() - start,
        )
    return handle


FT_L_EPS = 5e-4
"""FT-L's L-infinity bound when ``eps`` is not set (the ROME paper's setting)."""


@register
class Finetune(WeightMethod):
    """FT: fine-tune one MLP output projection on each request in turn (bounded by ``eps``
    only when it is given)."""

    name = "ft"
    order = 3
    summary = "fine-tune one MLP output projection on the request"
    Settings = FinetuneHyperParams
    section = "ft"

    def resolve(self, lm: LoadedModel) -> FinetuneHyperParams:
        hp: FinetuneHyperParams = self.settings
        layer = hp.layer if hp.layer is not None else default_layer(lm)
        return replace(hp, layer=lm.arch.check_layer(layer), eps=self.bound(hp))

    def bound(self, hp: FinetuneHyperParams) -> float | None:
        """The L-infinity bound this method uses (FT: ``eps`` when given, else none)."""
        return hp.eps

    def write(self, lm: LoadedModel, cases: Sequence[EditCase]) -> list[EditHandle]:
        hp = self.resolve(lm)
        return sequential_handles(cases, lambda case: apply_edit(lm, case, hp))()


@register
class FinetuneBounded(Finetune):
    """FT-L: fine-tuning whose change of each weight is bounded by ``eps`` (default 5e-4)."""

    name = "ft-l"
    order = 4
    summary = "fine-tuning with an L-infinity bound on the change (eps, default 5e-4)"

    def bound(self, hp: FinetuneHyperParams) -> float | None:
        return hp.eps if hp.eps is not None else FT_L_EPS
