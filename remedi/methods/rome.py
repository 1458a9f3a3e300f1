"""ROME: a rank-one update of one MLP output projection that rewrites one fact (Meng et al. 2022).

    with rome.apply_edit(lm, request, stats=C, hparams=RomeHyperParams(layer=6)) as handle:
        ...the LM now says request.target_new...

Choices (recorded in ``handle.info``):
- context templates are ``"{}"`` plus a fixed list of plain English prefixes
  (:data:`CONTEXT_PREFIXES`), not text sampled from the LM (samples from small models are junk);
- k* (the mean key over templates) is used both in the left vector and in the residual
  ``v* − W k*`` (the r-ROME fix), so the updated weight maps k* exactly to v* = W k* + δ;
- δ is optimised on the tokens from the last subject token on: the tokens before it are run once
  into a KV cache, each step runs only the rest, with logits only at the scored positions;
- δ is optimised on a cached bfloat16 copy of a float32 LM where the device computes bfloat16
  fast (``optimise_dtype="auto"``; 2.3x faster on a CPU with bfloat16 instructions, same edit
  quality; an AVX2-only CPU keeps float32), while k*, W k* and the update use the LM's weights;
- the update runs on the LM's device in float64 from the cached inverse C⁻¹
  (:func:`remedi.methods.second_moment.inverse`): one d × d matrix-vector product per edit;
  without statistics (identity C) it is δ k*ᵀ / (k*ᵀ k*) and no d × d matrix is built. It is
  written into the weight in the weight's dtype.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from remedi.data import EditCase
from remedi.hooks import Site, add_at, intervene
from remedi.methods import second_moment
from remedi.methods.requests import EditRequest, as_request
from remedi.methods.second_moment import SecondMoment, float64_device
from remedi.methods.weights import EditHandle, backup, param_name, restored_on_error
from remedi.models import LoadedModel, resolve_dtype
from remedi.models.cast_copy import cast_copy, fast_dtype
from remedi.registry import WeightMethod, register, sequential_handles
from remedi.tokens import cache_kwargs, encode_continuations, encode_prompts, unembed

CONTEXT_PREFIXES: tuple[str, ...] = (
    "The following is true.",
    "Here is a fact.",
    "I read this in a book.",
    "My teacher told us this.",
    "This is well known.",
    "According to the encyclopedia,",
    "As everyone in the town knows,",
    "In a recent interview, the author said that",
    "The news report from last week explained that",
    "Students often learn early in school that",
    "A short summary of the article:",
    "From the history notes:",
    "It is often said that",
    "Quick question answered:",
    "The guidebook states that",
    "Our records show that",
    "Many people know that",
    "In the documentary it was mentioned that",
    "One thing is certain.",
    "To put it simply,",
)
"""Plain prefixes put before the rewrite prompt to average keys and values over contexts."""

DEFAULT_LAYER_FRACTION = 0.2
KNOWN_LAYERS: dict[tuple[str, int], int] = {
    ("gptj", 28): 5,
    ("gpt2", 48): 17,
    ("gemma3_text", 18): 1,
}
"""Reference layers (GPT-J, GPT-2 XL); Gemma-3-270M measured with benchmarks/rome_sweep.py."""
REFERENCE_CLAMP = 4.0
KNOWN_CLAMPS: dict[tuple[str, int], float] = {("gemma3_text", 18): 1.25}
"""Measured clamps: Gemma normalises the MLP output before the residual add, so a long δ turns
the output's direction far more than its length suggests, and neighbours bleed. Gemma-3-270M:
chosen on ``builtin:famous-tune`` (famous same-relation neighbours; clamp 2 → NS 0.802, 1.5 →
0.833, 1.25 → 0.872 at ES 0.97), reported on ``builtin:famous-test`` (see the README)."""


def default_layer(lm: LoadedModel) -> int:
    """The reference layer for GPT-J / GPT-2 XL, else the measured fraction of the depth."""
    arch = lm.arch
    known = KNOWN_LAYERS.get((arch.model_type, arch.num_layers))
    if known is not None:
        return known
    return min(arch.num_layers - 1, round(DEFAULT_LAYER_FRACTION * arch.num_layers))


def default_clamp(lm: LoadedModel) -> float:
    """The measured clamp factor for ``lm``'s architecture, else the reference 4."""
    return KNOWN_CLAMPS.get((lm.arch.model_type, lm.arch.num_layers), REFERENCE_CLAMP)


def context_templates(n_context: int) -> list[str]:
    """``"{}"`` followed by ``n_context`` fixed prefixes (``"prefix {}"``)."""
    if not 0 <= n_context <= len(CONTEXT_PREFIXES):
        raise ValueError(f"n_context {n_context} must be in 0..{len(CONTEXT_PREFIXES)}")
    return ["{}", *(f"{p} {{}}" for p in CONTEXT_PREFIXES[:n_context])]


@dataclass
class RomeHyperParams:
    """ROME settings; ``layer=None`` picks :func:`default_layer`, ``clamp=None``
    :func:`default_clamp`."""

    layer: int | None = None
    n_context: int = 5
    lr: float = 0.5
    steps: int = 10
    loss_threshold: float = 0.05
    clamp: float | None = None
    kl_weight: float = 0.0625
    weight_decay: float = 0.5
    kl_prompt: str = "{} is a"
    optimise_dtype: str | None = "auto"
    """dtype of the LM copy δ is optimised on when the LM is float32 (None: the LM itself;
    ``"auto"``: bfloat16 where :func:`~remedi.models.cast_copy.fast_dtype` says the device runs it
    fast, else the LM itself). bfloat16 runs 2.3x faster on a CPU with bfloat16 instructions with
    the same edit quality (see the README), and tens of times slower on one without."""


def mlp_out_param(lm: LoadedModel, layer: int) -> torch.Tensor:
    weight = lm.arch.mlp_out(layer).weight
    assert isinstance(weight, torch.Tensor)
    return weight


class ForwardTail:
    """Run a fixed batch through blocks ``start..L-1`` only, reusing the states entering ``start``.

    One full forward records each later block's call arguments (masks, position embeddings);
    :meth:`logits_at` then recomputes only the tail (hooks placed with :func:`intervene` on its
    modules still fire) and applies the final norm and unembedding at the wanted positions.
    """

    def __init__(
        self, lm: LoadedModel, start: int, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ):
        self.lm = lm
        self.start = start
        self.calls: list[tuple[nn.Module, tuple[Any, ...], dict[str, Any]]] = []
        self.hidden: torch.Tensor | None = None
        blocks = [lm.arch.block(j) for j in range(start, lm.arch.num_layers)]
        handles = [
            block.register_forward_pre_hook(self._recorder(block), with_kwargs=True)
            for block in blocks
        ]
        try:
            last = Site("block", lm.arch.num_layers - 1)
            with torch.no_grad(), intervene(lm.arch, stop_after=last):
                lm.model(
                    input_ids=input_ids.to(lm.device),
                    attention_mask=attention_mask.to(lm.device),
                    use_cache=False,
                )
        finally:
            for handle in handles:
                handle.remove()

    def _recorder(self, block: nn.Module) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if args:
                hidden, rest = args[0], args[1:]
            else:
                kwargs = dict(kwargs)
                hidden, rest = kwargs.pop("hidden_states"), ()
            if not self.calls:
                self.hidden = hidden.detach()
            self.calls.append((block, tuple(rest), dict(kwargs)))

        return hook

    def final_states(self) -> torch.Tensor:
        """Output of the last block for the whole batch (run under the caller's hooks)."""
        assert self.hidden is not None
        hidden = self.hidden
        for block, rest, kwargs in self.calls:
            out = block(hidden, *rest, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def logits_at(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``[n, vocab]`` at ``(rows, cols)``, as the full model computes them."""
        hidden = self.final_states()[rows, cols]
        return unembed(self.lm.model, self.lm.arch.final_norm(hidden[:, None]))[:, 0].float()


PREFIX_BUCKET = 8
""":class:`SuffixRun` left-pads its cached prefix to a multiple of this many tokens, so that the
suffix passes of cases with similar prompt lengths share tensor shapes. On a CPU the bfloat16
kernels (oneDNN) are built and cached once per shape, and a new shape per case grew resident
memory by 65 MB (9.6%) from the 50th to the 500th ROME edit of a tiny model, against 1% with
the padding (``benchmarks/memory_growth.py``)."""


class SuffixRun:
    """Run rows whose tokens before ``split[i]`` never change, recomputing only the rest.

    The rows are left-padded so that every ``split`` lands in one column S (a multiple of
    :data:`PREFIX_BUCKET`); the first S columns run once into a KV cache, and each call runs
    only columns S.. on a copy of that cache (edits at ``split`` touch nothing before it).
    Hooks placed with :func:`intervene` see the suffix only: the edited position is column 0
    of every row.
    """

    def __init__(self, lm: LoadedModel, rows: Sequence[torch.Tensor], split: Sequence[int]):
        self.lm = lm
        width = max(len(r) - s for r, s in zip(rows, split, strict=True))
        self.split = -(-max(split) // PREFIX_BUCKET) * PREFIX_BUCKET
        self.shift = torch.tensor([self.split - s for s in split])
        n = len(rows)
        ids = torch.full((n, self.split + width), lm.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (row, shift) in enumerate(zip(rows, self.shift.tolist(), strict=True)):
            ids[i, shift : shift + len(row)] = row
            mask[i, shift : shift + len(row)] = 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        self.ids, self.mask, self.positions = (t.to(lm.device) for t in (ids, mask, positions))
        self.cache = DynamicCache(config=lm.model.config)
        last = Site("block", lm.arch.num_layers - 1)
        with torch.no_grad(), intervene(lm.arch, stop_after=last):
            lm.model(
                input_ids=self.ids[:, : self.split],
                attention_mask=self.mask[:, : self.split],
                position_ids=self.positions[:, : self.split],
                use_cache=True,
                **cache_kwargs(lm.model, self.cache),
            )

    def logits_at(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``[n, vocab]`` at original positions ``(rows, cols)`` (≥ split)."""
        last = Site("block", self.lm.arch.num_layers - 1)
        with intervene(self.lm.arch, record=[last], stop_after=last) as states:
            self.lm.model(
                input_ids=self.ids[:, self.split :],
                attention_mask=self.mask,
                position_ids=self.positions[:, self.split :],
                use_cache=True,
                **cache_kwargs(self.lm.model, copy.deepcopy(self.cache)),
            )
        local = cols + self.shift.to(cols.device)[rows] - self.split
        hidden = states[last][rows, local]
        return unembed(self.lm.model, self.lm.arch.final_norm(hidden[:, None]))[:, 0].float()


def subject_states(
    lm: LoadedModel, sites: Sequence[Site], request: EditRequest, templates: Sequence[str]
) -> dict[Site, torch.Tensor]:
    """Mean over templates of each site's state at the last subject token (float32)."""
    states = request_states(lm, sites, [request], templates)
    return {site: state[0] for site, state in states.items()}


def request_states(
    lm: LoadedModel,
    sites: Sequence[Site],
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    batch_rows: int = 256,
) -> dict[Site, torch.Tensor]:
    """:func:`subject_states` of many requests, ``[n_requests, width]`` per site (float32), in
    forward passes of up to ``batch_rows`` prompts (one pass for all requests when they fit)."""
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be at least 1, got {batch_rows}")
    prompts = [t.replace("{}", r.rewrite_prompt) for r in requests for t in templates]
    subjects = [r.subject for r in requests for _ in templates]
    deepest = max(sites, key=_depth)
    parts: dict[Site, list[torch.Tensor]] = {site: [] for site in sites}
    for first in range(0, len(prompts), batch_rows):
        rows = slice(first, first + batch_rows)
        batch = encode_prompts(lm.tokenizer, prompts[rows], subjects[rows]).to(lm.device)
        with torch.no_grad(), intervene(lm.arch, record=sites, stop_after=deepest) as states:
            lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        index = torch.arange(batch.input_ids.shape[0], device=lm.device)
        for site in sites:
            parts[site].append(states[site][index, batch.subject_last].float())
    n_t = len(templates)
    return {site: torch.cat(parts[site]).reshape(len(requests), n_t, -1).mean(1) for site in sites}


def subject_keys(
    lm: LoadedModel, layers: Sequence[int], request: EditRequest, templates: Sequence[str]
) -> dict[int, torch.Tensor]:
    """k*: mean over templates of each layer's ``mlp_in`` state at the last subject token."""
    states = subject_states(lm, [Site("mlp_in", layer) for layer in layers], request, templates)
    return {site.layer: state for site, state in states.items()}


def _depth(site: Site) -> tuple[int, int]:
    """Order of sites within a forward pass: by layer, then mlp_in < mlp < block."""
    return site.layer, {"attn": 0, "mlp_in": 1, "mlp": 2, "block": 3}[site.kind]


@dataclass
class DeltaResult:
    """The optimised residual ``delta`` added at ``site``, and how the optimisation went."""

    delta: torch.Tensor
    init_norm: float
    steps: int
    losses: list[float]
    target_prob: float


def optimise_delta(
    lm: LoadedModel,
    site: Site,
    request: EditRequest,
    templates: Sequence[str],
    hp: RomeHyperParams,
) -> DeltaResult:
    """Find δ added to ``site`` at the last subject token that makes the LM say the new target.

    Loss = mean target NLL over the templated rewrite prompts + ``kl_weight`` · KL(p_δ ‖ p_0) of
    the next token after the subject in ``kl_prompt`` + ``weight_decay`` · ‖δ‖ / ‖v₀‖²; Adam;
    ‖δ‖ clamped to ``clamp`` · ‖v₀‖. It stops once NLL + KL term < ``loss_threshold`` (the
    decay term is left out of the test: with a small ‖v₀‖, as on Gemma, it alone exceeds it).
    """
    return optimise_deltas(lm, site, [request], templates, hp)[0]


def optimise_deltas(
    lm: LoadedModel,
    site: Site,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    hp: RomeHyperParams,
) -> list[DeltaResult]:
    """:func:`optimise_delta` for several requests in one batch, each with its own δ.

    The losses are summed, so each δ sees only its own gradient, and Adam (elementwise) takes
    the same steps as when run alone; a request that reaches ``loss_threshold`` is frozen there.
    """
    lm = optimisation_model(lm, hp.optimise_dtype)
    tok = lm.tokenizer
    n_req, n_t = len(requests), len(templates)
    prompts = [t.replace("{}", r.rewrite_prompt) for r in requests for t in templates]
    subjects = [r.subject for r in requests for _ in templates]
    cont = encode_continuations(
        tok, prompts, [r.target_new for r in requests for _ in templates], subjects
    )
    kl_subjects = [r.subject for r in requests]
    kl = encode_prompts(tok, [hp.kl_prompt.replace("{}", e) for e in kl_subjects], kl_subjects)
    n = len(prompts)
    assert cont.subject_spans is not None
    subject_last = [s.last for s in cont.subject_spans] + kl.subject_last.tolist()
    owner = torch.cat([torch.arange(n_req).repeat_interleave(n_t), torch.arange(n_req)])

    positions = cont.target_positions()
    target_mask = cont.target_mask
    nll_rows, nll_cols = target_mask.nonzero(as_tuple=True)
    kl_rows = torch.arange(n, n + n_req)
    read_rows = torch.cat([nll_rows, kl_rows])
    read_cols = torch.cat([positions[nll_rows, nll_cols], torch.tensor(subject_last[n:])])
    # Each row runs only up to its last read position: the final target token and the KL
    # prompt's words after the subject never feed a scored prediction.
    ends = [0] * (n + n_req)
    for row, col in zip(read_rows.tolist(), read_cols.tolist(), strict=True):
        ends[row] = max(ends[row], col + 1)
    rows = [cont.input_ids[i, : ends[i]] for i in range(n)]
    rows += [kl.input_ids[j, : ends[n + j]] for j in range(n_req)]
    read_rows, read_cols = read_rows.to(lm.device), read_cols.to(lm.device)
    target_ids = cont.target_ids[nll_rows, nll_cols].to(lm.device)
    weights = (1.0 / target_mask.sum(1).float())[nll_rows].to(lm.device) / n_t
    nll_owner = owner[nll_rows].to(lm.device)
    n_nll = len(nll_rows)

    run = SuffixRun(lm, rows, subject_last)
    first_rows = (torch.arange(n_req) * n_t).to(lm.device)
    delta = torch.zeros(n_req, lm.arch.hidden_size, device=lm.device, requires_grad=True)
    optimiser = torch.optim.Adam([delta], lr=hp.lr)
    row_owner = owner.to(lm.device)
    edit_positions = torch.zeros(len(rows), dtype=torch.long, device=lm.device)
    losses: list[list[float]] = [[] for _ in range(n_req)]
    probs = [0.0] * n_req
    steps = [hp.steps] * n_req
    done = torch.zeros(n_req, dtype=torch.bool, device=lm.device)
    for step in range(1, hp.steps + 1):
        optimiser.zero_grad()
        edit = {site: add_at(edit_positions, delta[row_owner])}
        with intervene(lm.arch, record=[site] if step == 1 else [], edit=edit) as states:
            logits = run.logits_at(read_rows, read_cols)
        logprobs = torch.log_softmax(logits, -1)
        if step == 1:  # δ = 0: the unedited values and next-token distributions
            init = states[site][first_rows, 0].detach().float()
            init_norm = init.norm(dim=-1)
            max_norm = (hp.clamp if hp.clamp is not None else default_clamp(lm)) * init_norm
            kl_ref = logprobs[n_nll:].detach()
        token_lp = logprobs[:n_nll].gather(1, target_ids[:, None])[:, 0]
        nll = torch.zeros(n_req, device=lm.device).index_add(0, nll_owner, -token_lp * weights)
        kl_lp = logprobs[n_nll:]
        kl_div = (kl_lp.exp() * (kl_lp - kl_ref)).sum(-1)
        decay = delta.norm(dim=-1) / init_norm**2
        loss = nll + hp.kl_weight * kl_div + hp.weight_decay * decay
        fit = (nll + hp.kl_weight * kl_div).detach()
        for j in (~done).nonzero()[:, 0].tolist():
            losses[j].append(float(loss[j].detach()))
            probs[j] = math.exp(-float(nll[j].detach()))
            if float(fit[j]) < hp.loss_threshold or step == hp.steps:
                steps[j] = step
                done[j] = True
        if bool(done.all()):
            break
        (loss * (~done)).sum().backward()
        frozen = delta.detach().clone()
        optimiser.step()
        with torch.no_grad():
            delta[done] = frozen[done]
            norm = delta.norm(dim=-1, keepdim=True)
            delta.mul_(torch.where(norm > max_norm[:, None], max_norm[:, None] / norm, 1.0))
    return [
        DeltaResult(delta[j].detach(), float(init_norm[j]), steps[j], losses[j], probs[j])
        for j in range(n_req)
    ]


def optimisation_model(lm: LoadedModel, dtype: str | None) -> LoadedModel:
    """The LM to optimise δ on: a cached ``dtype`` copy when ``lm`` is float32, else ``lm``
    (``"auto"``: :func:`~remedi.models.cast_copy.fast_dtype` of the LM's device)."""
    if dtype is None or lm.dtype != torch.float32:
        return lm
    target = fast_dtype(lm.device) if dtype == "auto" else resolve_dtype(dtype)
    return lm if target is None else cast_copy(lm, target)


def rank_one_update(
    weight: torch.Tensor,
    key: torch.Tensor,
    delta: torch.Tensor,
    second_moment: torch.Tensor | None = None,
    *,
    inverse: torch.Tensor | None = None,
) -> torch.Tensor:
    """ΔW ([out, in]) with (W + ΔW) k* = W k* + δ, whitened by C: δ (C⁻¹k*)ᵀ / (k*ᵀ C⁻¹ k*).

    Pass ``inverse`` = C⁻¹ (:func:`remedi.methods.second_moment.inverse`): one matrix-vector
    product, in float64 where C⁻¹ lives. ``second_moment`` = C solves C x = k* directly (O(d³),
    kept for callers that hold only C); neither: identity C, δ k*ᵀ / (k*ᵀ k*), no d × d matrix.
    The result is in ``weight``'s dtype and on its device.
    """
    if inverse is not None:
        k = key.to(inverse.device, torch.float64)
        left = inverse @ k
    elif second_moment is not None:
        k = key.to(second_moment.device, torch.float64)
        left = torch.linalg.solve(second_moment.to(torch.float64), k)
    else:
        k = key.to(float64_device(weight.device), torch.float64)
        left = k
    update = torch.outer(delta.to(k.device, torch.float64), left) / torch.dot(k, left)
    return update.to(weight.device, weight.dtype)


def apply_edit(
    lm: LoadedModel,
    request: EditRequest | EditCase,
    layer: int | None = None,
    stats: SecondMoment | torch.Tensor | None = None,
    hparams: RomeHyperParams | None = None,
) -> EditHandle:
    """Rewrite one fact with ROME; the returned handle restores the original weight.

    ``stats`` is the layer's second moment C (None: identity, an unwhitened rank-one update);
    its inverse is computed once and cached (:func:`remedi.methods.second_moment.inverse`).
    ``layer`` overrides ``hparams.layer``.
    """
    start = time.perf_counter()
    hp = hparams or RomeHyperParams()
    req = as_request(request).validate()
    chosen = layer if layer is not None else hp.layer
    layer = lm.arch.check_layer(chosen if chosen is not None else default_layer(lm))
    if hp.clamp is None:
        hp = replace(hp, clamp=default_clamp(lm))
    inverse = second_moment.inverse(stats, lm.device, lm.arch.mlp_hidden_size)
    templates = context_templates(hp.n_context)

    key = subject_keys(lm, [layer], req, templates)[layer]
    result = optimise_delta(lm, Site("mlp", layer), req, templates, hp)
    weight = lm.arch.mlp_out_weight(layer)
    update = rank_one_update(weight, key, result.delta, inverse=inverse)
    handle = backup(lm.model, [param_name(lm.model, mlp_out_param(lm, layer))])
    with restored_on_error(handle):
        with torch.no_grad():
            value = weight.detach().float() @ key + result.delta
            weight.add_(update)
        handle.info.update(
            method="rome",
            layer=layer,
            key=key.detach().cpu(),
            value=value.detach().cpu(),
            delta_norm=float(result.delta.norm()),
            init_norm=result.init_norm,
            steps=result.steps,
            losses=result.losses,
            target_prob=result.target_prob,
            templates=templates,
            key_choice="k* (mean over templates) in both vectors (r-ROME)",
            whitened=stats is not None,
            hparams=asdict(hp),
            seconds=time.perf_counter() - start,
        )
    return handle


@register
class Rome(WeightMethod):
    """ROME: one rank-one update of one MLP projection per request, applied in turn."""

    name = "rome"
    order = 5
    summary = "ROME rank-one update of one MLP projection (Meng et al. 2022)"
    Settings = RomeHyperParams
    uses_statistics = True

    def resolve(self, lm: LoadedModel) -> RomeHyperParams:
        hp: RomeHyperParams = self.settings
        layer = hp.layer if hp.layer is not None else default_layer(lm)
        clamp = hp.clamp if hp.clamp is not None else default_clamp(lm)
        return replace(hp, layer=lm.arch.check_layer(layer), clamp=clamp)

    def write(self, lm: LoadedModel, cases: Sequence[EditCase]) -> list[EditHandle]:
        hp = self.resolve(lm)
        assert hp.layer is not None
        found = self.environment.statistics.of(lm, [hp.layer])
        stats = None if found is None else found[hp.layer]

        def one(case: EditCase) -> EditHandle:
            return apply_edit(lm, case, layer=hp.layer, stats=stats, hparams=hp)

        return sequential_handles(cases, one)()
