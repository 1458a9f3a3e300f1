"""REMEDI editors, attribute representations, the direction hook and the loss, on tiny models."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_datamodules import write_rome

from remedi.data import load_cases
from remedi.editors import (
    EDITOR_KINDS,
    DirectionRecord,
    LossWeights,
    RemediExample,
    apply_direction,
    apply_editor,
    attribute_states,
    build_editor,
    examples_from_case,
    generate_edited,
    kl_divergence,
    logits_at,
    metrics_context,
    remedi_loss,
    training,
)
from remedi.hooks import Site, intervene
from remedi.metrics import evaluate_cases
from remedi.models import LoadedModel
from remedi.tokens import (
    cache_kwargs,
    encode_continuations,
    encode_prompts,
    final_hidden,
    returned_cache,
    score_continuations,
)

EXAMPLES = [
    RemediExample(
        "France", "The capital of France is Rome", "France is known for", "Rome", "Paris"
    ),
    RemediExample("Toyota", "Toyota makes cars in Italy", "Toyota is based in", "Italy", "Japan"),
    RemediExample("Messi", "Messi plays basketball", "Lionel Messi plays", "basketball", "soccer"),
]


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return tiny_model("gemma3_text")


@pytest.mark.parametrize("kind", EDITOR_KINDS)
def test_editor_shapes_and_start(kind: str) -> None:
    editor = build_editor(kind, 8, rank=2)
    attr, entity = torch.randn(3, 8), torch.randn(3, 8)
    d = editor(attr, entity)
    assert d.shape == (3, 8) and d.dtype == torch.float32
    if kind == "identity":
        assert torch.equal(d, attr)
    else:
        assert torch.count_nonzero(d) == 0  # trainable editors start as the unedited model


def test_editor_errors() -> None:
    with pytest.raises(ValueError, match="editor 'big'"):
        build_editor("big", 8)
    with pytest.raises(ValueError, match="rank"):
        build_editor("low_rank", 8, rank=9)
    with pytest.raises(ValueError, match="entity"):
        build_editor("biaffine", 8)(torch.randn(1, 8))


@pytest.mark.parametrize(
    "model_type", ["gpt2", "gptj", "gpt_neox", "llama", "gemma2", "gemma3_text"]
)
def test_logits_at_matches_full_forward(model_type: str) -> None:
    lm = tiny_model(model_type)
    batch = encode_prompts(lm.tokenizer, [e.prompt for e in EXAMPLES], [e.entity for e in EXAMPLES])
    full = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    rows, cols = torch.tensor([0, 1, 2, 2]), torch.tensor([1, 2, 0, 3])
    hidden = final_hidden(lm.model, batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(logits_at(lm, hidden, rows, cols), full[rows, cols])


def test_attribute_states_average_the_attribute_tokens(lm: LoadedModel) -> None:
    layer = 1
    contexts, entities = [e.context for e in EXAMPLES], [e.entity for e in EXAMPLES]
    got = attribute_states(lm, layer, contexts, entities)
    for i, (context, entity) in enumerate(zip(contexts, entities, strict=True)):
        batch = encode_prompts(lm.tokenizer, [context], [entity])
        out = lm.model(input_ids=batch.input_ids, output_hidden_states=True)
        h = out.hidden_states[layer + 1][0]
        want = h[batch.subject_spans[0].end : int(batch.last_index[0]) + 1].mean(0)
        torch.testing.assert_close(got[i], want)
    with pytest.raises(ValueError, match="no attribute text"):
        attribute_states(lm, layer, ["Paris"], ["Paris"])
    with pytest.raises(ValueError, match="layer 7"):
        attribute_states(lm, 7, contexts, entities)


def test_direction_changes_only_the_entity_token_and_later(lm: LoadedModel) -> None:
    batch = encode_prompts(lm.tokenizer, ["The capital of France is"], ["France"])
    ids, site, top = batch.input_ids, Site("block", 1), Site("block", 2)
    with intervene(lm.arch, record=[site, top]) as base:
        lm.model(input_ids=ids)
    d = torch.randn(1, lm.arch.hidden_size)
    with (
        apply_direction(lm, 1, batch.subject_last, d),
        intervene(lm.arch, record=[site, top]) as edited,
    ):
        lm.model(input_ids=ids)
    last = int(batch.subject_last[0])
    torch.testing.assert_close(edited[top][0, :last], base[top][0, :last])
    torch.testing.assert_close(edited[site][0, last], base[site][0, last] + d[0])
    assert not torch.allclose(edited[top][0, last:], base[top][0, last:])


def _trained_like(kind: str, lm: LoadedModel) -> torch.nn.Module:
    torch.manual_seed(0)
    editor = build_editor(kind, lm.arch.hidden_size, rank=4)
    for p in editor.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return editor


def test_loss_terms_gradients_and_batch_average(lm: LoadedModel) -> None:
    editor = _trained_like("affine", lm)
    attr = attribute_states(lm, 1, [e.context for e in EXAMPLES], [e.entity for e in EXAMPLES])
    terms = remedi_loss(lm, 1, editor, EXAMPLES, attr, LossWeights(norm=0.1, essence=0.5))
    assert set(terms) == {"loss", "mediated", "unmediated", "kl", "norm", "essence"}
    assert all(torch.isfinite(v) for v in terms.values())
    terms["loss"].backward()
    assert all(p.grad is not None for p in editor.parameters())
    assert all(not p.requires_grad and p.grad is None for p in lm.model.parameters())
    singles = [remedi_loss(lm, 1, editor, [e], attr[i : i + 1]) for i, e in enumerate(EXAMPLES)]
    mean_kl = sum(float(s["kl"].detach()) for s in singles) / len(singles)
    assert float(terms["kl"].detach()) == pytest.approx(mean_kl, rel=1e-4)
    assert float(terms["kl"].detach()) > 0
    mean_m = sum(float(s["mediated"].detach()) for s in singles) / len(singles)
    assert float(terms["mediated"].detach()) == pytest.approx(mean_m, rel=1e-4)


def test_null_editor_loss_matches_model_scores(lm: LoadedModel) -> None:
    editor = build_editor("null", lm.arch.hidden_size)
    attr = attribute_states(lm, 1, [e.context for e in EXAMPLES], [e.entity for e in EXAMPLES])
    prompts, news = [e.prompt for e in EXAMPLES], [e.target_mediated for e in EXAMPLES]
    scores = score_continuations(lm.model, encode_continuations(lm.tokenizer, prompts, news))
    with torch.no_grad():
        first = remedi_loss(lm, 1, editor, EXAMPLES, attr)
        full = remedi_loss(lm, 1, editor, EXAMPLES, attr, target_tokens="all")
    assert float(first["kl"]) == pytest.approx(0.0, abs=1e-6)
    assert float(full["mediated"]) == pytest.approx(float(-scores.sum.mean()), rel=1e-4)
    assert float(full["kl"]) == pytest.approx(0.0, abs=1e-6)


def test_first_token_loss_scores_the_first_text_token(lm: LoadedModel) -> None:
    """The tiny tokenizer, like Gemma's before digits, starts these targets with a bare space
    token: "first"-token training must score the first token that carries the target's text
    (as the metrics do), or every target is the same bare token."""
    editor = build_editor("null", lm.arch.hidden_size)
    attr = attribute_states(lm, 1, [e.context for e in EXAMPLES], [e.entity for e in EXAMPLES])
    prompts, news = [e.prompt for e in EXAMPLES], [e.target_mediated for e in EXAMPLES]
    batch = encode_continuations(lm.tokenizer, prompts, news)
    assert (batch.first_text_index() == 1).all()
    scores = score_continuations(lm.model, batch)
    with torch.no_grad():
        first = remedi_loss(lm, 1, editor, EXAMPLES, attr)
    assert float(first["mediated"]) == pytest.approx(float(-scores.first.mean()), rel=1e-4)


def test_biaffine_reads_the_entity_state(lm: LoadedModel) -> None:
    editor = _trained_like("biaffine", lm)
    attr = attribute_states(lm, 1, [e.context for e in EXAMPLES], [e.entity for e in EXAMPLES])
    terms = remedi_loss(lm, 1, editor, EXAMPLES, attr)
    terms["loss"].backward()
    assert editor.entity_map.weight.grad is not None
    assert float(editor.entity_map.weight.grad.abs().sum()) > 0


def test_metrics_context_edits_subject_rows_only(lm: LoadedModel, tmp_path) -> None:
    cases = load_cases(write_rome(tmp_path / "cf.json"))[:3]
    examples = [examples_from_case(c)[0] for c in cases]
    attr = attribute_states(lm, 1, [e.context for e in examples], [e.entity for e in examples])
    plain, plain_cases = evaluate_cases(lm.model, lm.tokenizer, cases, batch_size=5)
    null = metrics_context(lm, 1, build_editor("null", lm.arch.hidden_size), attr)
    same, _ = evaluate_cases(lm.model, lm.tokenizer, cases, edit=null, batch_size=5)
    assert same == pytest.approx(plain)
    edit = metrics_context(lm, 1, _trained_like("affine", lm), attr * 50)
    edited, edited_cases = evaluate_cases(lm.model, lm.tokenizer, cases, edit=edit, batch_size=5)
    assert edited["efficacy_magnitude"] != pytest.approx(plain["efficacy_magnitude"])
    for a, b in zip(plain_cases, edited_cases, strict=True):
        assert a["neighborhood_magnitude"] == pytest.approx(b["neighborhood_magnitude"])


def test_alpha_adds_alpha_times_the_direction(lm: LoadedModel) -> None:
    editor = _trained_like("affine", lm)
    example = EXAMPLES[1]
    attr = attribute_states(lm, 1, [example.context], [example.entity])
    batch = encode_prompts(lm.tokenizer, [example.prompt], [example.entity])
    record = DirectionRecord()
    with torch.no_grad():
        with apply_editor(lm, 1, editor, attr, batch.subject_last, record=record):
            once = lm.model(input_ids=batch.input_ids).logits
        assert record.directions is not None
        with apply_editor(lm, 1, editor, attr, batch.subject_last, alpha=2.5):
            scaled = lm.model(input_ids=batch.input_ids).logits
        with apply_direction(lm, 1, batch.subject_last, 2.5 * record.directions):
            manual = lm.model(input_ids=batch.input_ids).logits
    assert torch.allclose(scaled, manual, atol=1e-5)
    assert not torch.allclose(scaled, once, atol=1e-3)
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match=r"remedi\.alpha must be a finite number > 0"):
            apply_editor(lm, 1, editor, attr, batch.subject_last, alpha=bad)


def _greedy_with_edited_prompt(
    lm: LoadedModel, editor: torch.nn.Module, prompt: str, entity: str, context: str, steps: int
) -> str:
    """Reference: the prompt run once with the direction added at the entity's last token, then
    greedy steps on its key/value cache with no edit."""
    attribute = attribute_states(lm, 1, [context], [entity])
    batch = encode_prompts(lm.tokenizer, [prompt], [entity])
    with torch.no_grad():
        with apply_editor(lm, 1, editor, attribute, batch.subject_last):
            out = lm.model(input_ids=batch.input_ids, use_cache=True)
        tokens = [out.logits[:, -1].argmax(-1, keepdim=True)]
        for _ in range(steps - 1):
            cache = cache_kwargs(lm.model, returned_cache(out))
            out = lm.model(input_ids=tokens[-1], use_cache=True, **cache)
            tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    return str(lm.tokenizer.decode(torch.cat(tokens, -1)[0], skip_special_tokens=True))


def test_generate_edits_the_prompt_pass_only(lm: LoadedModel) -> None:
    prompts = ["The capital of France is", "Toyota is"]
    entities, contexts = ["France", "Toyota"], ["France is in Rome", "Toyota makes Windows"]
    null = build_editor("null", lm.arch.hidden_size)
    plain = generate_edited(lm, 1, null, prompts, entities, contexts, max_new_tokens=5)
    batch = encode_prompts(lm.tokenizer, prompts, entities, padding_side="left")
    out = lm.model.generate(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        max_new_tokens=5,
        do_sample=False,
        pad_token_id=lm.tokenizer.pad_token_id,
    )
    want = lm.tokenizer.batch_decode(out[:, batch.input_ids.shape[1] :], skip_special_tokens=True)
    assert plain == want
    editor = _trained_like("affine", lm)
    with torch.no_grad():
        editor.linear.bias.mul_(30.0)  # a direction large enough to change greedy tokens
    for prompt, entity, context, before in zip(prompts, entities, contexts, plain, strict=True):
        (edited,) = generate_edited(lm, 1, editor, [prompt], [entity], [context], max_new_tokens=5)
        assert edited == _greedy_with_edited_prompt(lm, editor, prompt, entity, context, 5)
        assert edited != before


def test_kl_divergence_matches_kl_div_value_and_gradient(
    lm: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(training, "KL_CHUNK", 2)  # several chunks
    torch.manual_seed(0)
    orig = torch.randn(5, lm.arch.hidden_size)
    edited = (orig + torch.randn_like(orig)).requires_grad_(True)
    ours = kl_divergence(lm.model, orig, edited)
    (grad,) = torch.autograd.grad(3.0 * ours, edited)
    head = lm.model.get_output_embeddings()
    reference = torch.nn.functional.kl_div(
        torch.log_softmax(head(edited), -1),
        torch.log_softmax(head(orig), -1),
        log_target=True,
        reduction="sum",
    )
    (expected,) = torch.autograd.grad(3.0 * reference, edited)
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(grad, expected)
