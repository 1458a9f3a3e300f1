"""MEMIT: many facts written at once into the MLP output projections of a range of layers
(Meng et al. 2022b).

1. Per fact, optimise a residual δ added to the output of the last edited block at the last
   subject token (the ROME objective, clamp 0.75 ‖z₀‖): the target hidden state z = z₀ + δ.
2. For each edited layer in order: keys K (mean over context templates, current weights), the
   remaining residual R = (z − z_current) / (layers left), and the least-squares update
   ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹, which minimises ‖(W + ΔW) K − (W K + R)‖² + λ tr(ΔW C ΔWᵀ).
   It is computed from the cached C⁻¹ (:func:`remedi.methods.second_moment.inverse`) by the
   push-through identity Kᵀ (λ C + K Kᵀ)⁻¹ = (λ I + Kᵀ C⁻¹ K)⁻¹ Kᵀ C⁻¹: an n × n solve for n
   facts instead of a d × d one, in float64 on the LM's device (identity C: C⁻¹ K = K, no d × d
   matrix at all). Keys and states of all facts are read in batched forward passes, one set
   per layer.
3. Where the block normalises the MLP output before adding it to the residual (Gemma 2/3), a
   residual change is not an MLP-output change: each layer's R is mapped through that norm
   (:func:`through_post_norm`), to the smallest MLP-output change whose normalised output comes
   closest to adding R. What the norm cannot reach is left to the later layers.

As in ROME, keys and hidden states are means over the same templates throughout (recorded).

    with memit.apply_edits(lm, requests, stats={l: C_l, ...}) as handle: ...
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace

import torch
from tqdm.auto import tqdm

from remedi.data import EditCase
from remedi.hooks import Site
from remedi.methods import second_moment
from remedi.methods.requests import EditRequest, as_request
from remedi.methods.rome import (
    RomeHyperParams,
    context_templates,
    default_layer,
    mlp_out_param,
    optimise_deltas,
    request_states,
)
from remedi.methods.second_moment import SecondMoment, float64_device
from remedi.methods.weights import EditHandle, backup, param_name, restored_on_error
from remedi.models import LoadedModel
from remedi.registry import WeightMethod, register

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
    batch: int | None = None
    """Edits written at once when each batch of cases is scored on its own edit (``--memit-batch``;
    None: all cases of an evaluation in one batch)."""
    request_batch: int = 16
    """Target states optimised together in one batch (same result as one at a time, faster)."""
    forward_batch: int = 256
    """Prompt rows per forward pass when reading every fact's keys and states at a layer."""
    optimise_dtype: str | None = "auto"
    """dtype of the LM copy the target states are optimised on (see ``RomeHyperParams``)."""


GPTJ_LAMBDA = 15_000.0
GPTJ_MLP_WIDTH = 16_384


def default_lambda(lm: LoadedModel) -> float:
    """λ for ``lm``: GPT-J's 15,000 scaled by the MLP width (E[kᵀC⁻¹k] = width)."""
    return GPTJ_LAMBDA * lm.arch.mlp_hidden_size / GPTJ_MLP_WIDTH


def least_squares_update(
    keys: torch.Tensor,
    residuals: torch.Tensor,
    second_moment: torch.Tensor | None,
    weight: float,
    *,
    inverse: torch.Tensor | None = None,
) -> torch.Tensor:
    """ΔW ``[out, in]`` = R Kᵀ (λ C + K Kᵀ)⁻¹ for keys ``[n, in]`` and residuals ``[n, out]``,
    in float64 (λ = ``weight``).

    With ``inverse`` = C⁻¹, or identity C (both None), by the push-through identity
    ΔW = R (λ I + Kᵀ C⁻¹ K)⁻¹ Kᵀ C⁻¹: O(n d²) for the product C⁻¹ K and an n × n solve, on
    C⁻¹'s device (identity: the keys' device, no d × d matrix). With only ``second_moment`` = C,
    the d × d system is solved directly (O(d³), kept for callers that hold only C).
    """
    if inverse is None and second_moment is not None:
        k = keys.to(second_moment.device, torch.float64).T
        r = residuals.to(second_moment.device, torch.float64).T
        system = weight * second_moment.to(torch.float64) + k @ k.T
        return torch.linalg.solve(system, k @ r.T).T
    device = inverse.device if inverse is not None else float64_device(keys.device)
    k = keys.to(device, torch.float64)
    r = residuals.to(device, torch.float64)
    whitened = k if inverse is None else k @ inverse  # rows kᵢᵀ C⁻¹ (C⁻¹ is symmetric)
    gram = whitened @ k.T
    gram.diagonal().add_(weight)
    return torch.linalg.solve(gram, r).T @ whitened


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


Solver = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(layer, keys [n, in], residuals [n, out]) -> ΔW [out, in]``: how one layer's update is
solved (MEMIT's least squares by default; AlphaEdit's projected one)."""


def apply_edits(
    lm: LoadedModel,
    requests: Sequence[EditRequest | EditCase],
    stats: Mapping[int, SecondMoment | torch.Tensor] | None = None,
    hparams: MemitHyperParams | None = None,
    progress: bool = True,
    solver: Solver | None = None,
    method: str = "memit",
) -> EditHandle:
    """Write all ``requests`` at once; the handle restores every edited projection.

    ``stats`` maps each edited layer to its second moment C (None: identity for all layers);
    each C⁻¹ is computed once and cached (:func:`remedi.methods.second_moment.inverse`).
    ``solver`` replaces MEMIT's per-layer least squares (then ``stats`` are not inverted).
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
    lam = hp.mom2_weight if hp.mom2_weight is not None else default_lambda(lm)
    if solver is None:
        inverses = {
            layer: second_moment.inverse(None if stats is None else stats[layer], lm.device, width)
            for layer in layers
        }

        def solver(layer: int, keys: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
            return least_squares_update(keys, residuals, None, lam, inverse=inverses[layer])

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

    deltas, steps = [], []
    chunks = [reqs[i : i + hp.request_batch] for i in range(0, len(reqs), hp.request_batch)]
    with tqdm(total=len(reqs), desc=f"{method}: target states", disable=not progress) as bar:
        for chunk in chunks:
            results = optimise_deltas(lm, z_site, chunk, templates, rome_hp)
            deltas += [result.delta for result in results]
            steps += [result.steps for result in results]
            bar.update(len(chunk))

    names = [param_name(lm.model, mlp_out_param(lm, layer)) for layer in layers]
    handle = backup(lm.model, names)
    with restored_on_error(handle):
        for i, layer in enumerate(tqdm(layers, desc=f"{method}: layers", disable=not progress)):
            key_site, out_site = Site("mlp_in", layer), Site("mlp", layer)
            states = request_states(
                lm, [key_site, out_site, z_site], reqs, templates, hp.forward_batch
            )
            if i == 0:  # no layer written yet: the current states are z₀
                target_z = states[z_site] + torch.stack(deltas).to(states[z_site])
            residuals = (target_z - states[z_site]) / (len(layers) - i)
            norm = lm.arch.post_mlp_norm(layer)
            if norm is not None:
                residuals = through_post_norm(norm, states[out_site], residuals)
            update = solver(layer, states[key_site], residuals)
            weight = lm.arch.mlp_out_weight(layer)
            with torch.no_grad():
                weight.add_(update.to(weight.device, weight.dtype))
        handle.info.update(
            method=method,
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


@register
class Memit(WeightMethod):
    """MEMIT: all requests written at once, the update spread over several MLP layers."""

    name = "memit"
    order = 6
    summary = "MEMIT: many requests at once, spread over several MLP layers (Meng et al. 2023)"
    Settings = MemitHyperParams
    uses_statistics = True
    group_size = None

    def resolve(self, lm: LoadedModel) -> MemitHyperParams:
        hp: MemitHyperParams = self.settings
        layers = hp.layers if hp.layers is not None else tuple(default_layers(lm))
        return replace(hp, layers=tuple(lm.arch.check_layer(layer) for layer in layers))

    def group(self, n_cases: int) -> int:
        return self.settings.batch or n_cases

    def write(self, lm: LoadedModel, cases: Sequence[EditCase]) -> list[EditHandle]:
        hp = self.resolve(lm)
        assert hp.layers is not None
        stats = self.environment.statistics.of(lm, list(hp.layers))
        progress = self.environment.progress
        return [apply_edits(lm, cases, stats=stats, hparams=hp, progress=progress)]
