"""Evaluation callbacks: non-learned editors and locators run on the module's own validation or
test cases, logged next to the learned editor's metrics.

They need gradients (ROME's v* optimisation, FT, knowledge-neuron attributions) inside Lightning's
evaluation loop, which runs under ``torch.inference_mode`` by default: each callback re-enables
gradients itself, so they work whatever the Trainer's ``inference_mode`` (``remedi.train`` also
sets it to False). They skip the sanity check, run on global rank zero only and restore every LM
weight they write before returning.

    trainer:
      callbacks:
        - class_path: lightning_modules.callbacks.EditorBaseline
          init_args: {method: rome, limit: 16}
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from remedi.data import EditCase
from remedi.metrics import summarize
from remedi.models import LoadedModel

log = logging.getLogger(__name__)

Baseline = Literal["none", "prefix", "ft", "ft-l", "rome", "memit", "kn"]
Stage = Literal["val", "test"]


@contextmanager
def gradients_enabled() -> Iterator[None]:
    """Leave any surrounding ``inference_mode``/``no_grad`` so that methods can differentiate."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


class _StageCallback(Callback):
    """Runs :meth:`run` at the end of validation (every ``every_n_epochs``) and of testing."""

    def __init__(self, limit: int, every_n_epochs: int, on_test: bool) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be at least 1, got {every_n_epochs}")
        self.limit = limit
        self.every_n_epochs = every_n_epochs
        self.on_test = on_test

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.current_epoch % self.every_n_epochs:
            return
        self._maybe_run(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.on_test:
            self._maybe_run(trainer, pl_module, "test")

    def _maybe_run(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: Stage) -> None:
        if not trainer.is_global_zero:
            return
        lm: LoadedModel = pl_module.lm  # type: ignore[assignment]
        attr = "val_cases" if stage == "val" else "test_cases"
        cases = list(getattr(trainer.datamodule, attr, []))[: self.limit]  # type: ignore[attr-defined]
        cases = [c for c in cases if c.target_new is not None]
        if not cases:
            log.warning("%s: no %s cases to run on", type(self).__name__, stage)
            return
        was_training = lm.model.training
        lm.model.eval()
        try:
            with gradients_enabled():
                self.run(trainer, pl_module, lm, cases, stage)
        finally:
            lm.model.train(was_training)

    def run(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        lm: LoadedModel,
        cases: Sequence[EditCase],
        stage: Stage,
    ) -> None:
        raise NotImplementedError


class EditorBaseline(_StageCallback):
    """Score a non-learned editor on the first ``limit`` evaluation cases and log
    ``<name>/<metric>`` (e.g. ``rome/efficacy_score``) with the shared CounterFact metrics.

    Args:
        method: none, prefix, ft, ft-l, rome, memit or kn.
        limit: how many validation/test cases to edit (each edit is restored before the next).
        layer: edited layer (ROME/FT; None: the method's default for the model).
        corpus: text file(s) for ROME/MEMIT second-moment statistics (None: identity; cached
            on disk by model, layer, corpus and token count).
        stats_tokens: corpus tokens for the statistics.
        every_n_epochs: run at every n-th validation epoch.
        on_test: also run at the end of ``test``.
        name: prefix of the logged metrics (default: the method).
    """

    def __init__(
        self,
        method: Baseline = "rome",
        limit: int = 16,
        layer: int | None = None,
        corpus: str | None = None,
        stats_tokens: int = 100_000,
        every_n_epochs: int = 1,
        on_test: bool = True,
        name: str | None = None,
    ) -> None:
        super().__init__(limit, every_n_epochs, on_test)
        from remedi import registry

        untrained = [m for m in registry.names() if not registry.method_class(m).trained]
        if method not in untrained:
            raise ValueError(f"method {method!r} must be one of {', '.join(untrained)}")
        self.method = method
        self.layer = layer
        self.corpus = corpus
        self.stats_tokens = stats_tokens
        self.name = name or method
        self.statistics = registry.Statistics(corpus, stats_tokens, enabled=corpus is not None)
        """Collected (or read from the disk cache) once per layer, then kept for the later
        epochs (None corpus: identity statistics)."""

    def editor(self) -> Any:
        """The registered method with ``layer`` in its settings when it has one."""
        from remedi import registry

        method = registry.editor(self.method)
        if self.layer is not None and hasattr(method.settings, "layer"):
            method.settings = dataclasses.replace(method.settings, layer=self.layer)
        method.environment = registry.Environment(statistics=self.statistics, progress=False)
        return method

    def run(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        lm: LoadedModel,
        cases: Sequence[EditCase],
        stage: Stage,
    ) -> None:
        from remedi.evaluation.runner import run_method

        result = run_method(lm, self.editor(), cases)
        for metric, value in summarize(result.per_case).items():
            pl_module.log(f"{self.name}/{metric}", value, rank_zero_only=True)
        if result.edit_seconds:
            seconds = sum(result.edit_seconds) / len(result.edit_seconds)
            pl_module.log(f"{self.name}/seconds_per_edit", seconds, rank_zero_only=True)


class CausalTraceCallback(_StageCallback):
    """Causal-trace the rewrite prompts of the first ``limit`` evaluation cases and log each
    heatmap as a TensorBoard image ``trace/<kind>/case<case_id>`` (and each trace's peak indirect
    effect as the metric ``trace/<kind>_peak_effect``). The images need a
    :class:`~lightning.pytorch.loggers.TensorBoardLogger` among the Trainer's loggers
    (``remedi.train``'s default); without one only the metrics are logged.

    Args:
        limit: how many cases to trace (a full trace of one prompt is minutes on a CPU).
        kinds: which states to restore: hidden, mlp and/or attn.
        samples: noise samples per corrupted run.
        every_n_epochs: run at every n-th validation epoch.
        on_test: also run at the end of ``test``.
        noise_scale: noise standard deviation as a multiple of that of the built-in facts'
            subject embeddings (the fixed default of :func:`remedi.methods.causal_trace.trace`,
            the same as ``remedi.locate trace``'s).
        noise_std: an absolute noise standard deviation instead.
    """

    def __init__(
        self,
        limit: int = 1,
        kinds: tuple[str, ...] = ("hidden", "mlp", "attn"),
        samples: int = 10,
        every_n_epochs: int = 1,
        on_test: bool = False,
        noise_scale: float = 3.0,
        noise_std: float | None = None,
    ) -> None:
        super().__init__(limit, every_n_epochs, on_test)
        unknown = set(kinds) - {"hidden", "mlp", "attn"}
        if unknown:
            raise ValueError(f"kinds {sorted(unknown)} are not among hidden, mlp, attn")
        self.kinds = tuple(kinds)
        self.samples = samples
        self.noise_scale = noise_scale
        self.noise_std = noise_std

    def run(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        lm: LoadedModel,
        cases: Sequence[EditCase],
        stage: Stage,
    ) -> None:
        from remedi.methods import causal_trace, figures

        writer = tensorboard_writer(trainer)
        if writer is None:
            log.warning("CausalTraceCallback: no TensorBoard logger; logging peak effects only")
        for case in cases:
            with torch.no_grad():
                result = causal_trace.trace(
                    lm,
                    case.rewrite_prompt,
                    case.subject,
                    subject_start=case.subject_start,
                    kinds=self.kinds,
                    samples=self.samples,
                    noise_scale=self.noise_scale,
                    noise_std=self.noise_std,
                    progress=False,
                )
            for kind in self.kinds:
                token, layer = result.peak(kind)
                peak = float(result.indirect_effect(kind)[token, layer])
                pl_module.log(f"trace/{kind}_peak_effect", peak, rank_zero_only=True)
                if writer is not None:
                    image = figure_pixels(figures.trace_heatmap(result, kind))
                    writer.add_image(
                        f"trace/{kind}/case{case.case_id}",
                        image,
                        global_step=trainer.global_step,
                        dataformats="HWC",
                    )
        if writer is not None:
            writer.flush()


def tensorboard_writer(trainer: L.Trainer) -> Any | None:
    """The ``SummaryWriter`` of the Trainer's first TensorBoard logger, or None."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def figure_pixels(fig: Figure) -> np.ndarray:
    """``fig`` rendered by matplotlib's Agg canvas as an RGB ``(height, width, 3)`` uint8 array
    (no pyplot, no display needed)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
