"""Subject spans from character offsets, continuation batches and their log-probabilities."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from remedi.tokens import (
    char_span,
    continuation_logprobs,
    encode_continuations,
    encode_prompts,
    score_continuations,
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
