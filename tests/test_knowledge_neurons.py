"""Knowledge neurons: IG attribution against a slow reference, identification thresholds,
reversible suppress / amplify / update / erase."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_TYPES, tiny_model

from remedi.data import EditCase
from remedi.hooks import Site, intervene, replace_at
from remedi.methods import knowledge_neurons as kn
from remedi.methods.knowledge_neurons import Neuron

PROMPT = "The Eiffel Tower is located in"
TARGET = "Paris"


def _reference_attribution(lm, prompt: str, target: str, layer: int, steps: int) -> torch.Tensor:
    """One full forward per IG step, no cache, no batching."""
    batch = kn.encode_continuations(lm.tokenizer, [prompt], [target])
    n = int(batch.prompt_lengths[0])
    ids, target_id = batch.input_ids[:, :n], int(batch.target_ids[0, 0])
    site = Site("mlp_in", layer)
    with torch.no_grad(), intervene(lm.arch, record=[site]) as states:
        lm.model(input_ids=ids)
    activation = states[site][0, -1]
    total = torch.zeros_like(activation)
    for k in range(1, steps + 1):
        x = (k / steps * activation).clone().requires_grad_(True)
        with torch.enable_grad(), intervene(lm.arch, edit={site: replace_at([n - 1], x[None])}):
            prob = torch.softmax(lm.model(input_ids=ids).logits[0, -1], -1)[target_id]
            (grad,) = torch.autograd.grad(prob, x)
        total += grad
    return activation * total / steps


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_attribution_matches_per_step_reference(model_type: str) -> None:
    lm = tiny_model(model_type)
    attribution = kn.attribute(lm, PROMPT, TARGET, steps=5)
    assert attribution.shape == (lm.arch.num_layers, lm.arch.mlp_hidden_size)
    for layer in (0, lm.arch.num_layers - 1):
        expected = _reference_attribution(lm, PROMPT, TARGET, layer, steps=5)
        torch.testing.assert_close(attribution[layer], expected, rtol=1e-4, atol=1e-7)


def test_attribution_of_chosen_layers_only() -> None:
    lm = tiny_model("llama")
    attribution = kn.attribute(lm, PROMPT, TARGET, steps=3, layers=[1])
    assert attribution[0].abs().sum() == 0 and attribution[2].abs().sum() == 0
    assert attribution[1].abs().sum() > 0


def test_prompt_threshold() -> None:
    scores = torch.zeros(2, 4)
    scores[0, 1], scores[1, 2], scores[1, 3] = 1.0, 0.2, 0.19
    assert kn.prompt_neurons(scores, 0.2) == [Neuron(0, 1), Neuron(1, 2)]
    assert kn.prompt_neurons(-scores) == []


def test_refine_adapts_share() -> None:
    a, b, c, d = (Neuron(0, i) for i in range(4))
    prompts = [[a, b, c], [a, b], [a, b, d], [c]]
    # 0.7 of 4 prompts = 3 prompts: a and b.
    assert kn.refine(prompts) == ([a, b], 0.75)
    # Only one neuron in >= 3 prompts: lower the share until two remain.
    assert kn.refine([[a, b], [a], [a, c]]) == ([a, b, c], 1 / 3)
    # Too many neurons even in every prompt: keep the best scored.
    many = [Neuron(1, i) for i in range(7)]
    kept, share = kn.refine([many] * 3, {n: n.index for n in many}, max_neurons=5)
    assert share == 1.0 and kept == many[2:]


def test_identify_needs_three_prompts() -> None:
    lm = tiny_model("gpt2")
    with pytest.raises(ValueError, match="at least 3 prompts"):
        kn.identify(lm, [PROMPT], TARGET)
    found = kn.identify(
        lm, [PROMPT, "The Eiffel Tower is in", "Eiffel Tower is in"], TARGET, steps=3
    )
    assert 1 <= len(found.neurons) <= 5 and len(found.per_prompt) == 3


def _probs(lm, prompts, targets):
    return kn.answer_probs(lm, prompts, targets)


@pytest.mark.parametrize("model_type", ["gpt2", "gemma3_text"])
def test_suppress_and_amplify_are_reversible(model_type: str) -> None:
    lm = tiny_model(model_type)
    neurons = [Neuron(0, 3), Neuron(2, 7), Neuron(2, 1)]
    prompts, targets = [PROMPT, "Toyota makes"], [TARGET, "cars"]
    before = _probs(lm, prompts, targets)
    with kn.suppress(lm, neurons):
        suppressed = _probs(lm, prompts, targets)
    with kn.amplify(lm, neurons):
        amplified = _probs(lm, prompts, targets)
    assert not torch.equal(before, suppressed) and not torch.equal(before, amplified)
    assert torch.equal(_probs(lm, prompts, targets), before)
    change = kn.relative_change(lm, neurons, prompts, targets, 0.0)
    assert change != 0.0 and torch.equal(_probs(lm, prompts, targets), before)


def test_suppress_zeroes_only_the_chosen_units() -> None:
    lm = tiny_model("llama")
    ids = lm.tokenizer([PROMPT], return_tensors="pt")["input_ids"]
    site = Site("mlp_in", 1)
    with (
        torch.no_grad(),
        kn.suppress(lm, [Neuron(1, 4)]),
        intervene(lm.arch, record=[site]) as states,
    ):
        lm.model(input_ids=ids)
    with torch.no_grad(), intervene(lm.arch, record=[site]) as clean:
        lm.model(input_ids=ids)
    assert torch.all(states[site][..., 4] == 0)
    keep = [i for i in range(lm.arch.mlp_hidden_size) if i != 4]
    torch.testing.assert_close(states[site][..., keep], clean[site][..., keep])


def _weights(lm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


@pytest.mark.parametrize("model_type", ["gpt2", "gptj", "llama"])
def test_update_and_erase_are_bitwise_reversible(model_type: str) -> None:
    lm = tiny_model(model_type)
    original = _weights(lm)
    neurons = [Neuron(1, 2), Neuron(1, 5), Neuron(2, 0)]
    handle = kn.update_fact(lm, neurons, "Paris", "Rome")
    slot = lm.arch.mlp_out_weight(1)[:, 2]
    before = original[kn.param_name(lm.model, lm.arch.mlp_out(1).weight)]
    before_slot = before[:, 2] if lm.arch.mlp_out_orientation == "out_in" else before[2]
    assert not torch.equal(slot, before_slot)
    untouched = lm.arch.mlp_out_weight(1)[:, 3]
    after_col = before[:, 3] if lm.arch.mlp_out_orientation == "out_in" else before[3]
    assert torch.equal(untouched, after_col)
    handle.restore()
    assert all(torch.equal(v, original[k]) for k, v in lm.model.state_dict().items())
    with kn.erase(lm, neurons):
        assert torch.all(lm.arch.mlp_out_weight(2)[:, 0] == 0)
    assert all(torch.equal(v, original[k]) for k, v in lm.model.state_dict().items())


@pytest.mark.parametrize("edit", ["update", "erase"])
def test_a_failed_edit_restores_every_weight_bitwise(
    edit: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error midway (here: at the third slot) leaves no half-written value slot behind."""
    lm = tiny_model("llama")
    original = _weights(lm)
    neurons = [Neuron(0, 1), Neuron(1, 2), Neuron(2, 0)]
    real = lm.arch.mlp_out_weight
    calls = []

    def failing(layer: int) -> torch.Tensor:
        calls.append(layer)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real(layer)

    monkeypatch.setattr(lm.arch, "mlp_out_weight", failing)
    with pytest.raises(RuntimeError, match="boom"):
        if edit == "update":
            kn.update_fact(lm, neurons, "Paris", "Rome")
        else:
            kn.erase(lm, neurons)
    assert len(calls) == 3
    assert all(torch.equal(v, original[k]) for k, v in lm.model.state_dict().items())


def test_answers_are_scored_at_their_first_text_token() -> None:
    """Answers " 1889" and " 2024" start with the same bare space: their probabilities are those of
    "1" and "2" after it, so they differ, and the neuron edit writes the digit's embedding."""
    lm = tiny_model("llama")
    prompt = "The Eiffel Tower was built in"
    probs = kn.answer_probs(lm, [prompt] * 2, ["1889", "2024"])
    ids = lm.tokenizer([prompt + " 1"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = torch.softmax(lm.model(input_ids=ids[:, :-1]).logits[0, -1], -1)
    digits = lm.tokenizer.convert_tokens_to_ids(["1", "2"])
    torch.testing.assert_close(probs, expected[digits])
    torch.testing.assert_close(kn._answer_embedding(lm, "1889"), lm.arch.unembed.weight[digits[0]])
    attribution = kn.attribute(lm, prompt, "1889", steps=2, layers=[1])
    assert not torch.equal(attribution, kn.attribute(lm, prompt, "2024", steps=2, layers=[1]))


def test_apply_update_prefers_new_target_and_restores() -> None:
    lm = tiny_model("llama")
    original = _weights(lm)
    case = EditCase(
        case_id=1,
        subject="Eiffel Tower",
        prompt="The {} is located in",
        target_true="Paris",
        target_new="Rome",
        paraphrase_prompts=["The Eiffel Tower is in", "Eiffel Tower is in"],
    )
    prompts = kn.case_prompts(case)
    before = _probs(lm, prompts, ["Rome"] * 3)
    with kn.apply_update(lm, case, steps=3, lambda_new=50.0) as handle:
        assert handle.info["neurons"]
        after = _probs(lm, prompts, ["Rome"] * 3)
    assert after.mean() > before.mean()
    assert all(torch.equal(v, original[k]) for k, v in lm.model.state_dict().items())


def test_apply_update_on_a_bare_request() -> None:
    lm = tiny_model("gpt2")
    original = _weights(lm)
    case = EditCase(1, "Toyota", "{} makes", target_true="", target_new="Paris")
    with kn.apply_update(lm, case, steps=2) as handle:
        assert handle.info["neurons"]
    assert all(torch.equal(v, original[k]) for k, v in lm.model.state_dict().items())


def test_relation_neurons_and_statistics() -> None:
    a, b, c = Neuron(0, 1), Neuron(1, 1), Neuron(2, 2)
    assert kn.relation_neurons([[a, b], [b, c], [b, a]], top=2) == [b, a]
    stats = kn.statistics({1: [a, b], 2: [b], 3: [c, b]}, {1: "r", 2: "r", 3: "s"})
    assert stats["neurons_per_fact"] == [2, 1, 2]
    assert stats["shared_neurons_per_relation"] == {"r": 1, "s": 0}
    assert stats["neurons_in_several_relations"] == [[1, 1, 2]]
    assert stats["layer_histogram"] == {0: 1, 1: 3, 2: 1}


def test_activation_scores_and_ranking() -> None:
    lm = tiny_model("gpt2")
    texts = ["Toyota makes cars", "The Eiffel Tower is in Paris", "Rome"]
    neurons = [Neuron(1, 2), Neuron(2, 3)]
    scores = kn.activation_scores(lm, neurons, texts, batch_size=2)
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    # <bos> is excluded: the score is the maximum over the real tokens.
    ids = lm.tokenizer(texts[:1], return_tensors="pt")["input_ids"]
    sites = [Site("mlp_in", 1), Site("mlp_in", 2)]
    with torch.no_grad(), intervene(lm.arch, record=sites) as states:
        lm.model(input_ids=ids)
    acts = torch.stack([states[sites[0]][0, :, 2], states[sites[1]][0, :, 3]]).mean(0)
    assert ids[0, 0] == lm.tokenizer.bos_token_id
    torch.testing.assert_close(scores[0], acts[1:].max())
    ranked = kn.rank_texts(lm, neurons, texts, top=2)
    assert [s for s, _ in ranked] == sorted(scores.tolist(), reverse=True)[:2]
