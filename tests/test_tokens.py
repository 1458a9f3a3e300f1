"""Subject spans from character offsets, continuation batches and their log-probabilities."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from remedi.tokens import (
    char_span,
    continuation_logprobs,
    decode_rows,
    encode_continuations,
    encode_prompts,
    fill_template,
    first_text_token,
    generate_continuations,
    generate_new_tokens,
    score_continuations,
    subject_char_span,
    token_span,
)

PROMPTS = ["The Eiffel Tower is located in", "Everyone knows that Toyota is based in"]
SUBJECTS = ["Eiffel Tower", "Toyota"]


def _decoded_span(tokenizer, ids: torch.Tensor, span) -> str:
    return tokenizer.decode(ids[span.start : span.end]).strip()


@pytest.mark.parametrize("side", ["left", "right"])
def test_subject_spans_with_padding(tiny_tokenizer, side: str) -> None:
    batch = encode_prompts(tiny_tokenizer, PROMPTS, SUBJECTS, padding_side=side)  # type: ignore[arg-type]
    for row, (span, subject) in enumerate(zip(batch.subject_spans, SUBJECTS, strict=True)):
        assert _decoded_span(tiny_tokenizer, batch.input_ids[row], span) == subject
        assert batch.attention_mask[row, span.start : span.end].all()
    assert batch.subject_spans[1].first > 0  # subject not at the start
    for row in range(2):
        last = int(batch.last_index[row])
        assert batch.attention_mask[row, last] == 1
        assert last == batch.input_ids.shape[1] - 1 or batch.attention_mask[row, last + 1] == 0
    if side == "left":
        assert (batch.last_index == batch.input_ids.shape[1] - 1).all()


def test_span_properties() -> None:
    span = token_span([(0, 0), (0, 3), (3, 10), (10, 16), (16, 19)], 4, 16)
    assert (span.first, span.last, span.all) == (2, 3, [2, 3])


def test_missing_subject_is_a_clear_error(tiny_tokenizer) -> None:
    with pytest.raises(ValueError, match="subject 'Honda' does not occur in prompt"):
        encode_prompts(tiny_tokenizer, ["Toyota is in"], ["Honda"])
    with pytest.raises(ValueError, match="subject is empty"):
        char_span("Toyota", "")


def test_continuation_batch_layout(tiny_tokenizer) -> None:
    batch = encode_continuations(tiny_tokenizer, PROMPTS, ["Paris", "Japan and Asia"], SUBJECTS)
    for row, target in enumerate(["Paris", "Japan and Asia"]):
        n_p, n_t = int(batch.prompt_lengths[row]), int(batch.target_lengths[row])
        ids = batch.input_ids[row]
        assert tiny_tokenizer.decode(ids[n_p : n_p + n_t]).strip() == target
        assert batch.target_ids[row, :n_t].tolist() == ids[n_p : n_p + n_t].tolist()
        assert batch.attention_mask[row].sum() == n_p + n_t
    assert batch.subject_spans is not None
    assert _decoded_span(tiny_tokenizer, batch.input_ids[1], batch.subject_spans[1]) == "Toyota"


def test_empty_target_rejected(tiny_tokenizer) -> None:
    with pytest.raises(ValueError, match="target is empty"):
        encode_continuations(tiny_tokenizer, ["Toyota is in"], [" "])


def test_first_token_is_the_first_that_carries_text(tiny_tokenizer) -> None:
    """The tiny tokenizer, like Gemma's, splits " 1889" into a bare space and digits (the bos
    variant keeps the space's offsets, the plain one trims them to zero width)."""
    batch = encode_continuations(tiny_tokenizer, ["Paris was founded in"] * 2, ["1889", "1776"])
    tokens = tiny_tokenizer.convert_ids_to_tokens(batch.target_ids[0].tolist())
    assert tokens[0] == "Ġ" and tokens[1] == "1"
    assert batch.target_ids[0, 0] == batch.target_ids[1, 0]  # the bare space collides
    assert batch.first_text_index().tolist() == [1, 1]
    firsts = tiny_tokenizer.convert_ids_to_tokens(batch.first_target_ids().tolist())
    assert firsts == ["1", "1"] and batch.prompt_lengths[0] == batch.prompt_lengths[1]
    assert (batch.first_target_positions() == batch.prompt_lengths).all()  # after the space
    other = encode_continuations(tiny_tokenizer, ["Paris was founded in"], ["Paris"])
    assert other.first_text_index().tolist() == [0]
    ids, token = first_text_token(tiny_tokenizer, "Paris was founded in", "1889")
    assert tiny_tokenizer.convert_ids_to_tokens([token]) == ["1"]
    assert ids.shape[1] == int(batch.prompt_lengths[0]) + 1
    assert ids[0].tolist() == batch.input_ids[0, : ids.shape[1]].tolist()


def test_first_scores_read_the_first_text_token() -> None:
    lm = tiny_model("llama")
    batch = encode_continuations(lm.tokenizer, ["Paris was founded in"] * 2, ["1889", "Paris"])
    with torch.no_grad():
        scores = score_continuations(lm.model, batch)
    assert scores.first[0] == scores.token_logprobs[0, 1]
    assert scores.first[1] == scores.token_logprobs[1, 0]
    assert scores.top1 is not None and scores.token_accuracy.shape == (2,)


def test_subject_is_located_where_the_template_puts_it(tiny_tokenizer) -> None:
    prompt, start = fill_template("Toyota fans say {} is based in", "Toyota")
    assert prompt == "Toyota fans say Toyota is based in" and start == 16
    assert subject_char_span(prompt, "Toyota", start) == (16, 22)
    assert subject_char_span(prompt, "Toyota") == (0, 6)
    with pytest.raises(ValueError, match="not at character 3"):
        subject_char_span(prompt, "Toyota", 3)
    with pytest.raises(ValueError, match="exactly one"):
        fill_template("{} and {}", "x")
    for batch in (
        encode_prompts(tiny_tokenizer, [prompt], ["Toyota"], subject_starts=[start]),
        encode_continuations(tiny_tokenizer, [prompt], ["Japan"], ["Toyota"], [start]),
    ):
        assert batch.subject_spans is not None
        span = batch.subject_spans[0]
        offsets = tiny_tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
        assert offsets[span.first][0] >= start and offsets[span.last][1] == start + 6
        assert _decoded_span(tiny_tokenizer, batch.input_ids[0], span) == "Toyota"


def test_generated_rows_are_cut_to_their_counts() -> None:
    lm = tiny_model("llama")
    batch = encode_prompts(lm.tokenizer, ["Toyota is", "Toyota makes"], ["Toyota"] * 2, "left")
    full = generate_continuations(lm.model, lm.tokenizer, batch, 6, do_sample=False)
    ids = generate_new_tokens(lm.model, lm.tokenizer, batch, 6, do_sample=False)
    cut = decode_rows(lm.tokenizer, ids, [6, 2])
    assert cut[0] == full[0] and full[1].startswith(cut[1]) and len(cut[1]) < len(full[1])
    assert cut[1] == generate_continuations(lm.model, lm.tokenizer, batch, 2, do_sample=False)[1]


@pytest.mark.parametrize("model_type", ["gpt2", "gptj", "gpt_neox", "llama", "gemma2"])
def test_logprobs_match_token_by_token_reference(model_type: str) -> None:
    lm = tiny_model(model_type)
    targets = ["Paris", "Japan and Asia"]
    batch = encode_continuations(lm.tokenizer, PROMPTS, targets)
    with torch.no_grad():
        scores = score_continuations(lm.model, batch)
        for row in range(2):
            n_p, n_t = int(batch.prompt_lengths[row]), int(batch.target_lengths[row])
            ids = batch.input_ids[row, : n_p + n_t][None]
            logprobs = lm.model(input_ids=ids).logits[0].log_softmax(-1)
            expected = [logprobs[n_p - 1 + j, ids[0, n_p + j]] for j in range(n_t)]
            torch.testing.assert_close(scores.token_logprobs[row, :n_t], torch.stack(expected))
            torch.testing.assert_close(scores.mean[row], torch.stack(expected).mean())
        full = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        torch.testing.assert_close(
            continuation_logprobs(full, batch).token_logprobs, scores.token_logprobs
        )
    assert scores.first.shape == (2,)
    assert torch.all((scores.mean_prob > 0) & (scores.mean_prob < 1))


@pytest.mark.slow
def test_gemma_tokenizer_spans_and_targets(gemma) -> None:
    tok = gemma.tokenizer
    prompts = ["The Eiffel Tower is located in", "Many say that Lionel Messi plays"]
    subjects = ["Eiffel Tower", "Lionel Messi"]
    for side in ("left", "right"):
        batch = encode_prompts(tok, prompts, subjects, padding_side=side)  # type: ignore[arg-type]
        for row, subject in enumerate(subjects):
            assert _decoded_span(tok, batch.input_ids[row], batch.subject_spans[row]) == subject
    cont = encode_continuations(tok, prompts, ["Paris", "football"], subjects)
    assert tok.convert_ids_to_tokens(cont.target_ids[0, :1].tolist()) == ["▁Paris"]
    assert cont.input_ids[0, 0] == tok.bos_token_id
    years = encode_continuations(tok, ["Paris was founded in"] * 2, ["1889", "1776"])
    assert tok.convert_ids_to_tokens(years.target_ids[:, 0].tolist()) == ["▁", "▁"]
    assert tok.convert_ids_to_tokens(years.first_target_ids().tolist()) == ["1", "1"]
    assert tok.convert_ids_to_tokens(years.target_ids[:, 2].tolist()) == ["8", "7"]
