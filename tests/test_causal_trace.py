"""Causal tracing: shapes, exact restoration, batched restorations against a one-at-a-time
reference, and the real model's clean/corrupted gap."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import MODEL_TYPES, tiny_model

from remedi.hooks import EMBEDDINGS, Site, intervene, replace_at
from remedi.methods import causal_trace as ct
from remedi.tokens import next_token_logits

PROMPT = "The Eiffel Tower is located in Paris"
SUBJECT = "Eiffel Tower"


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _reference(lm, result: ct.TraceResult, kind: str, layer: int, token: int) -> float:
    """One restoration, all tokens recomputed, with plain hooks."""
    ids = lm.tokenizer([PROMPT], return_tensors="pt")["input_ids"]
    span = ct.TokenSpan(*result.subject_range)
    noise = ct.make_noise(result.samples, span, lm.arch.hidden_size, result.noise_std)
    layers = ct.window_layers(kind, layer, lm.arch.num_layers, result.window)
    sites = [Site(ct.SITE_OF_KIND[kind], x) for x in layers]
    with torch.no_grad():
        with intervene(lm.arch, record=sites) as clean:
            lm.model(input_ids=ids)
        total = 0.0
        for s in range(result.samples):
            edits = {site: replace_at([token], clean[site][:, token]) for site in sites}
            edits[EMBEDDINGS] = ct.corrupt_subject(span, noise[s : s + 1])
            with intervene(lm.arch, edit=edits):
                logits = lm.model(input_ids=ids).logits[0, -1]
            total += float(torch.softmax(logits, -1)[result.target_id])
    return total / result.samples


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_next_token_logits_match_the_model(model_type: str) -> None:
    lm = tiny_model(model_type)
    enc = lm.tokenizer([PROMPT, "Toyota makes"], return_tensors="pt", padding=True)
    last = enc["attention_mask"].sum(1) - 1
    with torch.no_grad():
        full = lm.model(**enc).logits
        ours = next_token_logits(lm.model, enc["input_ids"], enc["attention_mask"], last)
    torch.testing.assert_close(ours, full[torch.arange(2), last])


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gemma3_text", "gpt_neox"])
def test_trace_shapes_and_exact_restoration(model_type: str) -> None:
    lm = tiny_model(model_type)
    result = ct.trace(lm, PROMPT, SUBJECT, samples=4, window=2)
    n_tokens, n_layers = len(result.tokens), lm.arch.num_layers
    assert n_tokens == len(lm.tokenizer(PROMPT)["input_ids"])
    assert "".join(result.tokens[slice(*result.subject_range)]).strip() == SUBJECT
    for kind in ct.KINDS:
        assert result.scores[kind].shape == (n_tokens, n_layers)
        assert not torch.isnan(result.scores[kind]).any()
    # The final block output at the last token is everything the prediction depends on.
    last = result.scores["hidden"][-1, -1].item()
    assert math.isclose(last, result.clean_prob, rel_tol=1e-4, abs_tol=1e-7)
    assert not math.isclose(result.corrupted_prob, result.clean_prob, rel_tol=1e-3)
    start = result.subject_range[0]
    assert torch.all(result.scores["mlp"][:start] == result.corrupted_prob)
    assert _hooks(lm.model) == 0
    data = result.to_json()
    assert len(data["scores"]["attn"]) == n_tokens and len(data["scores"]["attn"][0]) == n_layers


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_batched_restorations_equal_reference(model_type: str) -> None:
    lm = tiny_model(model_type)
    n_tokens = len(lm.tokenizer(PROMPT)["input_ids"])
    span = ct.encode_prompts(lm.tokenizer, [PROMPT], [SUBJECT]).subject_spans[0]
    tokens = [span.start, span.end - 1, span.end, n_tokens - 1]
    result = ct.trace(lm, PROMPT, SUBJECT, samples=3, window=2, batch_size=9, tokens=tokens)
    end = result.subject_range[1]
    for kind, layer, token in [
        ("hidden", 0, end - 1),
        ("hidden", 1, n_tokens - 1),
        ("mlp", 0, end - 1),
        ("mlp", 2, end),
        ("attn", 1, n_tokens - 1),
        ("attn", 2, result.subject_range[0]),
    ]:
        expected = _reference(lm, result, kind, layer, token)
        got = result.scores[kind][token, layer].item()
        assert math.isclose(got, expected, rel_tol=1e-4, abs_tol=1e-7), (kind, layer, token)


def test_target_layers_tokens_and_errors() -> None:
    lm = tiny_model("llama")
    result = ct.trace(
        lm, PROMPT, SUBJECT, "Paris", kinds=["mlp"], samples=2, layers=[1], tokens=[-1]
    )
    assert result.target_id == int(
        ct.encode_continuations(lm.tokenizer, [PROMPT], ["Paris"]).first_target_ids()[0]
    )
    assert list(result.scores) == ["mlp"]
    assert not math.isnan(result.scores["mlp"][-1, 1].item())
    assert math.isnan(result.scores["mlp"][-1, 0].item())
    with pytest.raises(ValueError, match="kind"):
        ct.trace(lm, PROMPT, SUBJECT, kinds=["embed"])
    with pytest.raises(ValueError, match="target is empty"):
        ct.trace(lm, PROMPT, SUBJECT, " ")
    with pytest.raises(ValueError, match="does not occur"):
        ct.trace(lm, PROMPT, "Colosseum")


def test_noise_is_seeded_and_scaled() -> None:
    span = ct.TokenSpan(1, 3)
    a = ct.make_noise(10, span, 64, 2.0, seed=1)
    assert torch.equal(a, ct.make_noise(10, span, 64, 2.0, seed=1))
    assert a.shape == (10, 2, 64) and 1.8 < float(a.std()) < 2.2
    lm = tiny_model("gpt2")
    assert ct.embedding_std(lm, [SUBJECT]) > 0


def test_default_noise_is_fixed_per_model_not_per_prompt() -> None:
    """3 x the std of the built-in facts' subject embeddings, whatever the traced subject."""
    from remedi.data import load_builtin

    lm = tiny_model("gpt2")
    subjects = sorted({c.subject for c in load_builtin()})
    expected = 3 * ct.embedding_std(lm, subjects)
    assert ct.default_noise_std(lm) == pytest.approx(expected)
    eiffel = ct.trace(lm, PROMPT, SUBJECT, kinds=["hidden"], samples=2, layers=[0], tokens=[-1])
    toyota = ct.trace(
        lm, "Toyota is located in", "Toyota", kinds=["hidden"], samples=2, layers=[0], tokens=[-1]
    )
    assert eiffel.noise_std == toyota.noise_std == pytest.approx(expected)
    assert ct.embedding_std(lm, [SUBJECT]) != ct.embedding_std(lm, ["Toyota"])
    half = ct.trace(lm, PROMPT, SUBJECT, samples=1, noise_scale=1.5, layers=[0], tokens=[-1])
    assert half.noise_std == pytest.approx(expected / 2)
    fixed = ct.trace(lm, PROMPT, SUBJECT, samples=1, noise_std=0.25, layers=[0], tokens=[-1])
    assert fixed.noise_std == 0.25
    other = tiny_model("gpt2", seed=1)
    assert ct.default_noise_std(other) != ct.default_noise_std(lm)  # per model, not per spec


def test_a_given_target_is_traced_at_its_first_text_token() -> None:
    """Tracing " 1889" traces the digit "1" after the bare space, not the space itself."""
    lm = tiny_model("llama")
    prompt = "The Eiffel Tower was built in"
    result = ct.trace(lm, prompt, SUBJECT, "1889", kinds=["hidden"], samples=2, layers=[0])
    assert lm.tokenizer.convert_ids_to_tokens([result.target_id]) == ["1"]
    n_prompt = len(lm.tokenizer(prompt)["input_ids"])
    assert len(result.tokens) == n_prompt + 1 and result.tokens[-1].strip() == ""
    ids = lm.tokenizer([prompt + " 1"], return_tensors="pt")["input_ids"][:, :-1]
    with torch.no_grad():
        clean = torch.softmax(lm.model(input_ids=ids).logits[0, -1], -1)[result.target_id]
    assert result.clean_prob == pytest.approx(float(clean), rel=1e-4)


def test_subject_is_traced_where_the_template_put_it() -> None:
    lm = tiny_model("llama")
    prompt = "Toyota fans say Toyota is based in"
    first = ct.trace(lm, prompt, "Toyota", kinds=["hidden"], samples=1, layers=[0], tokens=[-1])
    slot = ct.trace(
        lm, prompt, "Toyota", subject_start=16, kinds=["hidden"], samples=1, layers=[0], tokens=[-1]
    )
    assert first.subject_range[0] <= 1 < slot.subject_range[0]
    assert "".join(slot.tokens[slot.subject_range[0] : slot.subject_range[1]]).strip() == "Toyota"


@pytest.mark.slow
def test_default_model_restores_clean_prediction(gemma) -> None:
    prompt, subject = "Toyota is headquartered in the country of", "Toyota"
    result = ct.trace(gemma, prompt, subject, kinds=["hidden"], layers=[-1], tokens=[-1])
    assert result.target.strip() == "Japan"
    restored = result.scores["hidden"][-1, -1].item()
    assert math.isclose(restored, result.clean_prob, rel_tol=1e-3)
    assert result.corrupted_prob < 0.5 * result.clean_prob
