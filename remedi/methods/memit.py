"""MEMIT: many facts written at once into the MLP output projections of a range of layers
(Meng et al. 2022b).

1. Per fact, optimise a residual δ added to the output of the last edited block at the last
   subject token (the ROME objective, clamp 0.75 ‖z₀‖): the target hidden state z = z₀ + δ.
2. For each edited layer in order: keys K (mean over context templates, current weights), the
   remaining residual R = (z − z_current) / (layers left), and the least-squares update
   ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹ in float64, which minimises ‖(W + ΔW) K − (W K + R)‖² + λ tr(ΔW C ΔWᵀ).
3. Where the block normalises the MLP output before adding it to the residual (Gemma 2/3), a
   residual change is not an MLP-output change: each layer's R is mapped through that norm
   (:func:`through_post_norm`), to the smallest MLP-output change whose normalised output comes
   closest to adding R. What the norm cannot reach is left to the later layers.

As in ROME, keys and hidden states are means over the same templates throughout (recorded).

    with memit.apply_edits(lm, requests, stats={l: C_l, ...}) as handle: ...
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from remedi.data import EditCase
from remedi.hooks import Site
from remedi.methods.requests import EditRequest, as_request
from remedi.methods.rome import (
    RomeHyperParams,
    context_templates,
    default_layer,
    mlp_out_param,
    optimise_deltas,
    subject_states,
)
from remedi.methods.second_moment import SecondMoment, as_matrix
from remedi.methods.weights import EditHandle, backup, param_name
from remedi.models import LoadedModel

KNOWN_LAYERS: dict[tuple[str, int], tuple[int, ...]] = {
    ("gptj", 28): (3, 4, 5, 6, 7, 8),
    ("gpt2", 48): (13, 14, 15, 16, 17),
    ("gemma3_text", 18): (0, 1, 2),
}


def default_layers(lm: LoadedModel) -> list[int]:
    """GPT-J 3–8, GPT-2 XL 13–17, Gemma-3-270M 0–2 (measured); otherwise four layers ending at
    ROME's default layer."""
    known = KNOWN_LAYERS.get((lm.arch.model_type, lm.arch.num_layers))
    if known is not None:
        return list(known)
    last = default_layer(lm)
    return list(range(max(0, last - 3), last + 1))


@dataclass
class MemitHyperParams:
    """MEMIT settings; ``layers=None`` picks :func:`default_layers`."""

    layers: tuple[int, ...] | None = None
    n_context: int = 5
    lr: float = 0.5
    steps: int = 25
    loss_threshold: float = 0.05
    clamp: float = 0.75
    kl_weight: float = 0.0625
    weight_decay: float = 0.5
    mom2_weight: float | None = None
    """λ; None: 15,000 (GPT-J) scaled by mlp_hidden_size / 16,384 (GPT-J's width), which keeps a
    typical key's kᵀ(λC)⁻¹k, i.e. how much of its residual one layer takes, as on GPT-J."""
    request_batch: int = 16
    """Target states optimised together in one batch (same result as one at a time, faster)."""
    optimise_dtype: str | None = "bfloat16"
    """dtype of the LM copy the target states are optimised on (see ``RomeHyperParams``)."""


GPTJ_LAMBDA = 15_000.0
GPTJ_MLP_WIDTH = 16_384


def default_lambda(lm: LoadedModel) -> float:
    """λ for ``lm``: GPT-J's 15,000 scaled by the MLP width (E[kᵀC⁻¹k] = width)."""
    return GPTJ_LAMBDA * lm.arch.mlp_hidden_size / GPTJ_MLP_WIDTH


def least_squares_update(
    keys: torch.Tensor, residuals: torch.Tensor, second_moment: torch.Tensor, weight: float
) -> torch.Tensor:
    """ΔW ``[out, in]`` = R Kᵀ (λ C + K Kᵀ)⁻¹ for keys ``[n, in]`` and residuals ``[n, out]``."""
    k = keys.to("cpu", torch.float64).T
    r = residuals.to("cpu", torch.float64).T
    system = weight * second_moment.to(torch.float64) + k @ k.T
    return torch.linalg.solve(system, k @ r.T).T


def through_post_norm(
    norm: torch.nn.Module, outputs: torch.Tensor, residuals: torch.Tensor, max_iter: int = 100
) -> torch.Tensor:
    """MLP-output changes ``[n, d]`` that move ``norm(outputs)`` as close as possible to
    ``norm(outputs) + residuals``.

    A scale-invariant norm (RMSNorm) only lets the MLP turn its output's direction, so the
    target is found by L-BFGS on ``‖norm(v) − target‖²`` and then rescaled to lie closest to the
    current output (the smallest weight change giving that direction).
    """
    current = outputs.detach().float()
    with torch.no_grad():
        target = norm(current) + residuals.float()
    v = current.clone().requires_grad_(True)
    solver = torch.optim.LBFGS([v], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        solver.zero_grad()
        loss = (norm(v) - target).pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        solver.step(closure)
    v = v.detach()
    scale = (v * current).sum(-1, keepdim=True) / v.pow(2).sum(-1, keepdim=True).clamp_min(1e-12)
    return v * scale - current


def apply_edits(
    lm: LoadedModel,
    requests: Sequence[EditRequest | EditCase],
    stats: Mapping[int, SecondMoment | torch.Tensor] | None = None,
    hparams: MemitHyperParams | None = None,
    progress: bool = True,
) -> EditHandle:
    """Write all ``requests`` at once; the handle restores every edited projection.

    ``stats`` maps each edited layer to its second moment C (None: identity for all layers).
    """
    start = time.perf_counter()
    hp = hparams or MemitHyperParams()
    reqs = [as_request(r).validate(f"request {i}") for i, r in enumerate(requests)]
    if not reqs:
        raise ValueError("requests is empty")
    layers = sorted({lm.arch.check_layer(layer) for layer in (hp.layers or default_layers(lm))})
    width = lm.arch.mlp_hidden_size
    if stats is not None:
        missing = [layer for layer in layers if layer not in stats]
        if missing:
            raise ValueError(f"stats lack layer(s) {missing}")
    matrices = {
        layer: as_matrix(None if stats is None else stats[layer], width) for layer in layers
    }
    lam = hp.mom2_weight if hp.mom2_weight is not None else default_lambda(lm)
    templates = context_templates(hp.n_context)
    z_site = Site("block", layers[-1])
    rome_hp = RomeHyperParams(
        n_context=hp.n_context,
        lr=hp.lr,
        steps=hp.steps,
        loss_threshold=hp.loss_threshold,
        clamp=hp.clamp,
        kl_weight=hp.kl_weight,
        weight_decay=hp.weight_decay,
        optimise_dtype=hp.optimise_dtype,
    )

    targets = []
    steps = []
    chunks = [reqs[i : i + hp.request_batch] for i in range(0, len(reqs), hp.request_batch)]
    with tqdm(total=len(reqs), desc="memit: target states", disable=not progress) as bar:
        for chunk in chunks:
            results = optimise_deltas(lm, z_site, chunk, templates, rome_hp)
            for req, result in zip(chunk, results, strict=True):
                z0 = subject_states(lm, [z_site], req, templates)[z_site]
                targets.append(z0 + result.delta)
                steps.append(result.steps)
            bar.update(len(chunk))
    target_z = torch.stack(targets)

    names = [param_name(lm.model, mlp_out_param(lm, layer)) for layer in layers]
    handle = backup(lm.model, names)
    try:
        for i, layer in enumerate(tqdm(layers, desc="memit: layers", disable=not progress)):
            key_site, out_site = Site("mlp_in", layer), Site("mlp", layer)
            keys, current, outputs = [], [], []
            for req in reqs:
                states = subject_states(lm, [key_site, out_site, z_site], req, templates)
                keys.append(states[key_site])
                current.append(states[z_site])
                outputs.append(states[out_site])
            residuals = (target_z - torch.stack(current)) / (len(layers) - i)
            norm = lm.arch.post_mlp_norm(layer)
            if norm is not None:
                residuals = through_post_norm(norm, torch.stack(outputs), residuals)
            update = least_squares_update(torch.stack(keys), residuals, matrices[layer], lam)
            weight = lm.arch.mlp_out_weight(layer)
            with torch.no_grad():
                weight.add_(update.to(weight.device, weight.dtype))
    except BaseException:
        handle.restore()
        raise
    handle.info.update(
        method="memit",
        layers=layers,
        n_requests=len(reqs),
        mom2_weight=lam,
        z_steps=steps,
        hparams=asdict(hp),
        whitened=stats is not None,
        post_norm_mapped=lm.arch.spec.post_mlp_norm is not None,
        seconds=time.perf_counter() - start,
    )
    return handle
