"""`python -m remedi.edit` on a tiny saved model: edits are saved and reload; bad input exits 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import forbid_model_load, tiny_model

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
    assert edit.main(_args(setup, "rome", *extra, "--allow-failed")) == 0
    out = capsys.readouterr().out
    assert "The Eiffel Tower is located in" in out and "->" in out
    report = json.loads((setup["out"] / "edits.json").read_text())
    assert len(report) == 2 and "p_new" in report[0]["after"]
    assert all(isinstance(entry["took"], bool) for entry in report)
    original = load_model(str(setup["model"]))
    edited = load_model(str(setup["out"]))
    before = dict(original.model.named_parameters())
    changed = [n for n, p in edited.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed == ["transformer.h.1.mlp.c_proj.weight"]


@pytest.mark.parametrize("method", ["memit", "ft"])
def test_other_methods_run(setup: dict[str, Path], method: str) -> None:
    extra = ("--no-stats", "--layers", "0", "1") if method == "memit" else ("--layer", "0")
    assert edit.main(_args(setup, method, *extra, "--allow-failed")) == 0
    assert (setup["out"] / "config.json").is_file()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"requests": "missing.json"}, "not found"),
        ({"layer": "9"}, "--layer 9 is out of range"),
        ({"corpus": "no-such-corpus"}, "--corpus: not found: no-such-corpus"),
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
    extra += ["--corpus", change.get("corpus", str(setup["corpus"]))]
    args = _args(setup, "rome", *extra)
    if "requests" in change:
        args[args.index("--requests") + 1] = str(setup["requests"].parent / change["requests"])
    assert edit.main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0]
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
    args = _args(setup, "rome", "--no-stats", "--layer", "1", "--allow-failed")
    env = {**os.environ, "REMEDI_CACHE": str(setup["out"].parent / "cache")}
    done = subprocess.run(
        [sys.executable, "-m", "remedi.edit", *args], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 4 and "Toyota makes" in lines[1] and "saved to" in lines[3]
    assert lines[2].startswith("rome: ") and "/2 edits took" in lines[2]
    assert "FutureWarning" not in done.stderr
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
    printed = capsys.readouterr().out
    assert "(model load" in printed and "rome: 1/1 edits took" in printed
    report = json.loads((out / "edits.json").read_text())[0]
    assert report["after"]["p_new"] > report["before"]["p_new"] and report["took"]
    edited = load_model(str(out))
    original = dict(gemma.model.named_parameters())
    changed = [n for n, p in edited.model.named_parameters() if not torch.equal(p, original[n])]
    layer = rome.default_layer(gemma)
    assert changed == [f"model.layers.{layer}.mlp.down_proj.weight"]
    again = edit.predictions(edited, [parse_request(REQUESTS[0])])[0]
    assert again["top"] == report["after"]["top"]
    assert again["p_top"] == pytest.approx(report["after"]["p_top"], rel=1e-4)


def _errors(stderr: str) -> list[str]:
    """The lines of ``stderr`` that are not progress bars: none but ``error:`` lines expected."""
    lines = stderr.replace("\r", "\n").splitlines()
    return [line for line in lines if line.strip() and "it/s]" not in line]


def _no_edit(*_args: object, **_kwargs: object) -> None:
    """Stands in for :func:`remedi.edit.apply`: the LM stays as it was, so no edit takes."""


def test_an_edit_that_does_not_take_exits_1_but_saves_the_model(
    setup: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(edit, "apply", _no_edit)
    assert edit.main(_args(setup, "rome", "--no-stats")) == 1
    captured = capsys.readouterr()
    summary = next(line for line in captured.out.splitlines() if line.startswith("rome: "))
    assert "/2 edits took; failed: request 0 'The Eiffel Tower is located in' (top " in summary
    assert captured.out.splitlines()[0].endswith("; did not take")
    errors = _errors(captured.err)
    assert len(errors) == 1 and "did not take" in errors[0] and "--allow-failed" in errors[0]
    report = json.loads((setup["out"] / "edits.json").read_text())
    assert report[0]["took"] is False and "not 'Japan'" in report[0]["outcome"]
    assert (setup["out"] / "model.safetensors").is_file()


def test_allow_failed_exits_0(
    setup: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(edit, "apply", _no_edit)
    assert edit.main(_args(setup, "rome", "--no-stats", "--allow-failed")) == 0
    assert "edits took; failed: request 0" in capsys.readouterr().out


def test_edits_that_take_exit_0_with_a_summary(
    setup: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(edit, "apply", _no_edit)
    monkeypatch.setattr(edit, "edit_took", lambda *_args: True)
    assert edit.main(_args(setup, "rome", "--no-stats")) == 0
    captured = capsys.readouterr()
    assert "rome: 2/2 edits took\n" in captured.out and not _errors(captured.err)
    report = json.loads((setup["out"] / "edits.json").read_text())
    assert [entry["took"] for entry in report] == [True, True]


def test_edit_took_compares_with_target_true_or_else_the_top_token() -> None:
    with_true = parse_request(REQUESTS[1])
    assert edit.edit_took(with_true, {"p_new": 0.3, "p_true": 0.2, "top": " x"}, " ph")
    assert not edit.edit_took(with_true, {"p_new": 0.2, "p_true": 0.3, "top": " ph"}, " ph")
    took = {"p_new": 0.01, "p_true": 0.3}
    assert edit.outcome(with_true, took, False) == "P(new) 0.01 <= P(true) 0.30"
    without = parse_request(REQUESTS[0])
    assert edit.edit_took(without, {"p_new": 0.1, "top": " Jap", "p_top": 0.4}, " Jap")
    assert not edit.edit_took(without, {"p_new": 0.1, "top": " the", "p_top": 0.4}, " Jap")
    after = {"p_new": 0.001, "top": " the", "p_top": 0.4}
    assert edit.outcome(without, after, False) == "top ' the' 0.40, not 'Japan'; P(new) 1.0e-03"


def test_first_target_token_is_the_scored_first_token() -> None:
    lm = tiny_model("gpt2")
    request = parse_request(REQUESTS[0])
    first = edit.first_target_token(lm.tokenizer, request)
    whole = lm.tokenizer(request.rewrite_prompt + " Japan")["input_ids"]
    prompt = lm.tokenizer(request.rewrite_prompt)["input_ids"]
    assert first == lm.tokenizer.decode([whole[len(prompt)]]) and first.strip()


def test_help_shows_the_request_format_an_example_and_defaults(
    capsys: pytest.CaptureFixture,
) -> None:
    with pytest.raises(SystemExit) as done:
        edit.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m remedi.edit")
    assert "python -m remedi.edit rome --requests examples/requests.jsonl --output" in text
    assert '"target_new": "Paris"' in text and "--allow-failed" in text
    assert "(default: gemma3-270m)" in text and "(default: float32)" in text
    assert "(default: cpu)" in text


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--device", "tpu"], "--device 'tpu'"),
        (["--device", "cuda:7"], "--device 'cuda:7'"),
        (["--model", "no/such/thing"], "--model 'no/such/thing' is neither"),
        (["--output", "FILE"], "exists and is not a directory"),
        (["--ft-eps", "0"], "--ft-eps must be positive"),
        (["--requests", "BAD_JSON"], "is not valid JSON"),
        (["--requests", "MISSING_FIELD"], "missing field(s) target_new"),
        (["--requests", "ODD_LAYOUT"], "unrecognised record layout"),
    ],
)
def test_usage_errors_exit_2_in_one_line_before_loading(
    setup: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    change: list[str],
    message: str,
) -> None:
    forbid_model_load(monkeypatch)
    files = {
        "FILE": "not a directory",
        "BAD_JSON": '[{"prompt": "{} makes",',
        "MISSING_FIELD": json.dumps([REQUESTS[1], {"prompt": "{} makes", "subject": "Toyota"}]),
        "ODD_LAYOUT": json.dumps([{"question": "Who makes Corolla?"}]),
    }
    args = _args(setup, "ft", "--layer", "0")
    flag, value = change
    if value in files:
        path = setup["out"].parent / f"{value.lower()}.json"
        path.write_text(files[value])
        value = str(path)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    assert edit.main(args) == 2
    errors = _errors(capsys.readouterr().err)
    assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0]
    if flag == "--requests":
        assert value in errors[0]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a checkpoint at all", "not a PyTorch checkpoint"),
        ({"state_dict": {}}, "not a remedi checkpoint"),
    ],
)
def test_a_corrupt_checkpoint_is_one_line(
    setup: dict[str, Path], capsys: pytest.CaptureFixture, content: object, message: str
) -> None:
    """A file that is no checkpoint stops before the model loads; a checkpoint without an editor
    once the loader has read it; either way in one line naming the file."""
    checkpoint = setup["out"].parent / "editor.ckpt"
    if isinstance(content, bytes):
        checkpoint.write_bytes(content)
    else:
        torch.save(content, checkpoint)
    args = _args(setup, "mend", "--checkpoint", str(checkpoint))
    assert edit.main(args) == 2
    errors = _errors(capsys.readouterr().err)
    assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0]
    assert str(checkpoint) in errors[0] and not setup["out"].exists()
