"""`python -m remedi.edit` on a tiny saved model: edits are saved and reload; bad input exits 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from remedi import edit
from remedi.methods import rome
from remedi.methods.requests import load_requests, parse_request
from remedi.models import load_model

REQUESTS = [
    {"prompt": "{} is located in", "subject": "The Eiffel Tower", "target_new": "Japan"},
    {"prompt": "Toyota makes", "subject": "Toyota", "target_new": "phones", "target_true": "cars"},
]


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    monkeypatch.setenv("REMEDI_CACHE", str(tmp_path / "cache"))
    lm = tiny_model("gpt2")
    model_dir = tmp_path / "model"
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    requests = tmp_path / "requests.json"
    requests.write_text(json.dumps(REQUESTS))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Paris is the capital of France. Toyota makes cars in Japan.\n" * 30)
    return {"model": model_dir, "requests": requests, "corpus": corpus, "out": tmp_path / "out"}


def _args(paths: dict[str, Path], method: str, *extra: str) -> list[str]:
    return [
        method,
        "--model",
        str(paths["model"]),
        "--requests",
        str(paths["requests"]),
        "--output",
        str(paths["out"]),
        *extra,
    ]


def test_rome_edit_is_saved_and_reloads(
    setup: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    extra = ("--corpus", str(setup["corpus"]), "--stats-tokens", "300", "--layer", "1")
    assert edit.main(_args(setup, "rome", *extra)) == 0
    out = capsys.readouterr().out
    assert "The Eiffel Tower is located in" in out and "->" in out
    report = json.loads((setup["out"] / "edits.json").read_text())
    assert len(report) == 2 and "p_new" in report[0]["after"]
    original = load_model(str(setup["model"]))
    edited = load_model(str(setup["out"]))
    before = dict(original.model.named_parameters())
    changed = [n for n, p in edited.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed == ["transformer.h.1.mlp.c_proj.weight"]


@pytest.mark.parametrize("method", ["memit", "ft"])
def test_other_methods_run(setup: dict[str, Path], method: str) -> None:
    extra = ("--no-stats", "--layers", "0", "1") if method == "memit" else ("--layer", "0")
    assert edit.main(_args(setup, method, *extra)) == 0
    assert (setup["out"] / "config.json").is_file()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"requests": "missing.json"}, "not found"),
        ({"layer": "9"}, "--layer 9 is out of range"),
        ({"corpus": None}, "needs --corpus"),
        ({"bad_request": True}, "does not occur in prompt"),
    ],
)
def test_bad_input_exits_2_and_keeps_outputs(
    setup: dict[str, Path], capsys: pytest.CaptureFixture, change: dict, message: str
) -> None:
    setup["out"].mkdir()
    (setup["out"] / "keep.txt").write_text("earlier output")
    if change.get("bad_request"):
        setup["requests"].write_text(
            json.dumps([{"prompt": "Paris is in", "subject": "Rome", "target_new": "Spain"}])
        )
    extra = ["--layer", change.get("layer", "1")]
    if "corpus" not in change:
        extra += ["--corpus", str(setup["corpus"])]
    args = _args(setup, "rome", *extra)
    if "requests" in change:
        args[args.index("--requests") + 1] = str(setup["requests"].parent / change["requests"])
    assert edit.main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and message in errors[0]
    assert (setup["out"] / "keep.txt").read_text() == "earlier output"


def test_requests_accept_prompts_with_the_subject(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in REQUESTS))
    requests = load_requests(path)
    assert requests[1].prompt == "{} makes" and requests[1].target_true == "cars"


def test_threads_default_to_one_and_must_be_positive(
    setup: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    args = edit.build_parser().parse_args(_args(setup, "rome"))
    assert args.threads == 1
    assert edit.main(_args(setup, "rome", "--no-stats", "--threads", "0")) == 2
    assert "--threads must be positive, got 0" in capsys.readouterr().err
    assert not setup["out"].exists()


def test_command_line_flushes_its_output_before_exiting(setup: dict[str, Path]) -> None:
    """``python -m remedi.edit`` skips the interpreter teardown; piped output still arrives."""
    args = _args(setup, "rome", "--no-stats", "--layer", "1")
    env = {**os.environ, "REMEDI_CACHE": str(setup["out"].parent / "cache")}
    done = subprocess.run(
        [sys.executable, "-m", "remedi.edit", *args], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3 and "Toyota makes" in lines[1] and "saved to" in lines[2]
    assert (setup["out"] / "model.safetensors").is_file()


@pytest.mark.parametrize("model_type", ["gpt2", "gemma3_text"])
def test_top_prediction_matches_the_full_forward(model_type: str) -> None:
    """Unembedding only the last position gives the full forward's next-token distribution."""
    lm = tiny_model(model_type)
    requests = [parse_request(record) for record in REQUESTS]
    out = edit.predictions(lm, requests)
    for req, pred in zip(requests, out, strict=True):
        ids = lm.tokenizer(req.rewrite_prompt, return_tensors="pt")
        with torch.no_grad():
            probs = torch.softmax(lm.model(**ids).logits[0, -1].float(), -1)
        top = int(probs.argmax())
        assert pred["top"] == lm.tokenizer.decode([top])
        assert pred["p_top"] == pytest.approx(float(probs[top]), rel=1e-5)


@pytest.mark.slow
def test_default_model_round_trip(gemma, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """One ROME edit of the default model: saved once, reloads with only the edited weight changed
    and with the predictions the edit reported."""
    requests = tmp_path / "requests.json"
    requests.write_text(json.dumps([REQUESTS[0]]))
    out = tmp_path / "edited"
    args = ["rome", "--requests", str(requests), "--output", str(out), "--no-stats"]
    assert edit.main(args) == 0
    assert "(model load" in capsys.readouterr().out
    report = json.loads((out / "edits.json").read_text())[0]
    assert report["after"]["p_new"] > report["before"]["p_new"]
    edited = load_model(str(out))
    original = dict(gemma.model.named_parameters())
    changed = [n for n, p in edited.model.named_parameters() if not torch.equal(p, original[n])]
    layer = rome.default_layer(gemma)
    assert changed == [f"model.layers.{layer}.mlp.down_proj.weight"]
    again = edit.predictions(edited, [parse_request(REQUESTS[0])])[0]
    assert again["top"] == report["after"]["top"]
    assert again["p_top"] == pytest.approx(report["after"]["p_top"], rel=1e-4)
