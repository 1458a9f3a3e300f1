"""Evaluation callbacks: baselines and causal traces run inside validation, log next to the
editor's metrics, need no user-side inference_mode setting, and leave the LM unchanged."""

from __future__ import annotations

import io
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import score_method, tiny_model
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_datamodules import write_rome

from datamodules import CounterFactDataModule
from lightning_modules import RemediModule, register_model
from lightning_modules.callbacks import CausalTraceCallback, EditorBaseline
from remedi.metrics import summarize


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
    """Each baseline logs exactly what the shared registry computes for the module's first
    validation cases (the LM restored in between), and the editing baselines log an edit."""
    callbacks = [
        EditorBaseline(method="rome", limit=2, layer=1),
        EditorBaseline(method="ft-l", limit=1, layer=1),
        EditorBaseline(method="none", limit=2),
    ]
    trainer = _fit(tmp_path, callbacks, inference_mode)
    metrics = trainer.callback_metrics
    lm = trainer.lightning_module.lm  # type: ignore[attr-defined]
    cases = trainer.datamodule.val_cases  # type: ignore[attr-defined]
    expected = {
        "rome": score_method(lm, "rome", cases[:2], layer=1, progress=False),
        "ft-l": score_method(lm, "ft-l", cases[:1], layer=1, progress=False),
        "none": score_method(lm, "none", cases[:2], progress=False),
    }
    for name, result in expected.items():
        summary = summarize(result.per_case)
        assert set(summary) <= {k.split("/", 1)[1] for k in metrics if k.startswith(f"{name}/")}
        for metric, value in summary.items():
            assert float(metrics[f"{name}/{metric}"]) == pytest.approx(value, abs=1e-5), metric
    unedited = summarize(expected["none"].per_case[:1])["efficacy_magnitude"]
    for name in ("rome", "ft-l"):
        edited = summarize(expected[name].per_case[:1])["efficacy_magnitude"]
        assert edited != pytest.approx(unedited, abs=1e-6)
    assert float(metrics["rome/seconds_per_edit"]) > 0
    assert "none/seconds_per_edit" not in metrics
    assert "val/efficacy_score" in metrics


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
    # the logged heatmap is the one drawn from a trace of that case made here, pixel for pixel
    from PIL import Image

    from lightning_modules.callbacks.baselines import figure_pixels
    from remedi.methods import causal_trace, figures

    case = cases[0]
    lm = trainer.lightning_module.lm  # type: ignore[attr-defined]
    with torch.no_grad():
        result = causal_trace.trace(
            lm,
            case.rewrite_prompt,
            case.subject,
            subject_start=case.subject_start,
            kinds=("mlp", "hidden"),
            samples=2,
            progress=False,
        )
    expected_pixels = figure_pixels(figures.trace_heatmap(result, "mlp"))
    logged = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB"))
    assert logged.shape == expected_pixels[..., :3].shape
    assert np.array_equal(logged, expected_pixels[..., :3])
    token, layer = result.peak("mlp")
    assert float(result.indirect_effect("mlp")[token, layer]) > 0  # a real peak, not a blank map


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


def test_causal_trace_callback_uses_the_fixed_noise_and_the_template_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every case is traced at the model's fixed noise level (not its own subject's), with its
    subject located where the template put it."""
    from remedi.methods import causal_trace

    traced: list[causal_trace.TraceResult] = []
    real = causal_trace.trace

    def recording(*args: object, **kwargs: object) -> causal_trace.TraceResult:
        traced.append(real(*args, **kwargs))  # type: ignore[arg-type]
        return traced[-1]

    monkeypatch.setattr(causal_trace, "trace", recording)
    trainer = _fit(tmp_path, [CausalTraceCallback(limit=2, kinds=("hidden",), samples=1)], True)
    lm = trainer.lightning_module.lm  # type: ignore[attr-defined]
    cases = trainer.datamodule.val_cases[:2]  # type: ignore[attr-defined]
    assert len(traced) == 2
    expected = causal_trace.default_noise_std(lm)
    assert all(t.noise_std == pytest.approx(expected) for t in traced)
    for case, result in zip(cases, traced, strict=True):
        start = case.subject_start
        offsets = lm.tokenizer(case.rewrite_prompt, return_offsets_mapping=True)["offset_mapping"]
        assert offsets[result.subject_range[0]][1] > start >= offsets[result.subject_range[0]][0]
