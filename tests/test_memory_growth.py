"""Long runs do not leak: a reduced ``benchmarks/memory_growth.py`` run (REMEDI training through
Lightning, ROME evaluation through the shared registry) keeps resident memory flat with no hook
left on the LM, and every hook placed on the LM is removed again, on errors too."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import score_method, tiny_model
from test_restores import CASES, METHODS, editor_for

from remedi.editors import build_editor, generate_edited, metrics_context
from remedi.hooks import Site, StopForward, count_hooks, intervene
from remedi.metrics import evaluate_cases

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import memory_growth  # noqa: E402


def test_reduced_long_runs_keep_memory_flat_and_hooks_at_zero(tmp_path: Path) -> None:
    """100 training steps (validation with a ROME callback every 25) and 60 ROME evaluations:
    no hook on the LM at any sample, and RSS after a 30-step warm-up grows by under 5%."""
    output = tmp_path / "memory.json"
    argv = ["--output", str(output), "--steps", "100", "--cases", "60", "--warmup", "30"]
    argv += ["--every", "10"]
    result = memory_growth.run(memory_growth.build_parser().parse_args(argv), lambda _: None)
    for name in ("train", "rome"):
        run = result[name]
        assert [s["hooks"] for s in run["samples"]] == [0] * len(run["samples"]), name
        assert run["samples"][-1]["step"] == (100 if name == "train" else 60)
        assert run["growth_pct"] < 5.0, (name, run["samples"])
    assert json.loads(output.read_text())["passed"]


def test_intervene_removes_its_hooks_on_exit_stop_and_error() -> None:
    lm = tiny_model("gpt2")
    ids = torch.tensor([[3, 4, 5]])
    with intervene(lm.arch, record=[Site("block", 0), Site("mlp_in", 1)]):
        assert count_hooks(lm.model) == 2
        lm.model(input_ids=ids)
    assert count_hooks(lm.model) == 0
    with intervene(lm.arch, stop_after=Site("block", 0)):
        lm.model(input_ids=ids)  # StopForward is swallowed
    assert count_hooks(lm.model) == 0
    with pytest.raises(ValueError), intervene(lm.arch, record=[Site("attn", 2)]):
        raise ValueError("failed inside the block")
    assert count_hooks(lm.model) == 0
    assert issubclass(StopForward, Exception)


@pytest.mark.parametrize("method", METHODS)
def test_no_hooks_after_apply_restore_and_evaluation(method: str) -> None:
    """Each method's apply + restore, and scoring it on cases, leave no hook on the LM."""
    lm = tiny_model("llama")
    editor_for(lm, method)(CASES[0]).restore()
    assert count_hooks(lm.model) == 0
    score_method(
        lm,
        "kn" if method == "kn-erase" else method,
        CASES,
        progress=False,
        editor=editor_for(lm, method),
    )
    assert count_hooks(lm.model) == 0


def test_no_hooks_after_remedi_evaluation_and_generation() -> None:
    lm = tiny_model("llama")
    editor = build_editor("affine", lm.arch.hidden_size)
    attributes = torch.randn(len(CASES), lm.arch.hidden_size)
    edit = metrics_context(lm, 1, editor, attributes)
    evaluate_cases(lm.model, lm.tokenizer, CASES, edit=edit)
    assert count_hooks(lm.model) == 0
    subjects = [c.subject for c in CASES]
    contexts = [f"{c.subject} is in {c.target_new}" for c in CASES]
    prompts = [c.rewrite_prompt for c in CASES]
    generate_edited(lm, 1, editor, prompts, subjects, contexts, max_new_tokens=2)
    assert count_hooks(lm.model) == 0
