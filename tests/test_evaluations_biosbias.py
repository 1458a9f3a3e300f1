"""Bias in Bios generation (remedi.evaluation.biosbias) on a tiny pickle written here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_model
from evaluations_fixtures import BIOS, trained_setup, write_bios
from sklearn.feature_extraction.text import TfidfVectorizer

from datamodules import BiasInBiosDataModule
from remedi import evaluate
from remedi.evaluation import biosbias


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bios")
    paths = trained_setup(root)
    paths["bios"] = write_bios(root / "bios.pkl")
    return paths


def test_consistency_compares_with_the_other_bios_of_the_occupation(tmp_path: Path) -> None:
    module = BiasInBiosDataModule(str(write_bios(tmp_path / "b.pkl")))
    examples = module.read_examples()
    score = biosbias.Consistency(examples)
    nurse = module.read_examples()[0]  # read again: the same bio, another object
    others = [e.context for e in examples[1:3]]
    vec = TfidfVectorizer().fit([e.context for e in examples])
    reference = np.asarray(vec.transform(others).todense()).mean(0)
    text = "She cares for patients."
    sample = np.asarray(vec.transform([text]).todense())[0]
    expected = reference @ sample / (np.linalg.norm(reference) * np.linalg.norm(sample))
    assert score(text, nurse) == pytest.approx(float(expected))
    assert score(nurse.context, nurse) < 1.0


def test_prompts_edit_the_mention_in_the_prompt(tmp_path: Path) -> None:
    example = BiasInBiosDataModule(str(write_bios(tmp_path / "b.pkl"))).read_examples()[0]
    text, start = biosbias.setting_prompt(example, "contextual")
    assert text.startswith(example.context + "\n\n") and start == text.rindex(example.entity)
    assert biosbias.setting_prompt(example, "decontextual") == (example.prompt, 0)


def test_top_k_over_every_occupation_is_always_right(tmp_path: Path) -> None:
    examples = BiasInBiosDataModule(str(write_bios(tmp_path / "b.pkl"))).read_examples()
    labels = sorted({t for t, _ in BIOS})
    found = biosbias.evaluate_setting(
        tiny_model("gpt2"),
        examples[:4],
        "decontextual",
        labels,
        biosbias.Consistency(examples),
        top_k=len(labels),
        max_new_tokens=4,
    )
    summary = biosbias.summarize(found)
    assert summary["topk_accuracy"] == 1.0 and len(found[0]["predictions"]) == 3
    assert all(r["fluency"] >= 0 for r in found)


def test_biosbias_command_writes_both_settings(trained: dict[str, Path]) -> None:
    out = trained["model"].parent / "out-bios"
    args = ["--task", "biosbias", "--model", str(trained["model"]), "--data", str(trained["bios"])]
    args += ["--method", "none", "--method", "remedi", "--checkpoint", str(trained["checkpoint"])]
    args += ["--output", str(out), "--biosbias.n_val", "1", "--biosbias.n_test", "3"]
    assert evaluate.main([*args, "--biosbias.max_new_tokens", "6"]) == 0
    rows = json.loads((out / "summary.json").read_text())
    assert [(r["method"], r["setting"]) for r in rows] == [
        ("none", "contextual"),
        ("none", "decontextual"),
        ("remedi", "contextual"),
        ("remedi", "decontextual"),
    ]
    for row in rows:
        assert row["n_cases"] == 3 and row["top1_accuracy"] <= row["topk_accuracy"]
        assert row["generation"] == "6 new tokens"
    assert len((out / "cases.jsonl").read_text().splitlines()) == 12
    # each row's accuracies recomputed from its cases' ranked predictions and targets
    records = [json.loads(line) for line in (out / "cases.jsonl").read_text().splitlines()]
    for row in rows:
        mine = [
            r for r in records if (r["method"], r["setting"]) == (row["method"], row["setting"])
        ]
        assert len(mine) == 3
        top1 = sum(r["predictions"][0] == r["target"] for r in mine) / 3
        topk = sum(r["target"] in r["predictions"] for r in mine) / 3
        assert (row["top1_accuracy"], row["topk_accuracy"]) == (
            pytest.approx(top1),
            pytest.approx(topk),
        )
        fluency = sum(r["fluency"] for r in mine) / 3
        assert row["fluency"] == pytest.approx(fluency)
