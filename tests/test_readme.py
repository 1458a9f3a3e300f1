"""The README's commands run as written: each one is replayed, in the README's order, in a fresh
folder holding the repository's configs and examples, with a tiny random model in place of the
default one and short-run flags appended (fewer steps, cases and samples)."""

from __future__ import annotations

import re
import shlex
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import _llama_kwargs, _tokenizer
from transformers import AutoModelForCausalLM, Gemma3TextConfig

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def readme_commands() -> list[str]:
    """Every command of the README's ``bash`` blocks, continuation lines joined, comments cut."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.split("  # ")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def _module(command: str) -> str:
    words = shlex.split(command)
    return words[2] if words[:2] == ["python", "-m"] else words[0]


def test_every_readme_command_is_one_this_test_replays() -> None:
    """A new kind of command in the README must be added to the replay below."""
    commands = readme_commands()
    assert commands[:2] == ["pip install torch==2.13.0 && pip install -e '.[dev]'", "pytest"]
    known = {"pip", "pytest", "tensorboard", "remedi.train", "remedi.evaluate", "remedi.edit"}
    known |= {"remedi.locate"}
    assert {_module(c) for c in commands} <= known
    for command in commands:
        for word in shlex.split(command):
            if word.startswith(("configs/", "examples/")):
                assert (ROOT / word).is_file(), f"{command!r} names {word}, not in the repository"


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder like a fresh clone (configs, examples), with a tiny four-layer model directory."""
    monkeypatch.setenv("REMEDI_CACHE", str(tmp_path / "cache"))
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    config = Gemma3TextConfig(
        **{**_llama_kwargs(), "num_hidden_layers": 4}, head_dim=8, sliding_window=8
    )
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 0
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model.save_pretrained(tmp_path / "tiny")
    _tokenizer(True).save_pretrained(tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)
    return tmp_path


TRAIN_FAST = [
    "--trainer.limit_train_batches",
    "2",
    "--trainer.limit_val_batches",
    "1",
    "--trainer.limit_test_batches",
    "1",
    "--data.init_args.n_val",
    "2",
    "--trainer.log_every_n_steps",
    "1",
]


def _fast(words: list[str], tiny: str) -> list[str]:
    """The command's arguments with the tiny model and short-run flags appended."""
    module, args = words[2], words[3:]
    if module == "remedi.train":
        return [*args, "--model.init_args.model", tiny, *TRAIN_FAST]
    fast = ["--model", tiny]
    if module == "remedi.evaluate":
        fast += ["--limit", "2", "--stats-tokens", "300"]
    elif module == "remedi.edit":
        # a tiny random model's edits need not take: accepted here, as the README does for MEND
        fast += ["--stats-tokens", "300"]
        if "--allow-failed" not in args:
            fast.append("--allow-failed")
    elif args[0] == "trace":
        fast += ["--samples", "2"]
    else:
        fast += ["--steps", "2"]
    return [*args, *fast]


def _runner(module: str) -> Callable[[list[str]], int]:
    from remedi import edit, evaluate, locate, train

    mains = {"remedi.train": train.main, "remedi.evaluate": evaluate.main}
    mains |= {"remedi.edit": edit.main, "remedi.locate": locate.main}
    return mains[module]


def test_readme_commands_run_as_written(workdir: Path) -> None:
    """Replay every ``python -m remedi.*`` command of the README (and check what ``tensorboard``
    is pointed at), in order, as a new user would after cloning."""
    tiny = str(workdir / "tiny")
    for command in readme_commands():
        words = shlex.split(command)
        if words[0] == "tensorboard":
            logdir = workdir / words[words.index("--logdir") + 1]
            assert list(logdir.rglob("events.out.tfevents.*")), f"{command!r}: no event files"
            continue
        if words[:2] != ["python", "-m"]:
            continue
        code = _runner(words[2])(_fast(words, tiny))
        assert code == 0, f"{command!r} exited with {code}"
        output = next((words[i + 1] for i, w in enumerate(words) if w == "--output"), None)
        if output is not None:
            assert any((workdir / output).iterdir()), f"{command!r} wrote nothing to {output}"
    run = workdir / "checkpoints" / "quickstart"
    assert (run / "last.ckpt").is_file() and (run / "metrics.json").is_file()
    assert (workdir / "runs" / "eval" / "chart.png").is_file()


def readme_python() -> list[str]:
    """The README's ``python`` blocks (the Python API example)."""
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_python_example_runs_as_written(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The Python API example runs as written after the MEND quickstart (the tiny model in
    place of the default one): it prints a continuation and the
    registered methods, and leaves the model bitwise as it was."""
    import remedi
    from remedi import registry, train
    from remedi.models import load_model

    tiny = str(workdir / "tiny")
    mend = ["fit", "--config", "configs/mend/quickstart.yaml"]
    assert train.main(_fast(["python", "-m", "remedi.train", *mend], tiny)) == 0
    loaded = load_model(tiny)
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    monkeypatch.setattr(remedi, "load_model", lambda *_, **__: loaded)
    blocks = readme_python()
    assert len(blocks) == 1 and "remedi.compare(" in blocks[0]
    namespace: dict[str, object] = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1] == str(registry.names())
    rows = namespace["rows"]
    assert [row["method"] for row in rows] == ["none", "rome", "mend"]  # type: ignore[attr-defined]
    assert all(torch.equal(p, before[n]) for n, p in loaded.model.named_parameters())
