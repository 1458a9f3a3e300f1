"""``python -m remedi.train``: help, config printing, one run directory for fit / resume / test /
predict, ``--ckpt_path`` arguments, DDP, and one-line usage errors (exit code 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml
from conftest import tiny_model
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_datamodules import write_rome
from transformers import AutoModelForCausalLM, GPT2Config

from lightning_modules import LEARNED_METHODS, register_model
from remedi.models import LoadedModel, wrap_model
from remedi.train import SUBCOMMANDS, init_arguments, main, run

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(
    p for p in (REPO / "configs").rglob("*.yaml") if "evaluate" not in p.relative_to(REPO).parts
)
"""The training configs (configs/evaluate/ holds remedi.evaluate's)."""


def _tiny_yaml(path: Path, spec: str, data: Path, model: str = "") -> Path:
    """A tiny run's config; ``model`` replaces the default REMEDI ``model:`` section."""
    model = model or f"model:\n  model: {spec}\n  layer: 1\n  lr: 0.01\n"
    path.write_text(
        f"""
seed_everything: 0
{model}
data:
  class_path: datamodules.CounterFactDataModule
  init_args:
    path: {data}
    n_train: 6
    n_val: 2
    n_test: 2
    batch_size: 4
trainer:
  accelerator: cpu
  max_steps: 4
  num_sanity_val_steps: 0
  enable_progress_bar: false
  enable_model_summary: false
"""
    )
    return path


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    lm = tiny_model("gemma3_text")
    register_model(lm)
    root = tmp_path_factory.mktemp("cli")
    return _tiny_yaml(root / "tiny.yaml", lm.spec, write_rome(root / "cf.json"))


@pytest.fixture(scope="module")
def trained(config: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``last.ckpt`` of a short tiny REMEDI run (lr 0.01, layer 1, scoring mean)."""
    root = tmp_path_factory.mktemp("trained")
    run(["fit", "--config", str(config), "--trainer.default_root_dir", str(root)])
    return root / "last.ckpt"


def _error(capsys: pytest.CaptureFixture[str], args: list[str]) -> str:
    """Run ``args``, expect exit code 2 and exactly one ``error:`` line on stderr; return it."""
    assert main(args) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


# -- help and configs -----------------------------------------------------------------------------
def test_help_names_the_program_describes_remedi_and_each_subcommand(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m remedi.train")
    assert "learned knowledge editors (REMEDI, MEND, KE)" in out
    assert "python -m remedi.train fit --config configs/quickstart.yaml" in out
    flat = " ".join(out.split())  # argparse wraps the subcommand summaries
    for summary in SUBCOMMANDS.values():
        assert summary.endswith(".") and summary in flat
    with pytest.raises(SystemExit):
        main(["test", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m remedi.train [options] test")
    assert SUBCOMMANDS["test"] in " ".join(out.split())


def test_print_config_is_complete(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs" / "quickstart.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    for needle in (
        "inference_mode: false",
        "default_root_dir: checkpoints/quickstart",
        "lambda_kl: 1.0",
        "class_path: datamodules.CounterFactDataModule",
        "monitor: val/selection",
    ):
        assert needle in out


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_config_parses_and_names_its_run_directory(
    path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each shipped config is a complete, valid description of a run (nothing is built), whose
    run directory is ``checkpoints/<config path>``."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("lightning_modules.")
    assert printed["data"]["class_path"].startswith("datamodules.")
    name = path.relative_to(REPO / "configs").with_suffix("").as_posix()
    assert printed["trainer"]["default_root_dir"] == f"checkpoints/{name}"


# -- one run, one directory -----------------------------------------------------------------------
def test_fit_resume_and_test_share_one_run_directory(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Fit one epoch, resume for a second with ``--ckpt_path last``, test: checkpoints, one
    TensorBoard run (no version folders), configs and metrics all in the run directory, and no
    noise warnings on the way."""
    root = tmp_path / "run"
    common = ["--config", str(config), "--trainer.default_root_dir", str(root)]
    epochs = ["--trainer.max_steps", "-1", "--trainer.max_epochs"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = run(["fit", *common, *epochs, "1"])
    noise = ("transfer_batch_to_device", "LeafSpec", "past_key_values", "is not empty")
    assert not [w for w in caught if any(n in str(w.message) for n in noise)]
    assert cli.trainer.current_epoch == 1 and cli.trainer.global_step == 3

    cli = run(["fit", *common, *epochs, "2", "--ckpt_path", "last"])
    assert cli.trainer.global_step == 6
    assert torch.load(root / "last.ckpt", weights_only=True)["global_step"] == 6

    run(["test", *common, "--ckpt_path", "last"])
    metrics = json.loads((root / "metrics.json").read_text())
    for name in ("efficacy_score", "paraphrase_score", "neighborhood_score", "score"):
        assert 0.0 <= metrics[name] <= 1.0
    assert "efficacy_magnitude" in metrics

    assert not [p for p in root.iterdir() if p.is_dir()]  # no tensorboard/version_N
    names = {p.name for p in root.iterdir()}
    assert {"last.ckpt", "config.yaml", "config-test.yaml", "metrics.json"} <= names
    assert [n for n in names if n.startswith("best-epoch")]
    assert len([n for n in names if n.startswith("events.out.tfevents")]) == 3
    events = EventAccumulator(str(root))
    events.Reload()
    # the resumed epoch continues the curve at a later step (the reader's order of the two
    # event files follows their names, which a loaded machine can make either way)
    steps = sorted(e.step for e in events.Scalars("val/loss"))
    assert len(steps) == 2 and steps[0] < steps[1]
    assert events.Scalars("test/score")

    out = capsys.readouterr().out
    said = [line for line in out.splitlines() if line.startswith("run directory:")]
    assert len(said) == 6  # start and end of fit, the resumed fit and test
    assert all(f"run directory: {root} (" in line for line in said)
    assert f"tensorboard --logdir {root}" in said[0]


def test_causal_traces_from_the_config_land_in_the_run_directory(
    config: Path, tmp_path: Path
) -> None:
    with_trace = tmp_path / "trace.yaml"
    callbacks = (
        "  callbacks:\n"
        "    - class_path: lightning_modules.callbacks.CausalTraceCallback\n"
        "      init_args: {limit: 1, kinds: [mlp], samples: 2}\n"
    )
    with_trace.write_text(config.read_text().replace("trainer:\n", "trainer:\n" + callbacks))
    root = tmp_path / "run"
    run(["fit", "--config", str(with_trace), "--trainer.default_root_dir", str(root)])
    events = EventAccumulator(str(root), size_guidance={"images": 0})
    events.Reload()
    assert [t for t in events.Tags()["images"] if t.startswith("trace/mlp/case")]


def test_a_new_fit_refuses_a_run_directory_with_checkpoints(
    trained: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = trained.parent
    line = _error(capsys, ["fit", "--config", str(config), "--trainer.default_root_dir", str(root)])
    assert f"--trainer.default_root_dir {root} already holds" in line
    assert "--ckpt_path last" in line


def test_dotted_overrides_reach_the_module(config: Path, tmp_path: Path) -> None:
    cli = run(
        [
            "validate",
            "--config",
            str(config),
            "--trainer.default_root_dir",
            str(tmp_path),
            "--model.editor",
            "null",
            "--model.scoring",
            "first",
        ]
    )
    assert cli.model.editor_kind == "null"
    assert "val/efficacy_score" in cli.trainer.callback_metrics
    assert (tmp_path / "config-validate.yaml").is_file()


def test_predict_writes_generations_and_probabilities(config: Path, tmp_path: Path) -> None:
    root = tmp_path / "run"
    run(["fit", "--config", str(config), "--trainer.default_root_dir", str(root)])
    requests = tmp_path / "requests.jsonl"
    rows = [
        {"entity": "France", "attribute": "is in Rome", "prompt": "France is", "target": "Rome"},
        {"entity": "Toyota", "attribute": "makes the iPhone", "prompt": "Toyota makes"},
    ]
    requests.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "pred.jsonl"
    run(
        [
            "predict",
            "--config",
            str(config),
            "--trainer.default_root_dir",
            str(root),
            "--ckpt_path",
            str(root / "last.ckpt"),
            "--data.init_args.predict_path",
            str(requests),
            "--data.init_args.predict_output",
            str(out),
            "--data.init_args.max_new_tokens",
            "4",
        ]
    )
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["entity"] for r in lines] == ["France", "Toyota"]
    assert isinstance(lines[1]["generation"], str)
    assert 0.0 <= lines[0]["target_probability"] <= 1.0
    assert "target_probability_unedited" in lines[0]
    assert "target_probability" not in lines[1]


def test_last_checkpoint_follows_epochs_that_do_not_improve(config: Path, tmp_path: Path) -> None:
    """With a monitored value that never improves after the first validation, ``last.ckpt``
    still holds the newest step (Lightning alone would keep the first epoch's)."""
    root = tmp_path / "run"
    args = ["fit", "--config", str(config), "--trainer.default_root_dir", str(root)]
    args += ["--trainer.max_steps", "-1", "--trainer.max_epochs", "3"]
    run([*args, "--checkpoint.monitor", "val/n_cases", "--early_stopping.monitor", "val/n_cases"])
    ckpt = torch.load(root / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 2
    (best,) = root.glob("best-epoch*.ckpt")
    assert best.name.startswith("best-epoch00")


# -- --ckpt_path and the module's arguments -------------------------------------------------------
@pytest.mark.parametrize("method", sorted(LEARNED_METHODS))
def test_checkpoint_argument_lists_name_real_arguments(method: str) -> None:
    cls = LEARNED_METHODS[method]
    accepted = set(init_arguments(cls))
    assert {"model", *cls.checkpoint_fixed, *cls.checkpoint_restored} <= accepted
    assert "scoring" not in cls.checkpoint_fixed + cls.checkpoint_restored


def test_ckpt_path_keeps_what_the_command_line_gives(
    trained: Path, config: Path, tmp_path: Path
) -> None:
    """Given evaluation settings win over the checkpoint's; unset ones come from it."""
    args = ["test", "--config", str(config), "--trainer.default_root_dir", str(tmp_path)]
    args += ["--ckpt_path", str(trained), "--model.scoring", "first"]
    cli = run([*args, "--model.eval_batch_size", "3"])
    assert cli.model.scoring == "first" and cli.model.eval_batch_size == 3
    assert cli.model.hparams["lr"] == 0.01  # from the config and the checkpoint alike
    assert "test/efficacy_score" in cli.trainer.callback_metrics


def test_ckpt_path_fills_unset_arguments_from_the_checkpoint(config: Path, tmp_path: Path) -> None:
    root = tmp_path / "run"
    common = ["--config", str(config), "--trainer.default_root_dir", str(root)]
    run(["fit", *common, "--model.lambda_kl", "3.0", "--model.scoring", "first"])
    cli = run(["validate", *common, "--ckpt_path", "last"])
    assert cli.model.hparams["lambda_kl"] == 3.0
    assert cli.model.scoring == "first"


@pytest.mark.parametrize(
    ("subcommand", "flags", "expected"),
    [
        (
            "test",
            ["--model.model", "tiny-other"],
            "--model.model 'tiny-other': checkpoint {ckpt} was trained with model 'tiny-gemma3",
        ),
        (
            "test",
            ["--model.layer", "2"],
            "--model.layer 2: checkpoint {ckpt} was trained with layer 1",
        ),
        ("test", ["--model.editor", "low_rank"], "--model.editor 'low_rank': checkpoint {ckpt}"),
        (
            "validate",
            ["--model.rank", "8"],
            "--model.rank 8: checkpoint {ckpt} was trained with rank 64",
        ),
        (
            "fit",
            ["--model.lr", "0.5"],
            "--model.lr 0.5: checkpoint {ckpt} was trained with lr 0.01",
        ),
    ],
    ids=["model", "layer", "editor", "rank", "resume-lr"],
)
def test_ckpt_path_refuses_what_the_checkpoint_fixes(
    trained: Path,
    config: Path,
    capsys: pytest.CaptureFixture[str],
    subcommand: str,
    flags: list[str],
    expected: str,
) -> None:
    args = [subcommand, "--config", str(config), "--trainer.default_root_dir", str(trained.parent)]
    line = _error(capsys, [*args, "--ckpt_path", str(trained), *flags])
    assert expected.format(ckpt=trained) in line


def test_a_new_learning_rate_is_fine_when_testing(
    trained: Path, config: Path, tmp_path: Path
) -> None:
    args = ["validate", "--config", str(config), "--trainer.default_root_dir", str(tmp_path)]
    cli = run([*args, "--ckpt_path", str(trained), "--model.lr", "0.5"])
    assert cli.model.hparams["lr"] == 0.5


def test_checkpoint_of_another_method_is_refused(
    trained: Path, config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = yaml.safe_load(config.read_text())["model"]["model"]
    mend = "model:\n  class_path: lightning_modules.MendModule\n  init_args:\n"
    mend += f"    model: {spec}\n    layers: [1]\n"
    data = yaml.safe_load(config.read_text())["data"]["init_args"]["path"]
    other = _tiny_yaml(tmp_path / "mend.yaml", spec, Path(data), model=mend)
    args = ["test", "--config", str(other), "--trainer.default_root_dir", str(tmp_path)]
    line = _error(capsys, [*args, "--ckpt_path", str(trained)])
    assert f"--model lightning_modules.MendModule: checkpoint {trained} holds a 'remedi'" in line


def test_checkpoint_of_another_hidden_size_is_refused(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same model name now loads a model of another width: the checkpoint says so."""
    args = ["--config", str(config), "--trainer.default_root_dir", str(tmp_path)]
    args += ["--model.model", "tiny-width"]
    register_model(_tiny_gpt2("tiny-width", width=32))
    run(["fit", *args])
    register_model(_tiny_gpt2("tiny-width", width=48))
    line = _error(capsys, ["test", *args, "--ckpt_path", "last"])
    assert f"--ckpt_path {tmp_path / 'last.ckpt'}: trained for model 'tiny-width'" in line
    assert "(hidden 32)" in line and "(hidden 48)" in line


def _tiny_gpt2(spec: str, width: int) -> LoadedModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=320, n_embd=width, n_layer=3, n_head=4, n_positions=128)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 0
    model = AutoModelForCausalLM.from_config(config)
    return wrap_model(model, tiny_model("gpt2").tokenizer, spec=spec)


# -- one-line usage errors ------------------------------------------------------------------------
def test_unknown_keys_are_one_line_with_the_closest_key(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _error(capsys, ["fit", "--config", str(config), "--model.lyer", "3"])
    assert line == (
        "error: --model.lyer: lightning_modules.RemediModule has no argument 'lyer' "
        "(did you mean --model.layer?)"
    )
    line = _error(capsys, ["fit", "--config", str(config), "--trainer.max_epochz", "3"])
    assert line.startswith("error: --trainer.max_epochz: no such key")
    assert "--trainer.max_epochs?" in line
    typo = tmp_path / "typo.yaml"
    typo.write_text(config.read_text().replace("  layer: 1", "  lyer: 1"))
    line = _error(capsys, ["fit", "--config", str(typo)])
    assert "--model.lyer: lightning_modules.RemediModule has no argument 'lyer'" in line
    typo.write_text(config.read_text().replace("  max_steps: 4", "  max_step: 4"))
    assert "--trainer.max_step: no such key" in _error(capsys, ["fit", "--config", str(typo)])
    line = _error(capsys, ["fit", "--config", str(config), "--model.layer", "one"])
    assert line == "error: --model.layer: expected int, got 'one'"


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--data.init_args.path", "nope.json"], "error: --data.path nope.json: no such file"),
        (["--data.init_args.batch_size", "0"], "error: --data.batch_size must be positive, got 0"),
        (["--model.model", "nonsense"], "error: --model.model 'nonsense' is neither"),
        (
            ["--model.layer", "99"],
            "error: --model.layer 99 is out of range for tiny-gemma3_text, which has 3 layers",
        ),
        (["--model.model_dtype", "float8"], "error: --model.model_dtype: dtype 'float8'"),
        (["--ckpt_path", "nope.ckpt"], "error: --ckpt_path nope.ckpt: no such file"),
    ],
    ids=["data-path", "batch-size", "model", "layer", "dtype", "ckpt-path"],
)
def test_mistakes_are_one_line(
    config: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    expected: str,
) -> None:
    args = ["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path), *flags]
    assert _error(capsys, args).startswith(expected)


def test_a_hub_model_that_is_not_there_fails_fast(
    config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network in tests
    line = _error(capsys, ["fit", "--config", str(config), "--model.model", "google/gemma-3-207m"])
    assert line.startswith("error: --model.model: model 'google/gemma-3-207m' is not in the local")


def test_an_unavailable_accelerator_is_one_line(
    config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = _error(capsys, ["fit", "--config", str(config), "--trainer.accelerator", "gpu"])
    assert line == "error: --trainer.accelerator 'cuda': CUDA is not available on this machine"


def test_unreadable_checkpoints_are_one_line(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(os.urandom(2000))
    args = ["test", "--config", str(config), "--trainer.default_root_dir", str(tmp_path)]
    line = _error(capsys, [*args, "--ckpt_path", str(corrupt)])
    assert line.startswith(f"error: --ckpt_path {corrupt}: not a checkpoint")
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}}, plain)
    line = _error(capsys, [*args, "--ckpt_path", str(plain)])
    assert line == f"error: --ckpt_path {plain}: not a remedi checkpoint (no 'remedi' entry)"
    line = _error(capsys, [*args, "--ckpt_path", "last"])
    assert line == f"error: --ckpt_path last: there is no {tmp_path / 'last.ckpt'} (run fit first)"


def test_the_real_command_prints_one_line_and_exits_2() -> None:
    """The whole process: no usage dump, no warnings, no traceback."""
    args = ["fit", "--config", "configs/quickstart.yaml", "--model.lyer", "3"]
    done = subprocess.run(
        [sys.executable, "-m", "remedi.train", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "error: --model.lyer: lightning_modules.RemediModule has no argument 'lyer' "
        "(did you mean --model.layer?)"
    ]


# -- DDP ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "module",
    [[], ["--model", "lightning_modules.MendModule", "--model.layers", "[1, 2]"]],
    ids=["remedi", "mend"],
)
def test_ddp_on_two_cpu_processes_syncs_metrics(tmp_path: Path, module: list[str]) -> None:
    """The same config under ``--trainer.strategy ddp --trainer.devices 2``, a few steps; the
    validation metrics count every validation case once, so they were gathered from both
    processes."""
    lm = tiny_model("gpt2")
    model_dir = tmp_path / "tiny-gpt2"
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    data = write_rome(tmp_path / "cf.json")
    root = tmp_path / "run"
    args = [
        "fit",
        *module,
        "--model.model",
        str(model_dir),
        "--data",
        "datamodules.CounterFactDataModule",
        "--data.path",
        str(data),
        "--data.n_train",
        "4",
        "--data.n_val",
        "4",
        "--data.batch_size",
        "2",
        "--data.eval_batch_size",
        "1",
        "--trainer.default_root_dir",
        str(root),
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
        "--trainer.accelerator",
        "cpu",
        "--trainer.max_steps",
        "2",
        "--trainer.num_sanity_val_steps",
        "0",
        "--trainer.enable_progress_bar",
        "false",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "remedi.train", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (root / "last.ckpt").is_file()
    assert done.stdout.count("run directory:") == 2  # rank zero only
    events = EventAccumulator(str(root))
    events.Reload()
    counts = [e.value for e in events.Scalars("val/n_cases")]  # one validation per epoch
    assert counts and set(counts) == {4.0}
    assert 0.0 <= events.Scalars("val/efficacy_score")[0].value <= 1.0


def test_output_that_is_not_a_terminal_gets_line_progress(config: Path, tmp_path: Path) -> None:
    """Redirected to a file (as under pytest), a fit logs tqdm lines instead of Lightning's rich
    bar, which would draw only its last frame there; a progress bar the config names is kept."""
    from lightning.pytorch.callbacks import TQDMProgressBar

    from remedi.train import LogProgressBar

    # the test config turns the bar off
    common = ["--config", str(config), "--trainer.max_steps", "-1", "--trainer.max_epochs", "1"]
    common += ["--trainer.limit_train_batches", "1", "--trainer.enable_progress_bar", "true"]
    cli = run(["fit", *common, "--trainer.default_root_dir", str(tmp_path / "a")])
    assert isinstance(cli.trainer.progress_bar_callback, LogProgressBar)
    own = ["--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar"]
    cli = run(["fit", *common, *own, "--trainer.default_root_dir", str(tmp_path / "b")])
    bar = cli.trainer.progress_bar_callback
    assert isinstance(bar, TQDMProgressBar) and not isinstance(bar, LogProgressBar)
