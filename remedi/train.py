"""``python -m remedi.train {fit,validate,test,predict}``: train and evaluate REMEDI editors.

A thin :class:`~lightning.pytorch.cli.LightningCLI` around :class:`RemediModule` and the
datamodules. Defaults: runs under ``checkpoints/`` (``--trainer.default_root_dir``) with
``last.ckpt`` and the best checkpoint (by ``val/loss``) in that fixed directory, so
``--ckpt_path last`` resumes; TensorBoard logs in ``<root>/tensorboard/version_N``; early stopping
with patience 2 on ``val/loss``. ``inference_mode=False`` so that evaluation callbacks may take
gradients during validation (Lightning then validates under ``torch.no_grad``). ``test`` also
writes ``metrics.json`` into the TensorBoard run directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from datamodules import EditCaseDataModule
from lightning_modules import LearnedEditorModule, RemediModule
from remedi.allocator import release_freed_memory
from remedi.atomic import write_json

DEFAULT_ROOT = "checkpoints"
TRAINER_DEFAULTS: dict[str, Any] = {
    "default_root_dir": DEFAULT_ROOT,
    "inference_mode": False,
    "max_epochs": 20,
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": DEFAULT_ROOT, "name": "tensorboard"},
    },
}


class RunCheckpoint(ModelCheckpoint):
    """Keeps the best checkpoint by the monitored metric and rewrites ``last.ckpt`` after every
    validation. Lightning (2.6) rewrites ``last.ckpt`` only when a top-k file is saved, so after
    an epoch that did not improve ``--ckpt_path last`` would resume from the last improving
    epoch and silently lose the epochs after it."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._keep_last(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._keep_last(trainer)

    def _keep_last(self, trainer: L.Trainer) -> None:
        """Write ``last.ckpt`` unless this step's checkpoint was just saved."""
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class RemediCLI(LightningCLI):
    """LightningCLI with REMEDI's checkpoint, early-stopping and logger defaults."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({"model": {"class_path": f"lightning_modules.{RemediModule.__name__}"}})
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": "min",
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 1,
                "checkpoint.filename": "best-epoch{epoch:02d}-step{step}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath")
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        parser.set_defaults(
            {
                "early_stopping.monitor": "val/loss",
                "early_stopping.patience": 2,
                "early_stopping.strict": False,
            }
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.trainer
        logger = trainer.get("logger")
        root = trainer.get("default_root_dir") or DEFAULT_ROOT
        if (
            logger is not None
            and not isinstance(logger, bool)
            and str(logger.get("class_path", "")).endswith("TensorBoardLogger")
            and logger.init_args.get("save_dir") == DEFAULT_ROOT
        ):
            logger.init_args.save_dir = root  # the logger follows --trainer.default_root_dir

    def after_test(self) -> None:
        run_dir = Path(
            self.trainer.log_dir or self.trainer.default_root_dir
        )  # every rank: a collective
        if not self.trainer.is_global_zero:
            return
        metrics = {
            key.removeprefix("test/"): float(value)
            for key, value in self.trainer.callback_metrics.items()
            if key.startswith("test/")
        }
        write_json(run_dir / "metrics.json", dict(sorted(metrics.items())))


def main(args: list[str] | None = None) -> RemediCLI:
    """Run the CLI on ``args`` (``sys.argv[1:]`` when None); returns the CLI for tests."""
    release_freed_memory()
    return RemediCLI(
        LearnedEditorModule,
        EditCaseDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults=TRAINER_DEFAULTS,
        args=args,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
