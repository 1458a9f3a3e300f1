"""Knowledge neurons (Dai et al. 2022, causal-LM port): find, suppress, amplify and edit the
MLP neurons that express a fact.

A neuron is one unit of ``mlp_in`` (the input of the MLP output projection) at the prediction
position (the last prompt token). Its attribution is the integrated gradient, from a zero
baseline, of the target token's probability with respect to that unit. The target token is the
first token of ``" " + target`` that carries text (:func:`remedi.tokens.first_text_token`): where
a tokenizer puts a bare ``'▁'`` before it (Gemma, before digits), that bare token is appended to
the prompt and the prediction position is the one after it, so that different answers do not all
score the same bare token. Activation-level
interventions (suppress, amplify) are context managers over :func:`remedi.hooks.intervene`;
weight edits (update a fact, erase a relation) return an :class:`EditHandle` that restores
the LM bitwise.

    kn = identify(lm, [case.rewrite_prompt, *case.paraphrase_prompts], case.target_true)
    with suppress(lm, kn.neurons):
        ...
    with apply_update(lm, case) as handle:
        ...                                   # the LM now prefers case.target_new
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from remedi.data import EditCase
from remedi.hooks import Positions, Site, intervene, replace_at, scale_at
from remedi.methods.weights import EditHandle, backup, param_name, restored_on_error
from remedi.models import LoadedModel
from remedi.registry import WeightMethod, register, sequential_handles
from remedi.tokens import (
    encode_continuations,
    encode_prompts,
    first_text_token,
    next_token_logits,
    prefix_cache,
    repeat_cache,
    top_token,
)


@dataclass(frozen=True, order=True)
class Neuron:
    """Unit ``index`` of the MLP's hidden layer (``mlp_in``) in transformer layer ``layer``."""

    layer: int
    index: int


@dataclass
class KnowledgeNeurons:
    """Neurons identified for one fact, with how they were chosen."""

    neurons: list[Neuron]
    share: float
    per_prompt: list[list[Neuron]]
    scores: dict[Neuron, float] = field(default_factory=dict)
    attributions: list[torch.Tensor] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "neurons": [[n.layer, n.index] for n in self.neurons],
            "share": self.share,
            "per_prompt": [[[n.layer, n.index] for n in p] for p in self.per_prompt],
            "scores": {f"{n.layer}:{n.index}": s for n, s in self.scores.items()},
        }


def _prompt_and_target(lm: LoadedModel, prompt: str, target: str) -> tuple[torch.Tensor, int]:
    """Token ids ``[1, n]`` the target's first text-carrying token is predicted from, and that
    token's id (see :func:`remedi.tokens.first_text_token`)."""
    ids, token = first_text_token(lm.tokenizer, prompt, target)
    return ids.to(lm.device), token


def _last_token_logits(lm: LoadedModel, ids: torch.Tensor, cache: Any, rows: int) -> torch.Tensor:
    """Logits at the last prompt token for ``rows`` copies of the prompt, reusing ``cache``."""
    if cache is None:
        return next_token_logits(lm.model, ids.expand(rows, -1))
    last = ids[:, -1:].expand(rows, -1)
    return next_token_logits(lm.model, last, cache=repeat_cache(cache, rows))


def attribute(
    lm: LoadedModel,
    prompt: str,
    target: str,
    *,
    steps: int = 20,
    layers: Sequence[int] | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Integrated-gradient attribution ``[num_layers, mlp_hidden_size]`` of the probability of
    ``target``'s first text-carrying token to each neuron at the position that predicts it (the
    last prompt token, or a bare token after it; layers not scored stay 0).

    For layer ``l`` with activation ``a``, the batch holds the ``steps`` scaled copies
    ``(k / steps) * a``, ``k = 1..steps``, one per row, in one forward/backward;
    attribution = ``a / steps * sum_k grad P(target)``. The prompt's earlier tokens are computed
    once and shared through the key/value cache, as they do not depend on the scaled neurons.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    arch = lm.arch
    chosen = (
        list(range(arch.num_layers)) if layers is None else [arch.check_layer(x) for x in layers]
    )
    ids, target_id = _prompt_and_target(lm, prompt, target)
    cache = prefix_cache(lm.model, ids[:, :-1]) if ids.shape[1] > 1 else None
    sites = [Site("mlp_in", layer) for layer in chosen]
    with torch.no_grad(), intervene(arch, record=sites) as states:
        _last_token_logits(lm, ids, cache, 1)
    result = torch.zeros(arch.num_layers, arch.mlp_hidden_size)
    alphas = torch.arange(1, steps + 1, device=lm.device, dtype=lm.dtype) / steps
    for layer in tqdm(chosen, desc="integrated gradients", disable=not progress):
        activation = states[Site("mlp_in", layer)][0, -1]
        with torch.enable_grad():
            scaled = (alphas[:, None] * activation[None, :]).requires_grad_(True)
            last = [0] * steps if cache is not None else [ids.shape[1] - 1] * steps
            edit = {Site("mlp_in", layer): replace_at(last, scaled)}
            with intervene(arch, edit=edit):
                logits = _last_token_logits(lm, ids, cache, steps)
            prob = torch.softmax(logits.float(), dim=-1)[:, target_id]
            (grads,) = torch.autograd.grad(prob.sum(), scaled)
        result[layer] = (activation * grads.sum(0) / steps).detach().float().cpu()
    return result


def prompt_neurons(attribution: torch.Tensor, threshold: float = 0.2) -> list[Neuron]:
    """Neurons whose attribution is at least ``threshold`` times the prompt's maximum."""
    top = float(attribution.max())
    if top <= 0:
        return []
    layers, units = torch.nonzero(attribution >= threshold * top, as_tuple=True)
    return sorted(Neuron(int(x), int(u)) for x, u in zip(layers, units, strict=True))


def refine(
    per_prompt: Sequence[Sequence[Neuron]],
    scores: Mapping[Neuron, float] | None = None,
    share: float = 0.7,
    min_neurons: int = 2,
    max_neurons: int = 5,
) -> tuple[list[Neuron], float]:
    """Neurons present in at least ``share`` of the prompts, with ``share`` adapted so that
    ``min_neurons..max_neurons`` remain where possible; returns (neurons, share used).

    ``share`` moves one prompt at a time: up while too many neurons remain, down while too
    few. If more than ``max_neurons`` survive even in every prompt, the ones with the highest
    ``scores`` (default: alphabetical order) are kept.
    """
    n = len(per_prompt)
    if n == 0:
        return [], share
    counts = Counter(neuron for prompt in per_prompt for neuron in set(prompt))

    def kept(need: int) -> list[Neuron]:
        return sorted(nrn for nrn, c in counts.items() if c >= need)

    need = min(n, max(1, math.ceil(share * n - 1e-9)))
    while len(kept(need)) > max_neurons and need < n:
        need += 1
    while len(kept(need)) < min_neurons and need > 1:
        need -= 1
    neurons = kept(need)
    if len(neurons) > max_neurons:
        rank = scores or {}
        neurons = sorted(sorted(neurons, key=lambda x: -rank.get(x, 0.0))[:max_neurons])
    return neurons, need / n


def identify(
    lm: LoadedModel,
    prompts: Sequence[str],
    target: str,
    *,
    steps: int = 20,
    threshold: float = 0.2,
    share: float = 0.7,
    min_neurons: int = 2,
    max_neurons: int = 5,
    min_prompts: int = 3,
    progress: bool = False,
) -> KnowledgeNeurons:
    """Knowledge neurons of the fact "prompts → target" (see :func:`attribute`, :func:`refine`);
    a neuron's score is its attribution as a fraction of its prompt's maximum, averaged."""
    if len(prompts) < min_prompts:
        raise ValueError(f"prompts: need at least {min_prompts} prompts, got {len(prompts)}")
    if not target.strip():
        raise ValueError("target is empty")
    per_prompt: list[list[Neuron]] = []
    totals: dict[Neuron, float] = {}
    attributions = []
    for prompt in tqdm(prompts, desc="attributing prompts", disable=not progress):
        attribution = attribute(lm, prompt, target, steps=steps)
        attributions.append(attribution)
        found = prompt_neurons(attribution, threshold)
        per_prompt.append(found)
        top = float(attribution.max())
        for neuron in found:
            share_of_top = float(attribution[neuron.layer, neuron.index]) / top
            totals[neuron] = totals.get(neuron, 0.0) + share_of_top
    mean = {nrn: s / len(prompts) for nrn, s in totals.items()}
    neurons, used = refine(per_prompt, mean, share, min_neurons, max_neurons)
    return KnowledgeNeurons(neurons, used, per_prompt, {n: mean[n] for n in neurons}, attributions)


def _units_by_layer(neurons: Sequence[Neuron], device: torch.device) -> dict[int, torch.Tensor]:
    layers: dict[int, list[int]] = {}
    for neuron in neurons:
        layers.setdefault(neuron.layer, []).append(neuron.index)
    return {x: torch.tensor(sorted(set(u)), device=device) for x, u in layers.items()}


def _scale_units(
    positions: Positions | None, factor: float, units: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(state: torch.Tensor) -> torch.Tensor:
        where = positions
        if where is None:
            where = [list(range(state.shape[1]))] * state.shape[0]
        return scale_at(where, factor, units=units)(state)

    return fn


@contextmanager
def scaled(
    lm: LoadedModel, neurons: Sequence[Neuron], factor: float, positions: Positions | None = None
) -> Iterator[None]:
    """Multiply the neurons' activations by ``factor`` at ``positions`` (default: every token)."""
    edits = {
        Site("mlp_in", layer): _scale_units(positions, factor, units)
        for layer, units in _units_by_layer(neurons, lm.device).items()
    }
    with intervene(lm.arch, edit=edits):
        yield


def suppress(lm: LoadedModel, neurons: Sequence[Neuron], positions: Positions | None = None) -> Any:
    """Context manager setting the neurons' activations to zero."""
    return scaled(lm, neurons, 0.0, positions)


def amplify(
    lm: LoadedModel,
    neurons: Sequence[Neuron],
    positions: Positions | None = None,
    factor: float = 2.0,
) -> Any:
    """Context manager doubling (``factor``) the neurons' activations."""
    return scaled(lm, neurons, factor, positions)


def answer_probs(
    lm: LoadedModel,
    prompts: Sequence[str],
    targets: Sequence[str],
    factor: float | None = None,
    neurons: Sequence[Neuron] = (),
) -> torch.Tensor:
    """P(first text-carrying token of ``" " + target``) at the position that predicts it; with
    ``factor``, under :func:`scaled` of ``neurons`` at that position."""
    batch = encode_continuations(lm.tokenizer, prompts, targets).to(lm.device)
    last = batch.first_target_positions()
    first = batch.first_target_ids()
    with torch.no_grad():
        if factor is None:
            logits = next_token_logits(lm.model, batch.input_ids, batch.attention_mask, last)
        else:
            with scaled(lm, neurons, factor, last):
                logits = next_token_logits(lm.model, batch.input_ids, batch.attention_mask, last)
    probs = torch.softmax(logits.float(), dim=-1)
    return probs[torch.arange(len(first)), first].cpu()


def relative_change(
    lm: LoadedModel,
    neurons: Sequence[Neuron],
    prompts: Sequence[str],
    targets: Sequence[str],
    factor: float,
) -> float:
    """Mean over prompts of (P_after − P_before) / P_before of the correct answer when the
    neurons are scaled by ``factor`` at the prediction position."""
    before = answer_probs(lm, prompts, targets)
    after = answer_probs(lm, prompts, targets, factor, neurons)
    return float(((after - before) / before.clamp_min(1e-12)).mean())


def _answer_embedding(lm: LoadedModel, target: str) -> torch.Tensor:
    """Output embedding (unembedding row) of the first text-carrying token of ``" " + target``."""
    _, token = _prompt_and_target(lm, "", target)
    weight: torch.Tensor = lm.arch.unembed.weight  # type: ignore[assignment]
    return weight[token]


def _backup_layers(lm: LoadedModel, neurons: Sequence[Neuron]) -> EditHandle:
    names = sorted(
        {param_name(lm.model, lm.arch.mlp_out(n.layer).weight) for n in neurons}  # type: ignore[arg-type]
    )
    return backup(lm.model, names)


def update_fact(
    lm: LoadedModel,
    neurons: Sequence[Neuron],
    target_old: str,
    target_new: str,
    lambda_old: float = 1.0,
    lambda_new: float = 8.0,
) -> EditHandle:
    """Edit the neurons' value slots (column ``i`` of the ``[out, in]`` output projection):
    subtract ``lambda_old`` times the old answer's output embedding and add ``lambda_new`` times
    the new one's, each rescaled to the slot's norm. Returns the handle that undoes it; if the
    edit fails midway, the weights are restored before the error propagates."""
    old = _answer_embedding(lm, target_old)
    new = _answer_embedding(lm, target_new)
    handle = _backup_layers(lm, neurons)
    with restored_on_error(handle):
        with torch.no_grad():
            for n in neurons:
                slot = lm.arch.mlp_out_weight(n.layer)[:, n.index]
                norm = slot.norm()
                delta = lambda_new * norm / new.norm() * new - lambda_old * norm / old.norm() * old
                slot.add_(delta.to(slot))
        handle.info.update(
            method="kn", neurons=[[n.layer, n.index] for n in neurons], target_new=target_new
        )
    return handle


def erase(lm: LoadedModel, neurons: Sequence[Neuron]) -> EditHandle:
    """Zero the neurons' value slots; returns the handle that undoes it (restored before the
    error propagates if the edit fails midway)."""
    handle = _backup_layers(lm, neurons)
    with restored_on_error(handle):
        with torch.no_grad():
            for n in neurons:
                lm.arch.mlp_out_weight(n.layer)[:, n.index] = 0
        handle.info.update(method="kn-erase", neurons=[[n.layer, n.index] for n in neurons])
    return handle


def relation_neurons(fact_neurons: Sequence[Sequence[Neuron]], top: int = 20) -> list[Neuron]:
    """The ``top`` neurons shared by most facts of a relation (ties: lower layer, index)."""
    counts = Counter(n for neurons in fact_neurons for n in set(neurons))
    ranked = sorted(counts, key=lambda n: (-counts[n], n))
    return ranked[:top]


def case_prompts(case: EditCase) -> list[str]:
    """The rewrite prompt and paraphrase prompts of a case: the prompts that state its fact."""
    return [case.rewrite_prompt, *case.paraphrase_prompts]


def apply_update(lm: LoadedModel, case: EditCase, **hparams: Any) -> EditHandle:
    """Find the fact's neurons from its rewrite and paraphrase prompts and rewrite their value
    slots from ``target_true`` to ``target_new``. ``hparams``: ``lambda_old``, ``lambda_new`` and
    any keyword of :func:`identify`.

    Cases with fewer than three prompts use the prompts they have; a blank ``target_true``
    (a bare edit request) is replaced by the model's top-1 answer to the rewrite prompt.
    """
    if case.target_new is None:
        raise ValueError(f"case {case.case_id}: target_new is None; nothing to update to")
    prompts = case_prompts(case)
    old = case.target_true.strip() or _top1_answer(lm, case.rewrite_prompt)
    lambdas = {k: hparams.pop(k) for k in ("lambda_old", "lambda_new") if k in hparams}
    hparams.setdefault("min_prompts", min(3, len(prompts)))
    found = identify(lm, prompts, old, **hparams)
    handle = update_fact(lm, found.neurons, old, case.target_new, **lambdas)
    with restored_on_error(handle):
        handle.info["share"] = found.share
    return handle


def _top1_answer(lm: LoadedModel, prompt: str) -> str:
    text = top_token(lm.model, lm.tokenizer, prompt).strip()
    if not text:
        raise ValueError(f"target_true is empty and the top-1 answer to {prompt!r} is blank")
    return text


def erase_relation(
    lm: LoadedModel, cases: Sequence[EditCase], top: int = 20, **hparams: Any
) -> EditHandle:
    """Zero the value slots of the ``top`` most frequent knowledge neurons of ``cases``
    (facts of one relation)."""
    found = [
        identify(lm, case_prompts(c), c.target_true, **hparams).neurons
        for c in tqdm(cases, desc="identifying facts")
    ]
    return erase(lm, relation_neurons(found, top))


def activation_scores(
    lm: LoadedModel, neurons: Sequence[Neuron], texts: Sequence[str], batch_size: int = 16
) -> torch.Tensor:
    """Per text, the largest (over its tokens, special tokens such as ``<bos>`` excluded) mean
    activation of ``neurons``."""
    units = _units_by_layer(neurons, lm.device)
    sites = [Site("mlp_in", layer) for layer in units]
    special = torch.tensor(sorted(lm.tokenizer.all_special_ids), device=lm.device)
    scores = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        enc = encode_prompts(lm.tokenizer, chunk, [t[:1] or " " for t in chunk]).to(lm.device)
        with torch.no_grad(), intervene(lm.arch, record=sites) as states:
            lm.model.base_model(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
        acts = torch.cat([states[Site("mlp_in", x)][..., u] for x, u in units.items()], dim=-1)
        ignore = (enc.attention_mask == 0) | torch.isin(enc.input_ids, special)
        mean = acts.float().mean(-1).masked_fill(ignore, float("-inf"))
        scores.append(mean.max(-1).values.cpu())
    return torch.cat(scores) if scores else torch.zeros(0)


def rank_texts(
    lm: LoadedModel, neurons: Sequence[Neuron], texts: Sequence[str], top: int = 10
) -> list[tuple[float, str]]:
    """The ``top`` texts (e.g. corpus sentences) that activate ``neurons`` most."""
    scores = activation_scores(lm, neurons, texts)
    order = torch.argsort(scores, descending=True)[:top]
    return [(float(scores[i]), texts[i]) for i in order.tolist()]


def statistics(
    fact_neurons: Mapping[Any, Sequence[Neuron]], relations: Mapping[Any, str]
) -> dict[str, Any]:
    """Neurons per fact, neurons shared within each relation, neurons found for facts of
    several relations ([layer, index, relations]), and the layer histogram."""
    counts = [len(n) for n in fact_neurons.values()]
    by_relation: dict[str, list[Sequence[Neuron]]] = {}
    for key, neurons in fact_neurons.items():
        by_relation.setdefault(relations[key], []).append(neurons)
    shared = {}
    for relation, groups in by_relation.items():
        c = Counter(n for g in groups for n in set(g))
        shared[relation] = sum(1 for v in c.values() if v >= 2)
    relations_of: dict[Neuron, set[str]] = {}
    for key, neurons in fact_neurons.items():
        for n in neurons:
            relations_of.setdefault(n, set()).add(relations[key])
    layers = Counter(n.layer for neurons in fact_neurons.values() for n in neurons)
    return {
        "facts": len(counts),
        "neurons_per_fact_mean": sum(counts) / len(counts) if counts else 0.0,
        "neurons_per_fact": counts,
        "shared_neurons_per_relation": shared,
        "neurons_in_several_relations": sorted(
            ([n.layer, n.index, len(r)] for n, r in relations_of.items() if len(r) >= 2),
            key=lambda x: -x[2],
        ),
        "layer_histogram": dict(sorted(layers.items())),
    }


@dataclass
class KnSettings:
    """Knowledge-neuron update settings (see :func:`identify` and :func:`update_fact`):
    integration ``steps``, attribution ``threshold``, the ``share`` of prompts a neuron must
    be found in, and how many neurons to keep."""

    steps: int = 20
    threshold: float = 0.2
    share: float = 0.7
    min_neurons: int = 2
    max_neurons: int = 5


@register
class KnowledgeNeuronUpdate(WeightMethod):
    """``kn``: find each fact's knowledge neurons and rewrite their value slots."""

    name = "kn"
    order = 7
    summary = "knowledge-neuron value-slot update (Dai et al. 2022)"
    Settings = KnSettings

    @classmethod
    def check_requests(cls, requests: Sequence[Any]) -> str | None:
        for i, request in enumerate(requests):
            if not request.target_true:
                return f"request {i}: kn needs target_true (the object to replace)"
        return None

    def write(self, lm: LoadedModel, cases: Sequence[EditCase]) -> list[EditHandle]:
        hp = asdict(self.settings)
        return sequential_handles(cases, lambda case: apply_update(lm, case, **dict(hp)))()
