"""The built-in facts are facts the default model knows."""

from __future__ import annotations

import pytest

from remedi.data import load_builtin
from remedi.metrics import ScoredRow, row_probabilities


@pytest.mark.slow
def test_default_model_knows_the_builtin_facts(gemma) -> None:
    cases = load_builtin()
    rows = [
        ScoredRow(i, "rewrite", case.rewrite_prompt, case.subject, target)
        for i, case in enumerate(cases)
        for target in (case.target_true, case.target_new or "")
    ]
    probs = row_probabilities(gemma.model, gemma.tokenizer, rows, batch_size=64)
    known = (probs[0::2] > probs[1::2]).float().mean().item()
    print(f"built-in facts known by the default model: {known:.3f} of {len(cases)} cases")
    assert known >= 0.85
