"""The CounterFact metrics shared by every method."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from conftest import tiny_model

from remedi.data import EditCase
from remedi.metrics import METRIC_NAMES, case_rows, evaluate_cases, harmonic_mean, summarize
from remedi.tokens import encode_continuations, score_continuations

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


def test_scores_match_direct_comparison() -> None:
    lm = tiny_model("gpt2")
    summary, (per_case,) = evaluate_cases(lm.model, lm.tokenizer, [CASE])
    assert set(summary) == set(METRIC_NAMES)
    prompts = [CASE.rewrite_prompt, *CASE.paraphrase_prompts, *CASE.neighborhood_prompts]
    with torch.no_grad():
        p_new = score_continuations(
            lm.model, encode_continuations(lm.tokenizer, prompts, ["France"] * 5)
        ).mean_prob
        p_true = score_continuations(
            lm.model, encode_continuations(lm.tokenizer, prompts, ["Japan"] * 5)
        ).mean_prob
    assert per_case["efficacy_score"] == float(p_new[0] > p_true[0])
    assert per_case["efficacy_magnitude"] == pytest.approx(float(p_new[0] - p_true[0]), abs=1e-6)
    assert per_case["paraphrase_score"] == float((p_new[1:3] > p_true[1:3]).float().mean())
    assert per_case["neighborhood_score"] == float((p_true[3:] > p_new[3:]).float().mean())
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
