"""Evaluation callbacks: baselines and causal traces run inside validation, log next to the
editor's metrics, need no user-side inference_mode setting, and leave the LM unchanged."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import tiny_model
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_datamodules import write_rome

from datamodules import CounterFactDataModule
from lightning_modules import RemediModule, register_model
from lightning_modules.callbacks import CausalTraceCallback, EditorBaseline


def _fit(tmp_path: Path, callbacks: list[L.Callback], inference_mode: bool) -> L.Trainer:
    lm = tiny_model("gpt2")
    register_model(lm)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    data = CounterFactDataModule(
        path=str(write_rome(tmp_path / "cf.json")), n_train=4, n_val=2, n_test=2, batch_size=2
    )
    module = RemediModule(model=lm.spec, layer=1)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=1,
        num_sanity_val_steps=1,
        inference_mode=inference_mode,
        callbacks=callbacks,
        logger=L.pytorch.loggers.TensorBoardLogger(tmp_path / "tb"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, datamodule=data)
    for key, value in lm.model.state_dict().items():
        assert torch.equal(value, before[key]), f"callback left {key} changed"
    return trainer


@pytest.mark.parametrize("inference_mode", [True, False])
def test_rome_and_ft_baselines_log_metrics(tmp_path: Path, inference_mode: bool) -> None:
    callbacks = [
        EditorBaseline(method="rome", limit=2, layer=1),
        EditorBaseline(method="ft-l", limit=1, layer=1),
        EditorBaseline(method="none", limit=2),
    ]
    trainer = _fit(tmp_path, callbacks, inference_mode)
    metrics = trainer.callback_metrics
    for name in ("rome", "ft-l", "none"):
        assert 0.0 <= float(metrics[f"{name}/efficacy_score"]) <= 1.0
        assert f"{name}/score" in metrics
    assert "val/efficacy_score" in metrics
    assert float(metrics["rome/seconds_per_edit"]) > 0


def test_causal_trace_logs_heatmaps_as_tensorboard_images(tmp_path: Path) -> None:
    callback = CausalTraceCallback(limit=2, kinds=("mlp", "hidden"), samples=2)
    trainer = _fit(tmp_path, [callback], True)
    assert "trace/mlp_peak_effect" in trainer.callback_metrics
    (run_dir,) = (tmp_path / "tb").rglob("version_*")
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    events.Reload()
    cases = trainer.datamodule.val_cases[:2]  # type: ignore[attr-defined]
    expected = {f"trace/{k}/case{c.case_id}" for k in ("mlp", "hidden") for c in cases}
    assert set(events.Tags()["images"]) == expected
    image = events.Images(f"trace/mlp/case{cases[0].case_id}")[-1]
    assert image.width > 100 and image.height > 100
    assert image.encoded_image_string.startswith(b"\x89PNG")


def test_causal_trace_without_tensorboard_logs_metrics_only(tmp_path: Path) -> None:
    lm = tiny_model("gpt2")
    register_model(lm)
    data = CounterFactDataModule(
        path=str(write_rome(tmp_path / "cf.json")), n_train=4, n_val=2, n_test=2, batch_size=2
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        callbacks=[CausalTraceCallback(limit=1, kinds=("mlp",), samples=2)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(RemediModule(model=lm.spec, layer=1), datamodule=data)
    assert "trace/mlp_peak_effect" in trainer.callback_metrics


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="method 'foo'"):
        EditorBaseline(method="foo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="limit must be at least 1"):
        EditorBaseline(limit=0)
    with pytest.raises(ValueError, match=r"kinds \['resid'\]"):
        CausalTraceCallback(kinds=("resid",))
