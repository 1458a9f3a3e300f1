"""Interrupted processes leave outputs whole: training killed (SIGKILL) mid-epoch and mid-write of
a checkpoint resumes with ``--ckpt_path last`` to the weights of an uninterrupted run, and
``remedi.evaluate`` / ``remedi.edit`` stopped by SIGINT or SIGTERM leave no half-written output.

Every run is a real process: a server (this file run as a script) imports the commands once and
forks one child per run, which installs its fault (a kill or a signal at a chosen point), runs
the command's ``main`` and exits with its code; the test reads the exit status and the files.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import COUNTERFACT_RECORDS, tiny_model
from test_datamodules import write_rome

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {"train": "remedi.train", "evaluate": "remedi.evaluate", "edit": "remedi.edit"}
STEPS_PER_EPOCH = 3


# -- the server: one process that forks a child per run ------------------------------------------
def serve() -> None:
    """Read one JSON request a line (command, args, fault, log file), run it in a forked child,
    answer with the child's exit status (negative: killed by that signal)."""
    import importlib

    torch.set_num_threads(1)
    mains = {name: importlib.import_module(module).main for name, module in COMMANDS.items()}
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(mains[request["command"]], request)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"status": os.waitstatus_to_exitcode(status)}), flush=True)


def _child(main: Any, request: dict[str, Any]) -> None:
    """In the forked child: log to the request's file, install the fault, run, exit."""
    code = 1
    signal.alarm(300)  # a hung run dies (SIGALRM) instead of hanging the test
    try:
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        install_fault(request.get("fault") or {})
        code = main(request["args"])
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def install_fault(fault: dict[str, Any]) -> None:
    """Patch the child so that it is killed or signalled at the fault's point."""
    if "kill_at_step" in fault:
        _kill_at_step(int(fault["kill_at_step"]))
    if "kill_in_save" in fault:
        _kill_in_save(int(fault["kill_in_save"]))
    if "signal_at" in fault:
        _signal_at(fault["signal_at"], signal.Signals[fault["signal"]])


def _kill_at_step(step: int) -> None:
    """SIGKILL when training step ``step`` (0-based, global) starts: in the middle of an epoch."""
    from lightning_modules.learned_editor import LearnedEditorModule

    original = LearnedEditorModule.training_step

    def training_step(self: LearnedEditorModule, batch: Any, batch_idx: int) -> Any:
        if self.trainer.global_step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, batch, batch_idx)

    LearnedEditorModule.training_step = training_step  # type: ignore[method-assign]


def _kill_in_save(nth: int) -> None:
    """SIGKILL halfway through writing the ``nth`` ``last.ckpt`` of this process: the file being
    written gets the first half of the checkpoint's bytes."""
    original = torch.save
    seen = [0]

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        target = str(f) if isinstance(f, str | os.PathLike) else ""
        if isinstance(obj, dict) and "remedi" in obj and Path(target).name.startswith("last"):
            seen[0] += 1
            if seen[0] == nth:
                buffer = io.BytesIO()
                original(obj, buffer)
                with open(target, "wb") as out:
                    out.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
        original(obj, f, *args, **kwargs)

    torch.save = save


def _signal_at(point: str, signum: signal.Signals) -> None:
    """Send ``signum`` to this process at ``point``: ``evaluate`` (as the evaluation starts),
    ``write`` (as the first file of a staged output folder is flushed to disk) or ``rename``
    (right after the earlier output folder is moved aside, before the new one takes its name)."""
    import pathlib

    import remedi.atomic
    import remedi.evaluate

    targets = {
        "evaluate": (remedi.evaluate, "evaluate", lambda *a: True),
        "write": (remedi.atomic, "_fsync", lambda *a: ".tmp-" in str(a[0])),
        "rename": (pathlib.Path, "rename", lambda *a: ".old-" in str(a[1])),
    }
    target, name, chosen = targets[point]
    original = getattr(target, name)
    sent = [False]

    def patched(*args: Any, **kwargs: Any) -> Any:
        if point == "rename":  # the signal comes after the call
            result = original(*args, **kwargs)
        if not sent[0] and chosen(*args):
            sent[0] = True
            os.kill(os.getpid(), signum)
        return result if point == "rename" else original(*args, **kwargs)

    setattr(target, name, patched)


class Server:
    """The pytest side of :func:`serve`."""

    def __init__(self, root: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        env["REMEDI_CACHE"] = str(root / "cache")
        self.root = root
        self.runs = 0
        self.process = subprocess.Popen(
            [sys.executable, __file__],
            cwd=root,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert json.loads(self._line()) == {"ready": True}

    def _line(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, "the run server died"
        return line

    def run(
        self, command: str, args: list[str], fault: dict[str, Any] | None = None
    ) -> tuple[int, str]:
        """Run ``command`` with ``args`` in a child; return its exit status and its output."""
        assert self.process.stdin is not None
        self.runs += 1
        log = self.root / f"run{self.runs}.log"
        request = {"command": command, "args": args, "fault": fault, "log": str(log)}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        status = json.loads(self._line())["status"]
        return int(status), log.read_text()

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = Server(tmp_path_factory.mktemp("server"))
    yield running
    running.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny GPT-2 saved to a folder, CounterFact records and edit requests."""
    root = tmp_path_factory.mktemp("inputs")
    lm = tiny_model("gpt2")
    lm.model.save_pretrained(root / "model")
    lm.tokenizer.save_pretrained(root / "model")
    (root / "cases.json").write_text(json.dumps(COUNTERFACT_RECORDS))
    requests = [{"prompt": "{} makes", "subject": "Toyota", "target_new": "phones"}]
    (root / "requests.json").write_text(json.dumps(requests))
    return {
        "model": root / "model",
        "train": write_rome(root / "train.json"),
        "cases": root / "cases.json",
        "requests": root / "requests.json",
    }


# -- training: SIGKILL, then --ckpt_path last -----------------------------------------------------
MODULES = {  # each: three training steps an epoch (REMEDI trains on two examples a case)
    "remedi": ["--model.layer", "1", "--model.lr", "0.01", "--data.batch_size", "4"],
    "mend": ["--model", "lightning_modules.MendModule", "--model.layers", "[1, 2]"],
}


def _fit(files: dict[str, Path], root: Path, method: str, *extra: str) -> list[str]:
    return [
        "fit",
        "--model.model",
        str(files["model"]),
        "--seed_everything",
        "0",
        "--data",
        "datamodules.CounterFactDataModule",
        "--data.path",
        str(files["train"]),
        "--data.n_train",
        str(2 * STEPS_PER_EPOCH),
        "--data.n_val",
        "2",
        "--trainer.default_root_dir",
        str(root),
        "--trainer.accelerator",
        "cpu",
        "--trainer.max_epochs",
        "3",
        "--trainer.num_sanity_val_steps",
        "0",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.logger",
        "false",
        "--data.batch_size",
        "2",
        *MODULES[method],
        *extra,
    ]


def _load(path: Path) -> dict[str, Any]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert isinstance(checkpoint, dict)
    return checkpoint


def _assert_loads(path: Path, method: str, files: dict[str, Path], step: int) -> None:
    """``path`` is a whole checkpoint of training step ``step`` that the module can load."""
    from lightning_modules import load_trained
    from remedi.models import load_model

    assert _load(path)["global_step"] == step
    module = load_trained(method, path, load_model(str(files["model"])))
    assert module.editor is not None


def _assert_same_run(root: Path, reference: Path) -> None:
    """The same checkpoint files (no leftovers), with equal editor weights, best weights and
    optimizer state."""
    assert sorted(p.name for p in root.iterdir()) == sorted(p.name for p in reference.iterdir())
    mine, theirs = _load(root / "last.ckpt"), _load(reference / "last.ckpt")
    assert mine["global_step"] == theirs["global_step"] == 3 * STEPS_PER_EPOCH
    for key in ("state_dict", "remedi_best"):
        flat, expected = _flat(mine[key]), _flat(theirs[key])
        assert flat.keys() == expected.keys()
        for name, value in flat.items():
            same = torch.equal(value, expected[name]) if torch.is_tensor(value) else None
            assert same or value == expected[name], f"{key}.{name} differs after resuming"
    states = mine["optimizer_states"][0]["state"], theirs["optimizer_states"][0]["state"]
    for index, state in states[0].items():
        assert torch.equal(state["exp_avg"], states[1][index]["exp_avg"])


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree}


@pytest.fixture(scope="module")
def uninterrupted(
    server: Server, files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """The run directory of an uninterrupted three-epoch run of each method."""
    runs = {}
    for method in MODULES:
        root = tmp_path_factory.mktemp(f"reference-{method}")
        status, log = server.run("train", _fit(files, root, method))
        assert status == 0, log[-3000:]
        runs[method] = root
    return runs


def test_remedi_killed_mid_epoch_then_mid_checkpoint_resumes_to_the_same_weights(
    server: Server, files: dict[str, Path], uninterrupted: dict[str, Path], tmp_path: Path
) -> None:
    """SIGKILL in epoch 1 (no checkpoint is written mid-epoch: last.ckpt of epoch 0 stays);
    resumed, SIGKILL halfway through writing epoch 2's last.ckpt (epoch 1's stays whole); resumed
    again, the run ends with exactly the weights of a run never interrupted."""
    root = tmp_path / "run"
    status, log = server.run("train", _fit(files, root, "remedi"), {"kill_at_step": 4})
    assert status == -signal.SIGKILL, log[-3000:]
    _assert_loads(root / "last.ckpt", "remedi", files, STEPS_PER_EPOCH)
    resume = _fit(files, root, "remedi", "--ckpt_path", "last")
    status, log = server.run("train", resume, {"kill_in_save": 2})
    assert status == -signal.SIGKILL, log[-3000:]
    _assert_loads(root / "last.ckpt", "remedi", files, 2 * STEPS_PER_EPOCH)
    status, log = server.run("train", resume)
    assert status == 0, log[-3000:]
    _assert_same_run(root, uninterrupted["remedi"])


def test_mend_killed_in_its_first_checkpoint_then_mid_epoch_resumes_to_the_same_weights(
    server: Server, files: dict[str, Path], uninterrupted: dict[str, Path], tmp_path: Path
) -> None:
    """SIGKILL halfway through the first last.ckpt (the best checkpoint of the same step is
    whole, and --ckpt_path last resumes from it); resumed, SIGKILL mid-epoch 2; resumed again,
    the weights equal an uninterrupted run's."""
    root = tmp_path / "run"
    status, log = server.run("train", _fit(files, root, "mend"), {"kill_in_save": 1})
    assert status == -signal.SIGKILL, log[-3000:]
    assert not (root / "last.ckpt").exists()
    (best,) = root.glob("best*.ckpt")
    _assert_loads(best, "mend", files, STEPS_PER_EPOCH)
    resume = _fit(files, root, "mend", "--ckpt_path", "last")
    status, log = server.run("train", resume, {"kill_at_step": 2 * STEPS_PER_EPOCH + 1})
    assert status == -signal.SIGKILL, log[-3000:]
    _assert_loads(root / "last.ckpt", "mend", files, 2 * STEPS_PER_EPOCH)
    status, log = server.run("train", resume)
    assert status == 0, log[-3000:]
    _assert_same_run(root, uninterrupted["mend"])


def test_the_trainer_writes_checkpoints_atomically_and_durably(
    files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each checkpoint (and the resolved config) is written to a temporary file beside its name,
    flushed to disk, renamed over the name, and its folder flushed (Lightning's own writers
    stage checkpoints in the system temporary folder and flush nothing)."""
    import remedi.atomic
    from remedi.train import AtomicCheckpointIO, run

    flushed: list[Path] = []
    monkeypatch.setattr(remedi.atomic, "_fsync", lambda path: flushed.append(Path(path)))
    root = tmp_path / "run"
    cli = run(_fit(files, root, "remedi", "--trainer.max_epochs", "1"))
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    best = cli.trainer.checkpoint_callback.best_model_path  # type: ignore[union-attr]
    for name in ("last.ckpt", Path(best).name, "config.yaml"):
        written = flushed.index(next(p for p in flushed if p.name.startswith(name + ".")))
        assert flushed[written].suffix == ".tmp" and flushed[written + 1] == root
    assert not list(root.glob("*.tmp"))


# -- evaluate and edit: SIGINT and SIGTERM ---------------------------------------------------------
def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _assert_no_leftovers(output: Path) -> None:
    siblings = [p.name for p in output.parent.iterdir() if p.name.startswith(output.name + ".")]
    assert siblings == []
    assert [p.name for p in output.iterdir() if ".tmp" in p.name] == []


def _assert_whole_table(output: Path, methods: list[str]) -> None:
    """summary.json, summary.md and cases.jsonl describe the same ``methods``, in order."""
    summary = json.loads((output / "summary.json").read_text())
    rows = summary if isinstance(summary, list) else [summary]
    assert [row["method"] for row in rows] == methods
    cases = [json.loads(line) for line in (output / "cases.jsonl").read_text().splitlines()]
    assert len(cases) == sum(row["n_cases"] for row in rows)
    table = (output / "summary.md").read_text()
    assert all(f"| {method} " in table for method in methods)
    assert (output / "chart.png").stat().st_size > 0


def _evaluate(files: dict[str, Path], output: Path, method: str, *extra: str) -> list[str]:
    return [
        "--method",
        method,
        "--model",
        str(files["model"]),
        "--data",
        str(files["cases"]),
        "--output",
        str(output),
        *extra,
    ]


@pytest.mark.parametrize(
    ("point", "name"),
    [("evaluate", "SIGTERM"), ("write", "SIGINT"), ("write", "SIGTERM"), ("rename", "SIGINT")],
)
def test_evaluate_append_interrupted_keeps_the_earlier_rows(
    server: Server, files: dict[str, Path], tmp_path: Path, point: str, name: str
) -> None:
    """A signal while evaluating or while writing leaves the earlier table byte for byte and
    no temporary files; one between the renames that publish the new table waits for them (the
    table then has both rows). Either way: one error line and exit code 128 + the signal."""
    output = tmp_path / "eval"
    status, log = server.run("evaluate", _evaluate(files, output, "none"))
    assert status == 0, log[-3000:]
    before = _snapshot(output)
    fault = {"signal_at": point, "signal": name}
    status, log = server.run("evaluate", _evaluate(files, output, "prefix", "--append"), fault)
    signum = signal.Signals[name]
    assert status == 128 + signum, log[-3000:]
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: interrupted by {name};")
    _assert_no_leftovers(output)
    if point == "rename":
        _assert_whole_table(output, ["none", "prefix"])
    else:
        assert _snapshot(output) == before
        _assert_whole_table(output, ["none"])


def test_evaluate_interrupted_before_its_first_output_leaves_no_folder(
    server: Server, files: dict[str, Path], tmp_path: Path
) -> None:
    output = tmp_path / "eval"
    fault = {"signal_at": "write", "signal": "SIGTERM"}
    status, log = server.run("evaluate", _evaluate(files, output, "none"), fault)
    assert status == 128 + signal.SIGTERM, log[-3000:]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("point", "name"), [("write", "SIGTERM"), ("rename", "SIGTERM")])
def test_edit_interrupted_keeps_a_whole_model_folder(
    server: Server, files: dict[str, Path], tmp_path: Path, point: str, name: str
) -> None:
    """The edited model folder is the earlier one (a signal while it is written) or the new one
    (a signal between the renames that swap it in), never a part, never none."""
    output = tmp_path / "edited"
    args = ["ft", "--model", str(files["model"]), "--requests", str(files["requests"])]
    args += ["--output", str(output), "--layer", "0", "--allow-failed"]
    status, log = server.run("edit", args)
    assert status == 0, log[-3000:]
    before = _snapshot(output)
    status, log = server.run("edit", args, {"signal_at": point, "signal": name})
    assert status == 128 + signal.Signals[name], log[-3000:]
    _assert_no_leftovers(output)
    after = _snapshot(output)
    assert after.keys() == before.keys()
    if point == "write":
        assert after == before


if __name__ == "__main__":
    serve()
