"""The locate CLI: trace and kn on a tiny model saved to disk; bad input exits 2 early."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_model

from remedi import locate

PROMPT = "The Eiffel Tower is located in"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-gpt2")
    lm = tiny_model("gpt2")
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


def test_trace_writes_json_and_figures(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "new" / "trace"
    argv = ["trace", "--model", str(model_dir), "--prompt", PROMPT, "--subject", "Eiffel Tower"]
    assert locate.main([*argv, "--output", str(out), "--samples", "2", "--window", "2"]) == 0
    data = json.loads((out / "trace.json").read_text())
    n_tokens = len(data["tokens"])
    start, end = data["subject_range"]
    assert 0 <= start < end <= n_tokens
    assert isinstance(data["target"], str) and 0 <= data["corrupted_prob"] <= 1
    for kind in ("hidden", "mlp", "attn"):
        assert len(data["scores"][kind]) == n_tokens
        assert all(len(row) == 3 for row in data["scores"][kind])
        assert (out / f"trace_{kind}.png").stat().st_size > 0
    assert not list(out.glob("*.tmp"))


def test_trace_with_target(model_dir: Path, tmp_path: Path) -> None:
    argv = ["trace", "--model", str(model_dir), "--prompt", PROMPT, "--subject", "Eiffel"]
    argv += ["--target", "Paris", "--kinds", "mlp", "--samples", "2", "--output", str(tmp_path)]
    assert locate.main(argv) == 0
    data = json.loads((tmp_path / "trace.json").read_text())
    assert list(data["scores"]) == ["mlp"] and "Paris".startswith(data["target"].strip())


def test_kn_writes_neurons(model_dir: Path, tmp_path: Path) -> None:
    prompts = [PROMPT, "The Eiffel Tower is in", "Eiffel Tower is in"]
    argv = ["kn", "--model", str(model_dir), "--subject", "Eiffel Tower", "--target", "Paris"]
    for p in prompts:
        argv += ["--prompt", p]
    assert locate.main([*argv, "--steps", "2", "--output", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "kn.json").read_text())
    assert data["prompts"] == prompts and data["target"] == "Paris"
    assert len(data["attribution"]) == 3 and len(data["attribution"][0]) == 128
    assert all(len(n) == 2 for n in data["neurons"])
    assert (tmp_path / "kn.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--subject", "Colosseum"], "--subject 'Colosseum' does not occur"),
        (["--subject", "Eiffel", "--target", " "], "--target is empty"),
        (["--subject", "Eiffel", "--model", "not a model"], "--model 'not a model'"),
        (["--subject", "Eiffel", "--samples", "0"], "--samples"),
    ],
)
def test_bad_input_exits_2_before_loading(
    extra: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def fail(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(locate, "load_model", fail)
    argv = ["trace", "--prompt", PROMPT, "--output", str(tmp_path / "out"), *extra]
    assert locate.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
