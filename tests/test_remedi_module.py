"""The REMEDI LightningModule: frozen LM outside the checkpoint, resume, metrics, wrong model."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from conftest import lightning_trainer, tiny_model
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from test_datamodules import write_rome

from datamodules import CounterFactDataModule
from lightning_modules import RemediModule, register_model
from remedi.models import LoadedModel


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    lm = tiny_model("gemma3_text")
    register_model(lm)
    return lm


def _data(tmp_path: Path) -> CounterFactDataModule:
    path = tmp_path / "cf.json"
    if not path.exists():
        write_rome(path)
    # 6 train cases x 2 paraphrases = 12 examples = 3 steps of 4 per epoch
    return CounterFactDataModule(
        path=str(path), n_train=6, n_val=2, n_test=2, split="ordered", batch_size=4
    )


_trainer = lightning_trainer


def _module(tiny: LoadedModel, **kwargs: object) -> RemediModule:
    torch.manual_seed(0)
    return RemediModule(model=tiny.spec, layer=1, lr=1e-2, **kwargs)  # type: ignore[arg-type]


def test_lm_is_not_a_parameter_or_state(tiny: LoadedModel) -> None:
    module = _module(tiny)
    assert module.lm is tiny
    assert all(k.startswith("editor.") for k in module.state_dict())
    n_editor = sum(p.numel() for p in module.editor.parameters())
    assert sum(p.numel() for p in module.parameters()) == n_editor
    assert not any(p.requires_grad for p in tiny.model.parameters())


def test_bad_settings_fail_early(tiny: LoadedModel) -> None:
    with pytest.raises(ValueError, match="layer 9"):
        RemediModule(model=tiny.spec, layer=9)
    with pytest.raises(ValueError, match="editor 'x'"):
        RemediModule(model=tiny.spec, editor="x")  # type: ignore[arg-type]


def test_checkpoint_holds_editor_and_optimizer_only(tiny: LoadedModel, tmp_path: Path) -> None:
    module = _module(tiny)
    _trainer(tmp_path, max_epochs=1).fit(module, _data(tmp_path))
    path = tmp_path / "last.ckpt"
    ckpt = torch.load(path, weights_only=True)  # hyperparameters are plain data
    assert set(ckpt["state_dict"]) == {"editor.linear.weight", "editor.linear.bias"}
    lm_names = {n for n, _ in tiny.model.named_parameters()}
    assert not any(k.split(".", 1)[-1] in lm_names for k in ckpt["state_dict"])
    assert ckpt["remedi"] == {
        "method": "remedi",
        "model": tiny.spec,
        "layers": [1],
        "hidden_size": tiny.arch.hidden_size,
        "editor": "affine",
    }
    editor_bytes = sum(p.numel() * p.element_size() for p in module.editor.parameters())
    assert path.stat().st_size < 3 * editor_bytes + 1_000_000
    assert len(ckpt["optimizer_states"]) == 1


@pytest.mark.parametrize("n", [2, 3])  # mid-epoch and at the epoch's end (3 steps/epoch)
def test_resume_matches_uninterrupted_training(tiny: LoadedModel, tmp_path: Path, n: int) -> None:
    """2N uninterrupted steps (saving at step N, as a run that then crashes would) against
    resuming a fresh process-like trainer from the step-N checkpoint for N more steps."""
    every_n = ModelCheckpoint(
        dirpath=str(tmp_path / "a"),
        every_n_train_steps=n,
        save_top_k=-1,
        filename="step{step}",
        auto_insert_metric_name=False,
    )
    straight = _module(tiny)
    _trainer(tmp_path / "a", max_steps=2 * n, callbacks=[every_n]).fit(straight, _data(tmp_path))
    resumed = _module(tiny)
    trainer = _trainer(tmp_path / "b", max_steps=2 * n)
    trainer.fit(resumed, _data(tmp_path), ckpt_path=str(tmp_path / "a" / f"step{n}.ckpt"))
    assert trainer.global_step == 2 * n
    assert float(straight.editor.linear.weight.detach().abs().sum()) > 0
    for a, b in zip(straight.editor.parameters(), resumed.editor.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_checkpoint_from_another_layer_or_model_fails(tiny: LoadedModel, tmp_path: Path) -> None:
    _trainer(tmp_path, max_steps=1).fit(_module(tiny), _data(tmp_path))
    other = _module(tiny, editor="affine")
    other.layer = 2
    with pytest.raises(ValueError, match=r"checkpoint: trained for model .* layers \[1\] .* \[2\]"):
        _trainer(tmp_path).validate(other, _data(tmp_path), ckpt_path=str(tmp_path / "last.ckpt"))
    gpt2 = tiny_model("gpt2")
    register_model(gpt2)
    with pytest.raises(ValueError, match="tiny-gpt2"):
        RemediModule.load_from_checkpoint(tmp_path / "last.ckpt", model=gpt2.spec)


def test_validation_logs_metrics_and_keeps_a_copy_of_the_best(
    tiny: LoadedModel, tmp_path: Path
) -> None:
    module = _module(tiny)
    trainer = _trainer(tmp_path, max_epochs=2, limit_val_batches=None)
    trainer.fit(module, _data(tmp_path))
    metrics = trainer.callback_metrics
    for name in ("loss", "efficacy_score", "paraphrase_magnitude", "neighborhood_score", "score"):
        assert f"val/{name}" in metrics
    assert 0.0 <= float(metrics["val/efficacy_score"]) <= 1.0
    assert module.best_editor_state is not None
    saved = module.best_editor_state["linear.weight"].clone()
    with torch.no_grad():
        module.editor.linear.weight.add_(1.0)
    assert torch.equal(module.best_editor_state["linear.weight"], saved)
    module.restore_best()
    assert torch.equal(module.editor.linear.weight, saved)
    assert len(module.val_cases) == 2
    results = trainer.test(module, _data(tmp_path))
    assert "test/score" in results[0]


def test_the_best_copy_is_the_best_epochs_not_the_last(
    tiny: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With validation losses that only grow after epoch 0, the kept copy is epoch 0's editor,
    not a later one (a copy taken at every epoch would fail this)."""
    module = _module(tiny)
    real = module.eval_terms

    def worse_every_epoch(batch: Any) -> dict[str, torch.Tensor]:
        terms = real(batch)
        terms["loss"] = terms["loss"] + 100.0 * module.current_epoch
        return terms

    monkeypatch.setattr(module, "eval_terms", worse_every_epoch)
    seen: list[dict[str, torch.Tensor]] = []

    class Record(Callback):
        def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            seen.append({k: v.detach().clone() for k, v in module.editor.state_dict().items()})

    trainer = _trainer(tmp_path, max_epochs=3, limit_val_batches=None)
    trainer.callbacks.append(Record())
    trainer.fit(module, _data(tmp_path))
    assert len(seen) == 3 and module.best_epoch == 0
    assert not torch.equal(seen[0]["linear.weight"], seen[-1]["linear.weight"])
    assert module.best_editor_state is not None
    for key, value in module.best_editor_state.items():
        assert torch.equal(value, seen[0][key]), key
    module.restore_best()
    assert torch.equal(module.editor.linear.weight, seen[0]["linear.weight"])


def test_parameterless_editor_validates(tiny: LoadedModel, tmp_path: Path) -> None:
    module = _module(tiny, editor="null")
    results = _trainer(tmp_path, limit_val_batches=None).validate(module, _data(tmp_path))
    assert results[0]["val/kl"] == pytest.approx(0.0, abs=1e-6)


def test_test_and_resume_use_the_best_validation_weights(tiny: LoadedModel, tmp_path: Path) -> None:
    """``last.ckpt`` carries the best-validation editor and its loss: ``test`` scores that editor,
    and a resumed run remembers the best loss instead of starting from infinity."""
    module = _module(tiny)
    _trainer(tmp_path, max_epochs=2, limit_val_batches=None).fit(module, _data(tmp_path))
    assert module.best_editor_state is not None and module.best_epoch is not None
    best = {k: v.clone() for k, v in module.best_editor_state.items()}
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert ckpt["remedi_best"]["val_loss"] == module.best_val_loss
    fresh = _module(tiny)
    _trainer(tmp_path / "t", limit_test_batches=None).test(
        fresh, _data(tmp_path), ckpt_path=str(tmp_path / "last.ckpt")
    )
    for key, value in fresh.editor.state_dict().items():
        assert torch.equal(value, best[key]), key
    resumed = _module(tiny)
    trainer = _trainer(tmp_path / "r", max_epochs=3, limit_val_batches=None)
    trainer.fit(resumed, _data(tmp_path), ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed.best_val_loss <= module.best_val_loss


def test_fit_does_not_warn_about_batch_transfer(tiny: LoadedModel, tmp_path: Path) -> None:
    """The datamodule, not the module, says that batches stay where they are (Lightning warns
    when a module overrides the hook but a datamodule is given)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path, max_steps=1).fit(_module(tiny), _data(tmp_path))
    assert not [w for w in caught if "transfer_batch_to_device" in str(w.message)]
