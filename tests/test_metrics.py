"""The CounterFact metrics shared by every method."""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import pytest
import torch
from conftest import target_probability, tiny_model

from remedi.data import EditCase
from remedi.metrics import (
    METRIC_NAMES,
    ZSRE_METRIC_NAMES,
    ScoredRow,
    case_rows,
    evaluate_cases,
    harmonic_mean,
    metric_names,
    row_probabilities,
    summarize,
)
from remedi.tokens import encode_continuations

CASE = EditCase(
    case_id=1,
    subject="Toyota",
    prompt="{} is headquartered in",
    target_true="Japan",
    target_new="France",
    paraphrase_prompts=["Everyone knows Toyota is based in", "Toyota makes cars in"],
    neighborhood_prompts=["Apple makes the iPhone in", "Berlin is in"],
)


def test_rows_pair_new_and_true() -> None:
    rows = case_rows(CASE)
    assert len(rows) == 2 * (1 + 2 + 2)
    assert [r.target for r in rows[:2]] == ["France", "Japan"]
    assert {r.kind for r in rows} == {"rewrite", "paraphrase", "neighborhood"}
    assert all(r.subject is None for r in rows if r.kind == "neighborhood")


def test_scores_match_a_by_hand_computation() -> None:
    """ES, PS, NS and the CounterFact+ NS against probabilities computed from the model's own
    logits (not through :mod:`remedi.tokens`)."""
    lm = tiny_model("gpt2")
    summary, (per_case,) = evaluate_cases(lm.model, lm.tokenizer, [CASE], plus=True)
    assert set(METRIC_NAMES) <= set(summary)
    plus = [f"{CASE.edit_statement}. {p}" for p in CASE.neighborhood_prompts]
    prompts = [CASE.rewrite_prompt, *CASE.paraphrase_prompts, *CASE.neighborhood_prompts, *plus]
    p_new = torch.tensor([target_probability(lm, p, "France") for p in prompts])
    p_true = torch.tensor([target_probability(lm, p, "Japan") for p in prompts])
    assert per_case["efficacy_score"] == float(p_new[0] > p_true[0])
    assert per_case["efficacy_magnitude"] == pytest.approx(float(p_new[0] - p_true[0]), abs=1e-5)
    assert per_case["paraphrase_score"] == float((p_new[1:3] > p_true[1:3]).float().mean())
    assert per_case["neighborhood_score"] == float((p_true[3:5] > p_new[3:5]).float().mean())
    assert per_case["neighborhood_plus_score"] == float((p_true[5:] > p_new[5:]).float().mean())
    magnitude = float((p_true[5:] - p_new[5:]).mean())
    assert per_case["neighborhood_plus_magnitude"] == pytest.approx(magnitude, abs=1e-5)
    for name in ("efficacy_score", "paraphrase_score", "neighborhood_score", "score"):
        assert 0.0 <= summary[name] <= 1.0


def test_edit_context_sees_each_batch() -> None:
    lm = tiny_model("llama")
    seen: list[int] = []

    @contextmanager
    def edit(batch, rows):
        assert batch.input_ids.shape[0] == len(rows)
        seen.append(len(rows))
        yield

    evaluate_cases(lm.model, lm.tokenizer, [CASE, CASE], edit=edit, batch_size=4)
    assert sum(seen) == 20 and max(seen) == 4


def test_summary_harmonic_mean() -> None:
    per_case = [
        {"efficacy_score": 1.0, "paraphrase_score": 0.5, "neighborhood_score": 1.0},
        {"efficacy_score": 1.0, "paraphrase_score": 0.5, "neighborhood_score": 0.5},
    ]
    summary = summarize(per_case)
    assert summary["neighborhood_score"] == 0.75
    assert summary["score"] == pytest.approx(3 / (1 / 1.0 + 1 / 0.5 + 1 / 0.75))
    assert harmonic_mean([0.0, 1.0]) == 0.0


def test_rewrite_rows_locate_the_subject_at_the_template_slot() -> None:
    """A subject whose text also occurs earlier in the prompt is edited where ``{}`` put it."""
    lm = tiny_model("llama")
    case = EditCase(
        case_id=2,
        subject="Toyota",
        prompt="Toyota fans say {} is based in",
        target_true="Japan",
        target_new="France",
    )
    rewrite = case_rows(case)[0]
    assert rewrite.subject_start == 16 and rewrite.prompt == "Toyota fans say Toyota is based in"
    spans: list[tuple[int, int]] = []

    @contextmanager
    def edit(batch, rows):
        assert batch.subject_spans is not None
        offsets = lm.tokenizer(rows[0].prompt, return_offsets_mapping=True)["offset_mapping"]
        spans.extend((offsets[s.first][0], offsets[s.last][1]) for s in batch.subject_spans)
        yield

    evaluate_cases(lm.model, lm.tokenizer, [case], edit=edit)
    assert spans and all(span == (16, 22) for span in spans)


def test_first_scoring_tells_numbers_apart() -> None:
    """With "first" scoring, " 1889" and " 2024" are scored by their first digits, not by the
    bare space token they share (with which their probabilities would be equal)."""
    lm = tiny_model("llama")
    rows = [
        ScoredRow(0, "rewrite", "Paris was founded in", None, "1889"),
        ScoredRow(0, "rewrite", "Paris was founded in", None, "2024"),
    ]
    probs = row_probabilities(lm.model, lm.tokenizer, rows, scoring="first")
    assert probs[0] != probs[1]
    batch = encode_continuations(lm.tokenizer, [r.prompt for r in rows], [r.target for r in rows])
    with torch.no_grad():
        logits = lm.model(input_ids=batch.input_ids).logits[:, -5]  # at the bare space
    expected = torch.softmax(logits, -1)[torch.arange(2), batch.input_ids[:, -4]]
    torch.testing.assert_close(probs, expected)


ZSRE_CASE = EditCase(
    case_id="z1",
    subject="Toyota",
    prompt="Which country is {} from?",
    target_true="Japan",
    target_new="France",
    paraphrase_prompts=["Where does Toyota come from?", "Toyota is from which country?"],
    neighborhood_prompts=["nq question: who makes the iPhone", "nq question: capital of Italy"],
    neighborhood_targets=["Apple", "Rome"],
    benchmark="zsre",
)


def _token_accuracy(lm, prompt: str, target: str) -> float:
    """Teacher-forced top-1 accuracy of ``" " + target`` after ``prompt``, from full logits."""
    batch = encode_continuations(lm.tokenizer, [prompt], [target])
    n_p, n_t = int(batch.prompt_lengths[0]), int(batch.target_lengths[0])
    with torch.no_grad():
        logits = lm.model(input_ids=batch.input_ids).logits[0]
    predicted = logits[n_p - 1 : n_p - 1 + n_t].argmax(-1)
    return float((predicted == batch.input_ids[0, n_p : n_p + n_t]).float().mean())


def test_zsre_cases_get_token_accuracy_metrics() -> None:
    lm = tiny_model("gpt2")
    summary, (per_case,) = evaluate_cases(lm.model, lm.tokenizer, [ZSRE_CASE])
    assert set(per_case) == set(ZSRE_METRIC_NAMES) and set(summary) == set(ZSRE_METRIC_NAMES)
    assert metric_names("zsre") == ZSRE_METRIC_NAMES
    assert per_case["efficacy_accuracy"] == pytest.approx(
        _token_accuracy(lm, ZSRE_CASE.rewrite_prompt, "France")
    )
    para = [_token_accuracy(lm, p, "France") for p in ZSRE_CASE.paraphrase_prompts]
    assert per_case["paraphrase_accuracy"] == pytest.approx(sum(para) / 2)
    nq = [
        _token_accuracy(lm, p, a)
        for p, a in zip(ZSRE_CASE.neighborhood_prompts, ["Apple", "Rome"], strict=True)
    ]
    assert per_case["specificity_accuracy"] == pytest.approx(sum(nq) / 2)


def test_zsre_specificity_does_not_depend_on_target_new() -> None:
    """Specificity is the edited model's accuracy on each NQ answer: another target_new changes
    efficacy, not specificity (a P(NQ answer) > P(target_new) comparison would change)."""
    lm = tiny_model("gpt2")
    other = dataclasses.replace(ZSRE_CASE, target_new="Germany and Spain")
    _, (mine, theirs) = evaluate_cases(lm.model, lm.tokenizer, [ZSRE_CASE, other])
    assert mine["specificity_accuracy"] == theirs["specificity_accuracy"]
    summary = summarize([mine, theirs])
    assert "score" not in summary and "efficacy_score" not in summary


def test_a_mixed_list_scores_each_case_by_its_benchmark() -> None:
    lm = tiny_model("gpt2")
    _, per_case = evaluate_cases(lm.model, lm.tokenizer, [CASE, ZSRE_CASE])
    assert set(per_case[0]) == set(METRIC_NAMES[:-1]) and set(per_case[1]) == set(ZSRE_METRIC_NAMES)
    assert per_case[0] == evaluate_cases(lm.model, lm.tokenizer, [CASE])[1][0]
