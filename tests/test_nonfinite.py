"""A NaN or infinite loss stops ``python -m remedi.train fit`` with one line naming the step and
the term, exit code 1, and the checkpoints of the last good validation left as they were."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_model
from test_datamodules import write_rome

import remedi.editors.locality
import remedi.editors.training
from lightning_modules import register_model
from lightning_modules.learned_editor import non_finite_terms
from remedi.train import TRAINING_FAILED, main

MODULES = {  # three training steps an epoch, as in test_interruption
    "remedi": ["--model.layer", "1", "--data.batch_size", "4"],
    "mend": ["--model", "lightning_modules.MendModule", "--model.layers", "[1, 2]"],
}
POISON = {  # where each method computes its KL term: that term turns non-finite
    "remedi": (remedi.editors.training, "kl", float("nan")),
    "mend": (remedi.editors.locality, "loc", float("inf")),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_rome(tmp_path_factory.mktemp("data") / "cf.json")


def _fit(spec: str, data: Path, root: Path, method: str, *extra: str) -> list[str]:
    flags = {
        "--model.model": spec,
        "--seed_everything": "0",
        "--data": "datamodules.CounterFactDataModule",
        "--data.path": str(data),
        "--data.n_train": "6",
        "--data.n_val": "2",
        "--data.batch_size": "2",
        "--trainer.default_root_dir": str(root),
        "--trainer.accelerator": "cpu",
        "--trainer.num_sanity_val_steps": "0",
        "--trainer.enable_progress_bar": "false",
        "--trainer.enable_model_summary": "false",
        "--trainer.logger": "false",
    }
    return ["fit", *[x for pair in flags.items() for x in pair], *MODULES[method], *extra]


def _poison(monkeypatch: pytest.MonkeyPatch, method: str, training: bool, call: int) -> None:
    """Make the method's KL term non-finite from its ``call``-th computation (0-based) in
    training (``training``: gradients on) or in validation (gradients off)."""
    module, _, value = POISON[method]
    original = module.kl_divergence
    calls = [0]

    def kl_divergence(*args: Any, **kwargs: Any) -> torch.Tensor:
        result = original(*args, **kwargs)
        if torch.is_grad_enabled() == training:
            calls[0] += 1
            if calls[0] > call:
                return result * value
        return result

    monkeypatch.setattr(module, "kl_divergence", kl_divergence)


def _checkpoints(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.glob("*.ckpt"))}


@pytest.mark.parametrize(
    ("method", "training", "line"),
    [
        ("remedi", True, "non-finite loss at step 4 (epoch 1): kl = nan"),
        ("mend", True, "non-finite loss at step 4 (epoch 1): loc = inf"),
        ("remedi", False, "non-finite validation loss at step 6 (epoch 1): kl = nan"),
    ],
    ids=["remedi-train", "mend-train", "remedi-validation"],
)
def test_non_finite_loss_stops_in_one_line_and_keeps_the_checkpoints(
    data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    method: str,
    training: bool,
    line: str,
) -> None:
    """One good epoch, then a resumed run whose KL term turns non-finite in epoch 1 (training
    step 4, or its validation): exit code 1, one ``error:`` line on stderr naming the step,
    the epoch and the term, and the first epoch's checkpoints unchanged, byte for byte."""
    lm = tiny_model("gpt2")
    register_model(lm)
    root = tmp_path / "run"
    assert main(_fit(lm.spec, data, root, method, "--trainer.max_epochs", "1")) == 0
    good = _checkpoints(root)
    assert "last.ckpt" in good
    capsys.readouterr()
    _poison(monkeypatch, method, training, call=1 if training else 0)
    resume = ["--ckpt_path", "last", "--trainer.max_epochs", "3"]
    assert main(_fit(lm.spec, data, root, method, *resume)) == TRAINING_FAILED
    assert capsys.readouterr().err.splitlines() == [
        f"error: {line}; stopped before saving that state"
    ]
    assert _checkpoints(root) == good


def test_non_finite_terms_names_the_bad_terms_and_the_total_only_alone() -> None:
    nan, inf = torch.tensor(float("nan")), torch.tensor(float("-inf"))
    fine = torch.tensor(1.0)
    assert non_finite_terms({"kl": fine, "loss": fine}) == ""
    assert non_finite_terms({"kl": nan, "norm": inf, "loss": nan}) == "kl = nan, norm = -inf"
    assert non_finite_terms({"kl": fine, "loss": inf}) == "loss = -inf"
    assert non_finite_terms({"edit": torch.tensor([1.0, float("inf")])}) == "edit = inf"
