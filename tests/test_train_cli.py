"""``python -m remedi.train``: config printing, fit, resume with ``--ckpt_path last``, test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from test_datamodules import write_rome

from lightning_modules import register_model
from remedi.train import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    lm = tiny_model("gemma3_text")
    register_model(lm)
    root = tmp_path_factory.mktemp("cli")
    data = write_rome(root / "cf.json")
    path = root / "tiny.yaml"
    path.write_text(
        f"""
seed_everything: 0
model:
  model: {lm.spec}
  layer: 1
  lr: 0.01
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


def test_print_config_is_complete(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs" / "quickstart.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    for needle in (
        "inference_mode: false",
        "default_root_dir: checkpoints",
        "lambda_kl: 1.0",
        "class_path: datamodules.CounterFactDataModule",
        "monitor: val/loss",
    ):
        assert needle in out


def test_fit_resume_and_test(config: Path, tmp_path: Path) -> None:
    root = tmp_path / "run"
    common = ["--config", str(config), "--trainer.default_root_dir", str(root)]
    cli = main(["fit", *common])
    assert cli.trainer.global_step == 4
    assert (root / "last.ckpt").is_file()
    assert list(root.glob("best-epoch*.ckpt"))
    assert (root / "tensorboard" / "version_0" / "hparams.yaml").is_file()
    assert list((root / "tensorboard" / "version_0").glob("events.out.tfevents.*"))

    cli = main(["fit", *common, "--trainer.max_steps", "7", "--ckpt_path", "last"])
    assert cli.trainer.global_step == 7
    ckpt = torch.load(root / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] > 4  # saved after the resumed run's validation

    cli = main(["test", *common, "--ckpt_path", str(root / "last.ckpt")])
    metrics = json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())
    for name in (
        "efficacy_score",
        "efficacy_magnitude",
        "paraphrase_score",
        "paraphrase_magnitude",
        "neighborhood_score",
        "neighborhood_magnitude",
        "score",
    ):
        assert 0.0 <= metrics[name] <= 1.0 or name.endswith("magnitude")


def test_dotted_overrides_reach_the_module(config: Path, tmp_path: Path) -> None:
    cli = main(
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


def test_predict_writes_generations_and_probabilities(config: Path, tmp_path: Path) -> None:
    root = tmp_path / "run"
    main(["fit", "--config", str(config), "--trainer.default_root_dir", str(root)])
    requests = tmp_path / "requests.jsonl"
    rows = [
        {"entity": "France", "attribute": "is in Rome", "prompt": "France is", "target": "Rome"},
        {"entity": "Toyota", "attribute": "makes the iPhone", "prompt": "Toyota makes"},
    ]
    requests.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "pred.jsonl"
    main(
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


@pytest.mark.parametrize(
    "module",
    [[], ["--model", "lightning_modules.MendModule", "--model.layers", "[1, 2]"]],
    ids=["remedi", "mend"],
)
def test_ddp_on_two_cpu_processes_syncs_metrics(tmp_path: Path, module: list[str]) -> None:
    """The same config under ``--trainer.strategy ddp --trainer.devices 2``, a few steps; the
    validation metrics count every validation case once, so they were gathered from both
    processes."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

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
    (run_dir,) = root.glob("tensorboard/version_*")
    events = EventAccumulator(str(run_dir))
    events.Reload()
    counts = [e.value for e in events.Scalars("val/n_cases")]  # one validation per epoch
    assert counts and set(counts) == {4.0}
    assert 0.0 <= events.Scalars("val/efficacy_score")[0].value <= 1.0


@pytest.mark.parametrize(
    "path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.relative_to(REPO).as_posix()
)
def test_every_config_parses(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each shipped config is a complete, valid description of a run (nothing is built)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "class_path: lightning_modules." in out and "class_path: datamodules." in out


def test_last_checkpoint_follows_epochs_that_do_not_improve(config: Path, tmp_path: Path) -> None:
    """With a monitored value that never improves after the first validation, ``last.ckpt``
    still holds the newest step (Lightning alone would keep the first epoch's)."""
    root = tmp_path / "run"
    args = ["fit", "--config", str(config), "--trainer.default_root_dir", str(root)]
    args += ["--trainer.max_steps", "-1", "--trainer.max_epochs", "3"]
    main([*args, "--checkpoint.monitor", "val/n_cases", "--early_stopping.monitor", "val/n_cases"])
    ckpt = torch.load(root / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 2
    (best,) = root.glob("best-epoch*.ckpt")
    assert best.name.startswith("best-epoch00")
