"""Every ``remedi.evaluate`` row names its protocol, and rows of different protocols share a
table only when asked (``--append``, ``--mixed-protocols``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import COUNTERFACT_RECORDS as RECORDS
from conftest import forbid_model_load, tiny_model
from test_evaluate_cli import ZSRE_RECORDS

from remedi import evaluate, protocol


@pytest.fixture
def paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    monkeypatch.setenv("REMEDI_CACHE", str(tmp_path / "cache"))
    lm = tiny_model("llama")
    model = tmp_path / "model"
    lm.model.save_pretrained(model)
    lm.tokenizer.save_pretrained(model)
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(RECORDS))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Paris is the capital of France. Toyota makes cars in Japan.\n" * 30)
    return {"model": model, "data": data, "corpus": corpus, "out": tmp_path / "out"}


def _run(paths: dict[str, Path], *extra: str) -> int:
    base = ["--model", str(paths["model"]), "--data", str(paths["data"])]
    return evaluate.main([*base, "--output", str(paths["out"]), *extra])


def _summary(paths: dict[str, Path]) -> list[dict]:
    summary = json.loads((paths["out"] / "summary.json").read_text())
    return summary if isinstance(summary, list) else [summary]


def test_rows_and_table_name_their_protocol(paths: dict[str, Path]) -> None:
    extra = ["--method", "none", "--method", "rome", "--corpus", str(paths["corpus"])]
    assert _run(paths, *extra, "--stats-tokens", "300", "--layer", "1", "--steps", "2") == 0
    none, rome = _summary(paths)
    stats = f"{paths['corpus']} (300 tokens)"
    common = {"metric_family": "counterfact", "scoring": "mean", "generation": "off"}
    assert none.items() >= (common | {"statistics": None, "dtype": "float32"}).items()
    assert rome.items() >= (common | {"statistics": stats, "model": str(paths["model"])}).items()
    last = (paths["out"] / "summary.md").read_text().splitlines()[-1]
    assert last == (
        "Protocol: CounterFact probability comparisons, scoring mean, no generation, "
        f"statistics {stats}, edits independent, float32, {paths['model']}"
    )


def test_zsre_and_generation_protocols(paths: dict[str, Path]) -> None:
    paths["data"].write_text(json.dumps(ZSRE_RECORDS))
    extra = ["--method", "none", "--generation", "--generation-tokens", "12"]
    assert _run(paths, *extra, "--generation-length", "new", "--limit", "1") == 0
    (row,) = _summary(paths)
    assert row["metric_family"] == "zsre" and row["scoring"] == "top-1"
    assert row["generation"] == "12 new tokens" and row["statistics"] is None
    last = (paths["out"] / "summary.md").read_text().splitlines()[-1]
    assert last.startswith("Protocol: zsRE token accuracies, scoring top-1, generation 12 new")


def test_append_adds_rows_of_the_same_protocol(paths: dict[str, Path]) -> None:
    assert _run(paths, "--method", "none", "--limit", "1") == 0
    assert _run(paths, "--method", "prefix", "--limit", "1", "--append") == 0
    assert [row["method"] for row in _summary(paths)] == ["none", "prefix"]
    cases = (paths["out"] / "cases.jsonl").read_text().splitlines()
    assert [json.loads(line)["method"] for line in cases] == ["none", "prefix"]
    table = (paths["out"] / "summary.md").read_text()
    assert "| prefix |" in table and "protocol |" not in table.splitlines()[0]


def test_append_refuses_another_protocol_before_loading(
    paths: dict[str, Path], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _run(paths, "--method", "none", "--limit", "1") == 0
    before = (paths["out"] / "summary.json").read_text()
    capsys.readouterr()

    forbid_model_load(monkeypatch)
    assert _run(paths, "--method", "none", "--dtype", "bfloat16", "--append") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: --append: the table in summary.json has another protocol (dtype is float32 "
        "there but bfloat16 here); pass --mixed-protocols to put both in one table"
    ]
    assert (paths["out"] / "summary.json").read_text() == before


def test_mixed_protocols_gets_a_protocol_column(paths: dict[str, Path]) -> None:
    assert _run(paths, "--method", "none", "--limit", "1") == 0
    extra = ["--method", "rome", "--no-stats", "--layer", "1", "--steps", "2", "--limit", "1"]
    assert _run(paths, *extra, "--append") == 0
    extra = ["--method", "prefix", "--limit", "1", "--append"]
    assert _run(paths, *extra, "--generation", "--generation-tokens", "16") == 2
    assert _run(paths, *extra, "--dtype", "bfloat16", "--mixed-protocols") == 0
    rows = _summary(paths)
    assert [r["statistics"] for r in rows] == [None, "identity (--no-stats)", None]
    assert [r["dtype"] for r in rows] == ["float32", "float32", "bfloat16"]
    lines = (paths["out"] / "summary.md").read_text().splitlines()
    assert lines[0].endswith("| protocol |") and "statistics identity (--no-stats)" in lines[3]
    assert lines[4].endswith(f"no generation, edits independent, bfloat16, {paths['model']} |")
    assert lines[-1].startswith("Protocol: mixed")


def test_append_refuses_rows_without_a_protocol(
    paths: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    paths["out"].mkdir()
    (paths["out"] / "summary.json").write_text(json.dumps({"method": "none", "n_cases": 1}))
    assert _run(paths, "--method", "none", "--limit", "1", "--append") == 2
    assert "metric_family is unrecorded there but counterfact here" in capsys.readouterr().err
    (paths["out"] / "summary.json").write_text("{not json")
    assert _run(paths, "--method", "none", "--append") == 2
    assert "is not valid JSON" in capsys.readouterr().err


def test_statistics_only_compared_among_rows_that_use_them() -> None:
    fields = {"metric_family": "counterfact", "scoring": "mean", "generation": "off"}
    fields |= {"dtype": "float32", "model": "m"}
    rows = [fields | {"statistics": None}, fields | {"statistics": "python-docs (100 tokens)"}]
    assert protocol.conflicts(rows) == {}
    other = fields | {"statistics": "identity (--no-stats)"}
    assert protocol.mismatch(rows, [other]) == (
        "statistics is python-docs (100 tokens) there but identity (--no-stats) here"
    )
    assert protocol.statistics_setting(False, None, 100_000) == "python-docs (100,000 tokens)"
    assert protocol.generation_setting(True, 100, "total") == "100 tokens in all"
