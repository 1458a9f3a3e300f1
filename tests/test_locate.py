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


def test_trace_writes_json_and_figures(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "new" / "trace"
    argv = ["trace", "--model", str(model_dir), "--prompt", PROMPT, "--subject", "Eiffel Tower"]
    assert locate.main([*argv, "--output", str(out), "--samples", "2", "--window", "2"]) == 0
    found, wrote = capsys.readouterr().out.splitlines()
    assert found.startswith("trace: P(") and "with the subject corrupted" in found
    assert wrote == f"wrote {out / 'trace.json'}, trace_hidden.png, trace_mlp.png, trace_attn.png"
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


def test_trace_noise_is_fixed_per_model_or_given(model_dir: Path, tmp_path: Path) -> None:
    """The default noise is the model's dataset-level level, the same for two subjects;
    --noise-scale scales it and --noise replaces it."""
    from remedi.methods import causal_trace

    expected = causal_trace.default_noise_std(tiny_model("gpt2"))
    base = ["trace", "--model", str(model_dir), "--kinds", "hidden", "--samples", "1"]

    def noise(name: str, *extra: str) -> float:
        assert locate.main([*base, *extra, "--output", str(tmp_path / name)]) == 0
        return json.loads((tmp_path / name / "trace.json").read_text())["noise_std"]

    assert noise("a", "--prompt", PROMPT, "--subject", "Eiffel Tower") == pytest.approx(expected)
    toyota = ["--prompt", "Toyota is located in", "--subject", "Toyota"]
    assert noise("b", *toyota) == pytest.approx(expected)
    assert noise("c", *toyota, "--noise-scale", "1.5") == pytest.approx(expected / 2)
    assert noise("d", *toyota, "--noise", "0.5") == 0.5


def test_trace_prompt_may_be_a_template(model_dir: Path, tmp_path: Path) -> None:
    argv = ["trace", "--model", str(model_dir), "--prompt", "Toyota fans say {} is based in"]
    argv += ["--subject", "Toyota", "--kinds", "hidden", "--samples", "1"]
    assert locate.main([*argv, "--output", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "trace.json").read_text())
    assert data["prompt"] == "Toyota fans say Toyota is based in"
    start, end = data["subject_range"]
    assert start > 1 and "".join(data["tokens"][start:end]).strip() == "Toyota"


def test_kn_writes_neurons(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = [PROMPT, "The Eiffel Tower is in", "Eiffel Tower is in"]
    argv = ["kn", "--model", str(model_dir), "--subject", "Eiffel Tower", "--target", "Paris"]
    for p in prompts:
        argv += ["--prompt", p]
    assert locate.main([*argv, "--steps", "2", "--output", str(tmp_path)]) == 0
    found, wrote = capsys.readouterr().out.splitlines()
    assert found.startswith("kn: ") and "knowledge neuron(s) for 'Paris'" in found
    assert wrote == f"wrote {tmp_path / 'kn.json'}, kn.png"
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
        (["--subject", "Eiffel", "--samples", "0"], "--samples must be positive, got 0"),
        (["--subject", "Eiffel", "--noise", "0"], "--noise must be positive, got 0.0"),
        (["--subject", "Eiffel", "--device", "tpu"], "--device 'tpu'"),
        (["--subject", "Eiffel", "--device", "cuda:7"], "--device 'cuda:7'"),
        (["--subject", "Eiffel", "--threads", "0"], "--threads must be positive"),
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


def test_an_output_that_is_a_file_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(locate, "load_model", _no_load)
    (tmp_path / "out").write_text("a file")
    argv = ["kn", "--prompt", PROMPT, "--subject", "Eiffel", "--output", str(tmp_path / "out")]
    assert locate.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "exists and is not a directory" in err
    assert locate.main([*argv[:-1], str(tmp_path / "kn"), "--share", "1.5"]) == 2
    assert "--share must be in (0, 1], got 1.5" in capsys.readouterr().err


def _no_load(*_args: object, **_kwargs: object) -> None:
    raise AssertionError("the model must not be loaded")


def test_kinds_are_checked_by_their_choices(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["trace", "--prompt", PROMPT, "--subject", "Eiffel", "--output", "x", "--kinds", "mpl"]
    with pytest.raises(SystemExit) as done:
        locate.main(argv)
    assert done.value.code == 2
    assert "invalid choice: 'mpl' (choose from" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], ["python -m remedi.locate trace --prompt", "python -m remedi.locate kn --prompt"]),
        (
            ["trace"],
            [
                "usage: python -m remedi.locate trace",
                "{hidden,mlp,attn}",
                "(default: ['hidden', 'mlp', 'attn'])",
                "(default: 10)",
                "trace_KIND.png",
            ],
        ),
        (["kn"], ["usage: python -m remedi.locate kn", "(default: 0.2)", "--target Warsaw"]),
    ],
)
def test_help_shows_examples_and_defaults(
    argv: list[str], expected: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        locate.main([*argv, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m remedi.locate")
    assert "(default: gemma3-270m)" in text or not argv
    assert all(part in text for part in expected)


def test_a_corrupt_model_is_one_line(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in model_dir.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    (broken / "model.safetensors").write_text("garbage")
    argv = ["trace", "--model", str(broken), "--prompt", PROMPT, "--subject", "Eiffel"]
    assert locate.main([*argv, "--output", str(tmp_path / "out")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "it/s]" not in line]
    assert len(err) == 1 and err[0].startswith(f"error: --model {str(broken)!r}: ")
