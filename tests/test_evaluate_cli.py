"""`python -m remedi.evaluate` on a tiny saved model: outputs, restoration, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import COUNTERFACT_RECORDS as RECORDS
from conftest import tiny_model

from remedi import evaluate
from remedi.data import load_cases, parse_records
from remedi.methods import registry


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    monkeypatch.setenv("REMEDI_CACHE", str(tmp_path / "cache"))
    lm = tiny_model("llama")
    model_dir = tmp_path / "model"
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(RECORDS))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Paris is the capital of France. Toyota makes cars in Japan.\n" * 30)
    return {"model": model_dir, "data": data, "corpus": corpus, "out": tmp_path / "out"}


def _args(paths: dict[str, Path], *extra: str) -> list[str]:
    return [
        "--model",
        str(paths["model"]),
        "--data",
        str(paths["data"]),
        "--output",
        str(paths["out"]),
        *extra,
    ]


def test_table_for_several_methods(setup: dict[str, Path]) -> None:
    methods = ["none", "prefix", "ft-l", "rome", "memit"]
    extra = [x for m in methods for x in ("--method", m)]
    extra += ["--corpus", str(setup["corpus"]), "--stats-tokens", "300", "--layer", "1"]
    extra += ["--memit-layers", "0", "1", "--steps", "3", "--ft-steps", "3"]
    assert evaluate.main(_args(setup, *extra)) == 0
    summary = json.loads((setup["out"] / "summary.json").read_text())
    assert [row["method"] for row in summary] == methods
    for row in summary:
        assert row["n_cases"] == 2 and 0.0 <= row["efficacy_score"] <= 1.0
        assert {"score", "neighborhood_score", "seconds_per_edit", "model"} <= row.keys()
    lines = (setup["out"] / "cases.jsonl").read_text().splitlines()
    assert len(lines) == 2 * len(methods) and json.loads(lines[0])["case_id"] == 7
    table = (setup["out"] / "summary.md").read_text().splitlines()
    assert len(table) == 2 + len(methods) and table[0].startswith("| method")


def test_single_method_summary_is_one_flat_object(setup: dict[str, Path]) -> None:
    assert evaluate.main(_args(setup, "--method", "none", "--limit", "1")) == 0
    summary = json.loads((setup["out"] / "summary.json").read_text())
    assert summary["method"] == "none" and summary["n_cases"] == 1


@pytest.mark.parametrize("method", ["ft", "ft-l", "rome", "memit"])
def test_model_is_restored_bitwise_after_every_method(method: str, setup: dict[str, Path]) -> None:
    lm = tiny_model("gpt2")
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    args = evaluate.build_parser().parse_args(
        _args(setup, "--method", method, "--no-stats", "--layer", "1", "--steps", "2")
    )
    args.ft_steps = 2
    cases = load_cases(setup["data"])
    rows, records = evaluate.evaluate(lm, [method], cases, args)
    assert rows[0]["n_cases"] == 2 and len(records) == 2
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "rome"], "needs --corpus"),
        (["--method", "none", "--limit", "0"], "--limit must be positive"),
        (["--method", "remedi"], "needs --checkpoint"),
        (["--method", "rome", "--no-stats", "--layer", "5"], "--layer 5 is out of range"),
    ],
)
def test_bad_input_exits_2(
    setup: dict[str, Path], capsys: pytest.CaptureFixture, extra: list[str], message: str
) -> None:
    assert evaluate.main(_args(setup, *extra)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and message in errors[0]
    assert not setup["out"].exists()


def test_missing_data_file(setup: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    setup["data"] = setup["data"].with_name("nope.json")
    assert evaluate.main(_args(setup, "--method", "none")) == 2
    assert "not found" in capsys.readouterr().err


def test_prefix_case_states_the_new_fact() -> None:
    case = load_cases_from(RECORDS)[0]
    prefixed = registry.prefix_case(case)
    assert prefixed.rewrite_prompt.startswith("The Eiffel Tower is located in Japan. ")
    assert all(
        p.startswith("The Eiffel Tower is located in Japan. ")
        for p in prefixed.neighborhood_prompts
    )


def load_cases_from(records: list[dict]) -> list:
    from remedi.data import parse_records

    return parse_records(records)[0]


def test_unedited_scoring_in_groups_matches_one_call(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """none/prefix score their cases in progress-bar groups; known_cases filters in batches."""
    from remedi.metrics import evaluate_cases

    lm = tiny_model("llama")
    cases = parse_records(RECORDS * 3)[0]
    monkeypatch.setattr(registry, "SCORE_GROUP", 4)
    grouped = registry.score_method(lm, "none", cases).per_case
    assert grouped == evaluate_cases(lm.model, lm.tokenizer, cases)[1]
    assert "evaluate none" in capsys.readouterr().err
    known = evaluate.known_cases(lm, cases, batch_size=4)
    expected = [i for i, m in enumerate(grouped) if m["efficacy_score"] == 0.0]
    assert known == expected
