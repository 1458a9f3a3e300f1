"""The one base of every learned-editor LightningModule (REMEDI, MEND, KE).

It holds what they all need: the shared frozen LM (a plain attribute: never trained, never in a
checkpoint), validation and test CounterFact metrics through torchmetrics, TensorBoard logging
of each loss term under ``train/``, ``val/`` and ``test/``, checkpoint metadata (method, model,
layers) checked on load with one clear line (:func:`remedi.checkpoints.check_meta`), and the
best-validation weights: a copy is kept whenever ``val/selection`` improves, saved in every
checkpoint (so a resumed run keeps it), and put in place before ``test`` and ``predict`` and by
:meth:`use_best_weights`.

The selection rule cannot be won by editing nothing (a loss with a locality weight can):
``val/selection`` is the validation efficacy when the validation neighbourhood score is at least
the unedited model's on the same cases minus ``selection_margin``, and below every such epoch
(``-1`` plus the neighbourhood score's distance from that floor, so a closer one is better)
when it is not; on datasets without edit cases (McRae, Bias in Bios) it is ``-val/loss``.

A subclass sets ``self.editor`` (the trainable ``nn.Module``) and implements the abstract
:meth:`training_terms`, :meth:`eval_terms`, :meth:`case_edit` and :attr:`edit_layers` (a class
missing one cannot be instantiated). For ``--ckpt_path`` it also sorts its ``__init__``
arguments: ``checkpoint_fixed`` (what the trained weights were built for: the given value must
match the checkpoint's) and ``checkpoint_restored`` (replaced by the optimizer state when ``fit``
resumes: must match then); every other argument (scoring, batch sizes, loss weights) may differ
from the checkpoint's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Literal, cast

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import MeanMetric, SumMetric

from remedi import checkpoints
from remedi.data import EditCase
from remedi.metrics import METRIC_NAMES, EditContext, evaluate_cases, harmonic_mean
from remedi.metrics.counterfact import SCORE_NAMES, Scoring
from remedi.models import LoadedModel, load_model

_MODELS: dict[tuple[str, str], LoadedModel] = {}
TrainUnit = Literal["examples", "cases"]


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite: training stops before any step or checkpoint is made
    from that state, so the last checkpoint stays the last good one."""


def non_finite_terms(terms: dict[str, torch.Tensor]) -> str:
    """``"kl = nan"``: the terms that are not finite (the total ``loss`` only when no other is),
    or ``""`` when all are finite."""
    bad = {n: v.detach() for n, v in terms.items() if not bool(torch.isfinite(v.detach()).all())}
    named = [n for n in bad if n != "loss"] or list(bad)
    return ", ".join(f"{n} = {float(bad[n][~torch.isfinite(bad[n])].flatten()[0])}" for n in named)


def register_model(lm: LoadedModel, dtype: str = "float32") -> None:
    """Make ``lm`` the model that modules built with ``model=lm.spec, model_dtype=dtype`` use
    (tests and notebooks that already hold a model)."""
    _MODELS[(lm.spec, dtype)] = lm


def is_registered(spec: str, dtype: str = "float32") -> bool:
    """Whether :func:`shared_model` already holds ``(spec, dtype)`` (then it loads nothing)."""
    return (spec, dtype) in _MODELS


def shared_model(spec: str, dtype: str = "float32") -> LoadedModel:
    """The process-wide frozen LM for ``(spec, dtype)``, loaded on first use."""
    key = (spec, dtype)
    if key not in _MODELS:
        _MODELS[key] = load_model(spec, dtype=dtype)
    return _MODELS[key]


def selection_score(
    efficacy: float, neighborhood: float, unedited_neighborhood: float, margin: float
) -> float:
    """``val/selection``: ``efficacy`` when ``neighborhood`` is at least the unedited model's
    minus ``margin``; otherwise ``-1`` minus the shortfall, below every epoch that keeps it."""
    floor = unedited_neighborhood - margin
    return efficacy if neighborhood >= floor else -1.0 - (floor - neighborhood)


class LearnedEditorModule(L.LightningModule, ABC):
    """Abstract base of the learned-editor modules; see the module docstring.

    ``train_unit`` tells the datamodule what a training batch holds: REMEDI examples
    (``"examples"``) or whole edit cases (``"cases"``, MEND and KE).
    """

    method: ClassVar[str] = ""
    train_unit: ClassVar[TrainUnit] = "examples"
    checkpoint_fixed: ClassVar[tuple[str, ...]] = ("model",)
    """``__init__`` arguments a checkpoint's weights were built for (shapes, layers, LM)."""
    checkpoint_restored: ClassVar[tuple[str, ...]] = ()
    """``__init__`` arguments whose effect a resumed ``fit`` takes from the checkpoint's state."""
    editor: nn.Module

    def __init__(
        self,
        model: str,
        model_dtype: str,
        scoring: Scoring,
        eval_batch_size: int,
        selection_margin: float = 0.05,
    ):
        super().__init__()
        if scoring not in ("mean", "first"):
            raise ValueError(f"scoring {scoring!r} must be 'mean' or 'first'")
        if eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be positive, got {eval_batch_size}")
        if not 0 <= selection_margin <= 1:
            raise ValueError(f"selection_margin must be in [0, 1], got {selection_margin}")
        self.selection_margin = selection_margin
        self.unedited_val_neighborhood: float | None = None
        self.best_selection = float("-inf")
        self._lm = shared_model(model, model_dtype)
        self.scoring: Scoring = scoring
        self.eval_batch_size = eval_batch_size
        self.val_metrics = self._make_metrics()
        self.test_metrics = self._make_metrics()
        self.best_val_loss = float("inf")
        self.best_epoch: int | None = None
        self.best_editor_state: dict[str, torch.Tensor] | None = None

    # -- what a method supplies -------------------------------------------------------------
    @property
    @abstractmethod
    def edit_layers(self) -> list[int]:
        """The LM layers the editor acts on (checked against a checkpoint's)."""

    @abstractmethod
    def training_terms(self, batch: Any) -> dict[str, torch.Tensor]:
        """Loss terms of a training batch; ``"loss"`` is optimised."""

    @abstractmethod
    def eval_terms(self, batch: Any) -> dict[str, torch.Tensor]:
        """Loss terms of a validation/test :class:`~datamodules.remedi_data.CaseBatch`."""

    @abstractmethod
    def case_edit(self, cases: list[EditCase]) -> EditContext:
        """How the CounterFact metrics see ``cases`` edited (row ``case_index`` → its case)."""

    def checkpoint_extra(self) -> dict[str, Any]:
        """More metadata to save with a checkpoint (informational, not checked)."""
        return {}

    # -- shared behaviour ---------------------------------------------------------------------
    @property
    def lm(self) -> LoadedModel:
        """The frozen LM (not a registered submodule: never trained, never checkpointed)."""
        return self._lm

    @property
    def val_cases(self) -> list[EditCase]:
        """The validation cases of the attached datamodule (what evaluation callbacks score)."""
        return list(getattr(getattr(self.trainer, "datamodule", None), "val_cases", []))

    def setup(self, stage: str) -> None:
        device = self.trainer.strategy.root_device
        if self._lm.device != device:
            self._lm.model.to(device)  # type: ignore[arg-type]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        terms = self.training_terms(batch)
        self.check_finite(terms, "loss")
        for name, value in terms.items():
            self.log(
                f"train/{name}", value.detach(), batch_size=len(batch), prog_bar=name == "loss"
            )
        if not terms["loss"].requires_grad:
            return None  # parameterless editor: nothing to train
        return terms["loss"]

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_step(self, batch: Any, stage: str) -> None:
        metrics = cast(dict[str, Any], dict(self._stage_metrics(stage).items()))
        size = len(batch.cases) or len(batch.examples)
        terms = self.eval_terms(batch)
        if self.trainer.state.fn == "fit":  # weights gone bad: stop before they are saved
            self.check_finite(terms, "validation loss")
        metrics["loss"].update(terms["loss"].detach(), weight=size)
        for name, value in terms.items():
            if name != "loss":
                self.log(f"{stage}/{name}", value, batch_size=size, sync_dist=True)
        self.log(f"{stage}/loss", metrics["loss"], prog_bar=True)
        if not batch.cases:
            return  # example-only datasets (Bias in Bios, McRae): the loss terms only
        metrics["n_cases"].update(torch.tensor(float(len(batch.cases))))
        self.log(f"{stage}/n_cases", metrics["n_cases"])
        _, per_case = evaluate_cases(
            self._lm.model,
            self._lm.tokenizer,
            batch.cases,
            edit=self.case_edit(batch.cases),
            batch_size=self.eval_batch_size,
            scoring=self.scoring,
        )
        for name in METRIC_NAMES[:-1]:
            values = [m[name] for m in per_case if name in m]
            if values:
                metrics[name].update(torch.tensor(values, dtype=torch.float32))
                self.log(f"{stage}/{name}", metrics[name], prog_bar=name == "efficacy_score")

    def check_finite(self, terms: dict[str, torch.Tensor], what: str) -> None:
        """Raise :class:`NonFiniteLossError` naming the step, the epoch and the bad terms when a
        term of this step is NaN or infinite (on any process: all of them stop together)."""
        bad = non_finite_terms(terms)
        if self.trainer.world_size > 1:
            if not self.trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
                return
            bad = bad or "on another process"
        elif not bad:
            return
        raise NonFiniteLossError(
            f"non-finite {what} at step {self.trainer.global_step} "
            f"(epoch {self.current_epoch}): {bad}"
        )

    @staticmethod
    def _make_metrics() -> nn.ModuleDict:
        means = {n: MeanMetric() for n in (*METRIC_NAMES[:-1], "loss")}
        return nn.ModuleDict({**means, "n_cases": SumMetric()})

    def _stage_metrics(self, stage: str) -> nn.ModuleDict:
        return self.val_metrics if stage == "val" else self.test_metrics

    def _log_score(self, stage: str) -> float:
        """Log the harmonic-mean score of the stage; return its (synced) mean loss."""
        metrics = cast(dict[str, Any], dict(self._stage_metrics(stage).items()))
        if metrics["n_cases"].update_count:
            scores = [float(metrics[n].compute()) for n in SCORE_NAMES]
            self.log(f"{stage}/score", harmonic_mean(scores))
        return float(metrics["loss"].compute())

    def unedited_neighborhood(self) -> float:
        """The unedited LM's mean neighbourhood score on the validation cases (computed once)."""
        if self.unedited_val_neighborhood is None:
            _, per_case = evaluate_cases(
                self._lm.model,
                self._lm.tokenizer,
                self.val_cases,
                batch_size=self.eval_batch_size,
                scoring=self.scoring,
            )
            values = [m["neighborhood_score"] for m in per_case if "neighborhood_score" in m]
            self.unedited_val_neighborhood = sum(values) / len(values) if values else 0.0
        return self.unedited_val_neighborhood

    def selection_value(self, loss: float) -> float:
        """``val/selection`` of the epoch just validated (see the module docstring)."""
        metrics = cast(dict[str, Any], dict(self.val_metrics.items()))
        if not metrics["n_cases"].update_count or not self.val_cases:
            return -loss
        unedited = self.unedited_neighborhood()
        self.log("val/unedited_neighborhood", unedited)
        return selection_score(
            float(metrics["efficacy_score"].compute()),
            float(metrics["neighborhood_score"].compute()),
            unedited,
            self.selection_margin,
        )

    def on_validation_epoch_end(self) -> None:
        loss = self._log_score("val")
        if self.trainer.sanity_checking:
            return
        selection = self.selection_value(loss)
        self.log("val/selection", selection, prog_bar=True)
        if selection > self.best_selection:
            self.best_selection = selection
            self.best_val_loss = loss
            self.best_epoch = int(self.current_epoch)
            self.best_editor_state = {
                k: v.detach().clone() for k, v in self.editor.state_dict().items()
            }

    def on_test_epoch_end(self) -> None:
        self._log_score("test")

    def on_test_start(self) -> None:
        self.use_best_weights()

    def on_predict_start(self) -> None:
        self.use_best_weights()

    def restore_best(self) -> None:
        """Load the editor weights of the best validation epoch (error if there is none)."""
        if self.best_editor_state is None:
            raise RuntimeError("no validation epoch has finished yet; nothing to restore")
        self.editor.load_state_dict(self.best_editor_state)

    def use_best_weights(self) -> bool:
        """Put the best-validation editor in place when one is known, and say so; returns
        whether it did (checkpoints written before any validation have none)."""
        if self.best_editor_state is None:
            return False
        self.restore_best()
        rank_zero_info(
            f"{self.method}: using the best-validation editor (epoch {self.best_epoch}, "
            f"val/selection {self.best_selection:.4f}, val/loss {self.best_val_loss:.4f})"
        )
        return True

    def checkpoint_meta(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "model": self._lm.spec,
            "layers": list(self.edit_layers),
            "hidden_size": self._lm.arch.hidden_size,
            **self.checkpoint_extra(),
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["remedi"] = self.checkpoint_meta()
        if self.best_editor_state is not None:
            checkpoint["remedi_best"] = {
                "val_loss": self.best_val_loss,
                "selection": self.best_selection,
                "unedited_neighborhood": self.unedited_val_neighborhood,
                "epoch": self.best_epoch,
                "state_dict": self.best_editor_state,
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoints.check_meta(checkpoint, self.checkpoint_meta())
        best = checkpoint.get("remedi_best")
        if best is not None:
            self.best_val_loss = float(best["val_loss"])
            self.best_selection = float(best.get("selection", -self.best_val_loss))
            self.unedited_val_neighborhood = best.get("unedited_neighborhood")
            self.best_epoch = best["epoch"]
            self.best_editor_state = dict(best["state_dict"])
