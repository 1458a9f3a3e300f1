"""``python -m remedi.train {fit,validate,test,predict}``: train and evaluate learned editors.

A :class:`~lightning.pytorch.cli.LightningCLI` around the learned-editor modules and the
datamodules, which adds:

- **one run directory**, ``trainer.default_root_dir`` (the shipped configs set
  ``checkpoints/<config path>``, e.g. ``checkpoints/mend/quickstart``): ``last.ckpt`` and the
  best checkpoint by ``val/loss``, the TensorBoard events without version subfolders (a resumed
  ``fit``, ``validate`` and ``test`` append to the same run), the resolved config
  (``config.yaml`` of ``fit``, ``config-<subcommand>.yaml`` of the others), ``metrics.json`` of
  ``test`` and ``predictions.jsonl`` of ``predict``. A line at start and end says where it is.
- **``--ckpt_path``** (a file, or ``last`` / ``best`` of the run directory): module arguments the
  config and command line leave unset take the checkpoint's values; those they set are used,
  unless the checkpoint fixes them (``checkpoint_fixed`` of the module: model, layers, editor
  shape), or ``fit`` resumes and the optimizer state replaces them (``checkpoint_restored``):
  then a differing value is refused.
- **one-line errors**: a mistake a user can fix (unknown key, missing file, unknown model, layer
  out of range, unavailable accelerator, unreadable or mismatched checkpoint) prints one
  ``error:`` line and exits with code 2, checked before the model loads where possible.
- early stopping with patience 2 on ``val/loss``; ``inference_mode=False`` so that evaluation
  callbacks may take gradients during validation (Lightning then validates under ``no_grad``).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import pickle
import re
import shlex
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
import torch
from jsonargparse import DefaultHelpFormatter, Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import CheckpointIO, TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from datamodules import EditCaseDataModule
from lightning_modules import (
    LEARNED_METHODS,
    LearnedEditorModule,
    RemediModule,
    is_registered,
    shared_model,
)
from lightning_modules.learned_editor import NonFiniteLossError, check_checkpoint_meta
from remedi.allocator import release_freed_memory
from remedi.atomic import atomic_path, write_json
from remedi.cli import (
    UsageError,
    check_device,
    check_layers,
    check_model_layers,
    check_model_spec,
    check_output_dir,
    checkpoint_meta_problem,
    fail,
    file_error,
    one_line,
    quiet_warnings,
)
from remedi.models.loading import resolve_dtype

PROG = "python -m remedi.train"
TRAINING_FAILED = 1
"""Exit code of a run that stopped on its own (a non-finite loss), not on a usage error."""
DEFAULT_ROOT = "checkpoints/default"
FOLLOW_ROOT = "<trainer.default_root_dir>"
"""The default logger's ``save_dir``: replaced by the run directory before the logger is built."""
TRAINER_DEFAULTS: dict[str, Any] = {
    "default_root_dir": DEFAULT_ROOT,
    "inference_mode": False,
    "max_epochs": 20,
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        # no name or version: the events go straight into the run directory
        "init_args": {"save_dir": FOLLOW_ROOT, "name": "", "version": ""},
    },
}
SUBCOMMANDS = {
    "fit": "Train an editor; with --ckpt_path last, resume the run in the run directory.",
    "validate": "Score an editor (a trained one with --ckpt_path) on the validation split.",
    "test": "Score a trained editor (--ckpt_path) on the test split; writes metrics.json.",
    "predict": "Generate with a trained editor (--ckpt_path) for --data.predict_path requests.",
}
DESCRIPTION = f"""\
Train and evaluate learned knowledge editors (REMEDI, MEND, KE) against a frozen causal language
model. A config in configs/ names the model, the editor, the data and the trainer; any key can
be overridden with a dotted flag (--model.layer 3, --trainer.max_epochs 2). A run writes its
checkpoints, TensorBoard events, resolved config and test metrics into one run directory,
trainer.default_root_dir (for the shipped configs checkpoints/<config path>, e.g.
checkpoints/mend/quickstart).

examples:
  {PROG} fit --config configs/quickstart.yaml
  {PROG} fit --config configs/quickstart.yaml --ckpt_path last   # resume
  {PROG} test --config configs/quickstart.yaml --ckpt_path last
  {PROG} fit --config configs/mend/quickstart.yaml --print_config
  {PROG} fit --help   # every key of fit
"""
_DETAIL_NOISE = re.compile(
    r"^(Does not validate against any of the Union subtypes|Subtypes:|Errors:|Given value"
    r"|Expected a <class 'NoneType'>|Expected a path but|Problem with given class_path)"
)


class TrainHelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help (defaults, config keys) keeping the description's line breaks."""


class TrainArgumentParser(LightningArgumentParser):
    """A parser whose errors are one :class:`UsageError` line naming the key, instead of the
    full usage and jsonargparse's nested explanation."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # a nested parser trying alternatives: it must raise as usual
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        raise UsageError(parse_error_line(message, parser)) from ex


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

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.is_global_zero and self.dirpath and Path(self.dirpath).is_dir():
            tracked = [*self.best_k_models, self.best_model_path, self.last_model_path]
            remove_leftovers(Path(self.dirpath), [p for p in tracked if p])


def remove_leftovers(run_dir: Path, tracked: list[str]) -> None:
    """Remove what a killed run left in its directory: half-written checkpoint temporaries and,
    when the run resumes its own state (``tracked``: the checkpoints that state names), the
    ``best*.ckpt`` files it does not name. Those were saved after the checkpoint it resumes
    from; the resumed run writes them again, and would otherwise add ``-v1`` copies."""
    for path in run_dir.glob("*.ckpt.*.tmp"):
        path.unlink(missing_ok=True)
    keep = {Path(p).resolve() for p in tracked}
    if not any(p.parent == run_dir.resolve() for p in keep):
        return  # a new run, or one started from another run's checkpoint
    for path in run_dir.glob("best*.ckpt"):
        if path.resolve() not in keep:
            path.unlink(missing_ok=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written atomically and durably: into a temporary file beside the target,
    flushed to disk, renamed over it, and the folder flushed (:func:`remedi.atomic.atomic_path`).
    Lightning's own writer stages the file in the system temporary folder and moves it (a copy
    when that is another file system) without flushing, so a crash can leave a truncated or
    empty ``last.ckpt`` in place of the previous one."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


class RunConfigCallback(SaveConfigCallback):
    """Lightning's writer of the resolved config, writing it atomically and durably too."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        save = self.parser.save

        def atomic_save(config: Namespace, path: str, **kwargs: Any) -> None:
            with atomic_path(path) as tmp:
                save(config, str(tmp), **{**kwargs, "overwrite": True})

        self.parser.save = atomic_save
        try:
            super().setup(trainer, pl_module, stage)
        finally:
            del self.parser.save


class LogProgressBar(TQDMProgressBar):
    """tqdm progress for output that is not a terminal: a training line every 30 s at most."""

    def __init__(self) -> None:
        super().__init__(refresh_rate=1)

    def init_train_tqdm(self) -> Any:
        bar = super().init_train_tqdm()
        bar.mininterval = 30.0  # seconds between lines in a log
        return bar


def _is_bar(callback: object) -> bool:
    from lightning.pytorch.callbacks import ProgressBar

    return isinstance(callback, ProgressBar)


class RemediCLI(LightningCLI):
    """LightningCLI with REMEDI's run directory, checkpoint handling, defaults and one-line
    errors (see the module docstring)."""

    run_dir: Path
    _args: list[str] | None = None
    _checkpoint: tuple[str, dict[str, Any]] | None = None
    _resume_note = ""

    # -- parser ---------------------------------------------------------------------------------
    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        kwargs.setdefault("formatter_class", TrainHelpFormatter)
        return super().init_parser(**kwargs)

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        """Lightning's subcommands, described by what they do here (Lightning takes the first
        lines of the Trainer methods' docstrings and cuts them mid-sentence)."""
        self._subcommand_parsers: dict[str, LightningArgumentParser] = {}
        actions = parser.add_subcommands()
        for name in self.subcommands():
            options = {"description": SUBCOMMANDS[name], **kwargs.get(name, {})}
            subparser = self._prepare_subcommand_parser(self.trainer_class, name, **options)  # type: ignore[arg-type]
            self._subcommand_parsers[name] = subparser
            actions.add_subcommand(name, subparser, help=SUBCOMMANDS[name])

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

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse ``args`` (kept: ``--ckpt_path`` parses them again over the checkpoint's)."""
        self._args = args
        self.config = parser.parse_args(args)

    # -- checkpoint -----------------------------------------------------------------------------
    def _parse_ckpt_path(self) -> None:
        """Replaces Lightning's, which loads the checkpoint's module arguments over everything
        the config and command line gave: here they only fill what those leave unset, and a
        given value the checkpoint cannot take is refused (one line)."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        path = self._checkpoint_file(subcommand, config)
        if path is None:
            return
        checkpoint = read_checkpoint(path)
        saved = dict(checkpoint.get("hyper_parameters") or {})
        saved.pop("_instantiator", None)
        saved_class = _checkpoint_class(path, saved.pop("_class_path", None), checkpoint)
        given_path = str(config.model.class_path)
        if _import(given_path, "--model") is not saved_class:
            raise UsageError(
                f"--model {given_path}: checkpoint {path} holds a {saved_class.method!r} editor "
                f"({saved_class.__name__}); give the config it was trained with"
            )
        accepted = set(init_arguments(saved_class))
        defaults = {k: v for k, v in saved.items() if k in accepted}
        self._subcommand_parsers[subcommand].set_defaults(
            {"model": {"class_path": given_path, "init_args": defaults}}
        )
        self.config = self.parser.parse_args(self._args)
        self.config[subcommand].ckpt_path = path
        given = self.config[subcommand].model.init_args
        check_checkpoint_arguments(saved_class, defaults, given, path, resume=subcommand == "fit")
        problem = checkpoint_meta_problem(checkpoint["remedi"], model=given.get("model"))
        if problem:  # a checkpoint without hyperparameters: its remedi entry says, before loading
            raise UsageError(f"--ckpt_path {path}: {problem}")
        self._checkpoint = (path, {"remedi": checkpoint.get("remedi")})

    def _checkpoint_file(self, subcommand: str, config: Namespace) -> str | None:
        """The file ``--ckpt_path`` names (``last`` and ``best`` in the run directory), None when
        there is none to read (no ``--ckpt_path``; ``fit --ckpt_path last`` of a new run)."""
        given = config.get("ckpt_path")
        if not given:
            return None
        root = Path(config.trainer.get("default_root_dir") or DEFAULT_ROOT)
        if given == "last":
            if (root / "last.ckpt").is_file():
                return str(root / "last.ckpt")
            best = sorted(root.glob("best*.ckpt"), key=lambda p: p.stat().st_mtime)
            if subcommand == "fit" and best:  # killed while writing its first last.ckpt
                return str(best[-1])
            if subcommand == "fit":
                config.ckpt_path = None
                self._resume_note = f"new run: no {root / 'last.ckpt'} to resume yet"
                return None
            raise UsageError(f"--ckpt_path last: there is no {root / 'last.ckpt'} (run fit first)")
        if given == "best":
            best = sorted(root.glob("best*.ckpt"), key=lambda p: p.stat().st_mtime)
            if not best:
                raise UsageError(f"--ckpt_path best: there is no {root}/best*.ckpt (run fit first)")
            return str(best[-1])
        if not Path(given).is_file():
            raise UsageError(f"--ckpt_path {given}: no such file")
        return str(given)

    # -- checks before anything is built ----------------------------------------------------
    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        root = config.trainer.get("default_root_dir") or DEFAULT_ROOT
        self.run_dir = Path(root)
        logger = config.trainer.get("logger")
        if (
            isinstance(logger, Namespace)
            and str(logger.get("class_path", "")).endswith("TensorBoardLogger")
            and logger.init_args.get("save_dir") == FOLLOW_ROOT
        ):
            logger.init_args.save_dir = root
        if self.subcommand and self.subcommand != "fit":
            self.save_config_kwargs["config_filename"] = f"config-{self.subcommand}.yaml"
        check_output_dir(self.run_dir, "--trainer.default_root_dir")
        if self.subcommand == "fit" and not config.get("ckpt_path"):
            check_new_run(self.run_dir)
        check_trainer(config.trainer)
        check_data(config.data, self.subcommand)
        check_model(config.model)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except UsageError:
            raise
        except (ValueError, OSError, MisconfigurationException) as err:
            raise UsageError(parse_error_line(str(err), self.parser)) from err

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer = self._get(self.config_init, "trainer", default={})
        given = trainer.get("callbacks") or []
        given = given if isinstance(given, list) else [given]
        bar_wanted = trainer.get("enable_progress_bar", True) is not False
        if not sys.stdout.isatty() and bar_wanted and not any(_is_bar(c) for c in given):
            # Lightning's default rich bar draws only its last frame into a file or pipe, so a
            # redirected fit would say nothing for its whole length: log with tqdm lines instead.
            kwargs["callbacks"] = [*given, LogProgressBar()]
        plugins = trainer.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        try:
            return super().instantiate_trainer(**kwargs)
        except (TypeError, ValueError, MisconfigurationException) as err:
            raise UsageError(f"--trainer: {one_line(err)}") from err

    def after_instantiate_classes(self) -> None:
        if self._checkpoint is None or not isinstance(self.model, LearnedEditorModule):
            return
        path, saved = self._checkpoint
        try:
            check_checkpoint_meta(saved, self.model.checkpoint_meta())
        except ValueError as err:
            detail = str(err).removeprefix("checkpoint: ")
            raise UsageError(f"--ckpt_path {path}: {detail}") from err

    # -- what a run says and writes ---------------------------------------------------------
    def before_fit(self) -> None:
        ckpt = self.config.fit.get("ckpt_path")
        self._say_run_dir(f"resuming {ckpt}" if ckpt else self._resume_note or "new run")

    def after_fit(self) -> None:
        callback = self.trainer.checkpoint_callback
        best = getattr(callback, "best_model_path", "")
        self._say_run_dir(f"last.ckpt, best {Path(best).name}" if best else "last.ckpt")

    def before_validate(self) -> None:
        self._say_run_dir(f"validating {self.config.validate.get('ckpt_path') or 'a new editor'}")

    def before_test(self) -> None:
        self._say_run_dir(f"testing {self.config.test.get('ckpt_path') or 'a new editor'}")

    def before_predict(self) -> None:
        ckpt = self.config.predict.get("ckpt_path") or "a new editor"
        self._say_run_dir(f"predicting with {ckpt}")

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
        self._say_run_dir("metrics.json")

    def after_predict(self) -> None:
        output = getattr(self.datamodule, "predict_output", None)
        self._say_run_dir(f"predictions: {output or self.run_dir / 'predictions.jsonl'}")

    def _say_run_dir(self, what: str) -> None:
        root = str(self.run_dir)
        board = f"tensorboard --logdir {shlex.quote(root)}"
        _say(f"run directory: {root} ({what}; TensorBoard: {board})", self.trainer)


def _say(line: str, trainer: L.Trainer) -> None:
    """Print ``line`` on stdout, once (global rank zero)."""
    if trainer.is_global_zero:
        print(line, flush=True)


# -- checks ---------------------------------------------------------------------------------------
def check_new_run(run_dir: Path) -> None:
    """Refuse to start a run in a directory that holds another run's checkpoints (one run,
    one directory: its TensorBoard curves and ``last.ckpt`` would mix with the new run's)."""
    if any(run_dir.glob("*.ckpt")):
        raise UsageError(
            f"--trainer.default_root_dir {run_dir} already holds a run's checkpoints: resume it "
            "with --ckpt_path last, or start a new run in another directory (or delete it)"
        )


def check_trainer(trainer: Namespace) -> None:
    """Refuse an accelerator (or a number of GPUs) this machine does not have."""
    accelerator = trainer.get("accelerator")
    if not isinstance(accelerator, str):
        return
    name = accelerator.lower()
    if name in ("gpu", "cuda"):
        check_device("cuda", "--trainer.accelerator")
        devices = trainer.get("devices")
        wanted = int(devices) if isinstance(devices, int | str) and str(devices).isdigit() else 0
        if wanted > torch.cuda.device_count():
            raise UsageError(
                f"--trainer.devices {devices}: this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
    elif name == "mps":
        check_device("mps", "--trainer.accelerator")


def check_data(data: Namespace, subcommand: str | None) -> None:
    """Refuse missing data files and arguments the datamodule rejects, before the model loads
    (the datamodule's constructor only checks; it reads the data in ``setup``)."""
    init = data.init_args.as_dict() if isinstance(data.get("init_args"), Namespace) else {}
    for name, value in init.items():
        if not name.endswith("path") or value is None:
            continue
        if name == "predict_path" and subcommand != "predict":
            continue
        if not Path(value).exists():
            raise UsageError(f"--data.{name} {value}: no such file")
    if subcommand == "predict" and "predict_path" in init and init["predict_path"] is None:
        raise UsageError("predict needs --data.predict_path, a JSONL file of requests")
    cls = _import(str(data.class_path), "--data")
    try:
        module = cls(**init)
    except (ValueError, TypeError, OSError) as err:  # messages start with the argument's name
        raise UsageError(f"--data.{one_line(err)}") from err
    try:
        module.setup(subcommand)  # reads and validates the records; needs no model
    except (ValueError, OSError) as err:
        path = init.get("path")
        raise UsageError(
            file_error("--data.path", path, err) if path else f"--data: {one_line(err)}"
        ) from err


def check_model(model: Namespace) -> None:
    """Refuse an unknown model or dtype and layers out of range, then load the frozen LM once
    (the module's constructor finds it loaded)."""
    init = model.init_args
    spec, dtype = str(init.get("model")), str(init.get("model_dtype", "float32"))
    try:
        resolve_dtype(dtype)
    except ValueError as err:
        raise UsageError(f"--model.model_dtype: {err}") from err
    layers = {}
    for key in ("layer", "layers"):
        value = init.get(key)
        layers[f"--model.{key}"] = [value] if isinstance(value, int) else list(value or [])
    if not is_registered(spec, dtype):
        check_model_spec(spec, "--model.model")
        check_model_layers(spec, layers, "--model.model", allow_negative=True)
    try:
        lm = shared_model(spec, dtype)
    except (ValueError, OSError) as err:
        raise UsageError(f"--model.model: {one_line(err)}") from err
    check_layers(lm.arch.num_layers, layers, spec, allow_negative=True)


def read_checkpoint(path: str) -> dict[str, Any]:
    """The checkpoint at ``path`` (weights only), or a one-line :class:`UsageError` when it
    cannot be read or is not a remedi checkpoint."""
    if not zipfile.is_zipfile(path):
        raise UsageError(
            f"--ckpt_path {path}: not a checkpoint (not a zip archive: truncated, or another file)"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise UsageError(
            f"--ckpt_path {path}: cannot be read as a checkpoint ({one_line(err)})"
        ) from err
    if not isinstance(checkpoint, dict) or "remedi" not in checkpoint:
        raise UsageError(f"--ckpt_path {path}: not a remedi checkpoint (no 'remedi' entry)")
    return checkpoint


def check_checkpoint_arguments(
    cls: type[LearnedEditorModule],
    saved: dict[str, Any],
    given: Namespace,
    path: str,
    resume: bool,
) -> None:
    """Refuse, in one line, a given module argument that differs from the checkpoint's when the
    checkpoint fixes it, or when ``fit`` resumes and the optimizer state would replace it."""
    rules = [(cls.checkpoint_fixed, "a trained editor's {} cannot change")]
    if resume:
        rules.append(
            (
                cls.checkpoint_restored,
                "resuming restores {} with the optimizer state; start a new run to change them",
            )
        )
    for names, why in rules:
        for name in names:
            if name in saved and saved[name] != given.get(name):
                raise UsageError(
                    f"--model.{name} {given.get(name)!r}: checkpoint {path} was trained with "
                    f"{name} {saved[name]!r} ({why.format(', '.join(names))})"
                )


def _checkpoint_class(
    path: str, class_path: str | None, checkpoint: dict[str, Any]
) -> type[LearnedEditorModule]:
    """The module class that wrote ``checkpoint``: its saved class path, else its method."""
    if class_path:
        return _import(class_path, f"--ckpt_path {path}")
    method = str((checkpoint.get("remedi") or {}).get("method", "remedi"))
    if method not in LEARNED_METHODS:
        raise UsageError(f"--ckpt_path {path}: written for an unknown method {method!r}")
    return LEARNED_METHODS[method]


# -- messages -------------------------------------------------------------------------------------
def parse_error_line(message: str, parser: argparse.ArgumentParser) -> str:
    """One line for a jsonargparse error: the key as a flag, what is wrong and, for an unknown
    key, the closest known one."""
    text = message.strip()
    keys = re.findall(r'Parser key "([^"]+)"', text)
    class_path = re.search(r"Problem with given class_path '([^']+)'", text)
    option = re.search(r"Option '([^']+)' is not accepted", text)
    if option:
        owner = class_path.group(1) if class_path else ""
        try:
            known = init_arguments(_import(owner, "")) if owner else []
        except UsageError:
            known = []
        what = f"{owner or 'the class'} has no argument {option.group(1)!r}"
        return _unknown(".".join([*keys[:1], option.group(1)]), known, keys[:1], what)
    unknown_key = re.search(
        r"(?:Group '([^']+)'|Subcommand '[^']+') does not accept option '([^']+)'", text
    )
    if unknown_key:
        key = ".".join(k for k in unknown_key.groups() if k)
        return _unknown(key, _parser_keys(parser), [], "no such key")
    unrecognized = re.search(r"unrecognized arguments: (.*)", text)
    if unrecognized:
        words = unrecognized.group(1).split()
        flags = [w.lstrip("-").split("=")[0] for w in words if w.startswith("-")]
        if flags:
            return _unknown(flags[0], _parser_keys(parser), [], "no such key")
        return f"unknown subcommand {words[0]!r}: choose {', '.join(SUBCOMMANDS)} ({PROG} --help)"
    required = re.search(r"the following arguments are required: (.*)", text)
    if required:
        missing = ", ".join(f"--{k.split('.', 1)[-1]}" for k in required.group(1).split(", "))
        return f"{missing} is required (e.g. --config configs/quickstart.yaml)"
    details = [
        line
        for line in (
            re.sub(r'^\s*-?\s*(Parser key "[^"]+":)?\s*', "", x) for x in text.splitlines()
        )
        if line and not _DETAIL_NOISE.match(line)
    ]
    detail = details[0] if details else text.splitlines()[0]
    given = re.search(r"^\s*Given value: (.*)$", text, re.MULTILINE)
    if detail.startswith("Expected a ") and "Got value:" not in detail and given:  # wrong type
        subtypes = re.search(r"Subtypes: \[(.*)\]", text)
        types = subtypes.group(1) if subtypes else detail.removeprefix("Expected a ")
        names = re.findall(r"<class '([\w.]+)'>", types) or [types]
        expected = " or ".join(n.replace("NoneType", "null") for n in names)
        detail = f"expected {expected}, got {given.group(1)!r}"
    else:
        detail = _readable(detail)
    flag = "--" + ".".join(keys) if keys else ""
    if class_path and not keys[1:]:
        flag = f"{flag} {class_path.group(1)}".strip()
    return f"{flag}: {detail}" if flag else detail


def _readable(detail: str) -> str:
    """``Expected a <class 'int'>. Got value: abc`` → ``expected int, got 'abc'``."""
    found = re.match(r"Expected a (.+?)\. Got value: (.*)$", detail)
    if not found:
        return detail
    expected, value = found.groups()
    expected = re.sub(r"<class '([\w.]+)'>", r"\1", expected)
    literal = re.match(r"typing\.Literal\[(.*)\]$", expected)
    expected = f"one of {literal.group(1)}" if literal else expected
    return f"expected {expected}, got {value!r}"


def _unknown(key: str, known: list[str], prefix: list[str], what: str) -> str:
    """``--key: what`` with the closest known key, if one is close."""
    names = [".".join([*prefix, k]) for k in known]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean --{close[0]}?)" if close else f" ({PROG} <subcommand> --help)"
    return f"--{key}: {what}{hint}"


def _parser_keys(parser: argparse.ArgumentParser) -> list[str]:
    return [a.dest for a in parser._actions if a.dest and a.dest != argparse.SUPPRESS]


def init_arguments(cls: type) -> list[str]:
    """The argument names ``cls(...)`` accepts, following ``**kwargs`` to the base classes."""
    names: list[str] = []
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        if init is None:
            continue
        params = list(inspect.signature(init).parameters.values())[1:]
        for p in params:
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in names:
                names.append(p.name)
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


def _import(class_path: str, flag: str) -> Any:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise UsageError(f"{flag} {class_path}: cannot import it ({err})") from err


# -- entry points ---------------------------------------------------------------------------------
def run(args: list[str] | None = None) -> RemediCLI:
    """Build and run the CLI on ``args`` (``sys.argv[1:]`` when None); raises
    :class:`UsageError` for a mistake the user can fix. Returns the CLI (tests read it)."""
    release_freed_memory()
    quiet_warnings()
    # the run directory holds config.yaml before Lightning looks, and check_new_run already
    # refuses a new run where another's checkpoints are
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    return RemediCLI(
        LearnedEditorModule,
        EditCaseDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults=TRAINER_DEFAULTS,
        args=args,
        auto_configure_optimizers=False,
        save_config_callback=RunConfigCallback,
        save_config_kwargs={"overwrite": True},
        parser_class=TrainArgumentParser,
        parser_kwargs={"prog": PROG, "description": DESCRIPTION, "allow_abbrev": False},
    )


def main(args: list[str] | None = None) -> int:
    """The command line: 0 after a run, 2 after a one-line usage error on stderr, 1 after a
    non-finite loss (one line; the checkpoints are those of the last good validation)."""
    try:
        run(args)
    except UsageError as err:
        return fail(err)
    except NonFiniteLossError as err:
        if getattr(rank_zero_only, "rank", 0) == 0:
            print(f"error: {err}; stopped before saving that state", file=sys.stderr)
        return TRAINING_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
