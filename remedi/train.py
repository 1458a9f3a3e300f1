"""``python -m remedi.train {fit,validate,test,predict}``: train and evaluate learned editors.

A :class:`~lightning.pytorch.cli.LightningCLI` around the learned-editor modules and the
datamodules, which adds:

- **one run directory**, ``trainer.default_root_dir`` (the shipped configs set
  ``checkpoints/<config path>``, e.g. ``checkpoints/mend/quickstart``): ``last.ckpt`` and the
  best checkpoint by ``val/selection`` (see ``lightning_modules.learned_editor``), the
  TensorBoard events without version subfolders (a resumed ``fit``, ``validate`` and ``test``
  append to the same run), the resolved config
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
- early stopping with patience 2 on ``val/selection``; ``inference_mode=False`` so that evaluation
  callbacks may take gradients during validation (Lightning then validates under ``no_grad``).

The CLI uses only LightningCLI's public hooks; what happens during a run lives in Lightning's own
extension points: the callbacks :class:`RunDirectory` (its lines, ``metrics.json``),
:class:`RunCheckpoint` (``last.ckpt`` after every validation) and :class:`RunConfigCallback`,
and the plugin :class:`AtomicCheckpointIO` (checkpoints written atomically, read through
:mod:`remedi.checkpoints`).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import re
import shlex
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NoReturn

import lightning as L
import torch
from jsonargparse import ActionSubCommands, DefaultHelpFormatter, Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import (
    Callback,
    EarlyStopping,
    ModelCheckpoint,
    ProgressBar,
    TQDMProgressBar,
)
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
from lightning_modules.learned_editor import NonFiniteLossError
from remedi import checkpoints
from remedi.allocator import release_freed_memory
from remedi.atomic import atomic_path, write_json
from remedi.cli import (
    UsageError,
    check_device,
    check_layers,
    check_model_layers,
    check_model_spec,
    check_output_dir,
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


# -- the parser -----------------------------------------------------------------------------------
class TrainHelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help (defaults, config keys) keeping the description's line breaks."""


class DescribedSubcommands(ActionSubCommands):
    """The subcommands, described by what they do here (Lightning takes the first lines of the
    Trainer methods' docstrings and cuts them mid-sentence)."""

    def add_subcommand(self, name: str, parser: Any, **kwargs: Any) -> Any:
        """Add ``parser`` as subcommand ``name``, with remedi's summary of it."""
        if name in SUBCOMMANDS:
            kwargs["help"] = parser.description = SUBCOMMANDS[name]
        return super().add_subcommand(name, parser, **kwargs)


class TrainArgumentParser(LightningArgumentParser):
    """A parser whose errors are one :class:`UsageError` line naming the key, instead of the
    full usage and jsonargparse's nested explanation, and whose subcommands are described by
    :data:`SUBCOMMANDS`."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """Raise one :class:`UsageError` line (nested parsers trying alternatives raise as
        jsonargparse does)."""
        if not self.exit_on_error:
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        raise UsageError(parse_error_line(message, parser)) from ex

    def add_subcommands(
        self, required: bool = True, dest: str = "subcommand", **kwargs: Any
    ) -> Any:
        """jsonargparse's subcommands, as :class:`DescribedSubcommands`."""
        kwargs.setdefault("action", DescribedSubcommands)
        return super().add_subcommands(required, dest, **kwargs)


def add_run_arguments(parser: LightningArgumentParser) -> None:
    """The default module (REMEDI) and the run's checkpoint and early-stopping callbacks, with
    remedi's defaults, as configurable ``checkpoint.*`` and ``early_stopping.*`` keys."""
    parser.set_defaults({"model": {"class_path": f"lightning_modules.{RemediModule.__name__}"}})
    parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
    parser.set_defaults(
        {
            "checkpoint.monitor": "val/selection",
            "checkpoint.mode": "max",
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
            "early_stopping.monitor": "val/selection",
            "early_stopping.mode": "max",
            "early_stopping.patience": 2,
            "early_stopping.strict": False,
        }
    )


# -- callbacks and the checkpoint plugin ----------------------------------------------------------
class RunCheckpoint(ModelCheckpoint):
    """Keeps the best checkpoint by the monitored metric and rewrites ``last.ckpt`` after every
    validation. Lightning (2.6) rewrites ``last.ckpt`` only when a top-k file is saved, so after
    an epoch that did not improve ``--ckpt_path last`` would resume from the last improving
    epoch and silently lose the epochs after it."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Lightning's, then ``last.ckpt`` when checkpoints are saved at epoch ends."""
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._keep_last(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Lightning's, then ``last.ckpt`` when checkpoints are saved after validation."""
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._keep_last(trainer)

    def _keep_last(self, trainer: L.Trainer) -> None:
        """Write ``last.ckpt`` unless this step's checkpoint was just saved."""
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Lightning's, then :func:`remove_leftovers` of a killed run."""
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
    empty ``last.ckpt`` in place of the previous one. Checkpoints are read through
    :func:`remedi.checkpoints.read`: weights only, refused in one line when not remedi's."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        """Write ``checkpoint`` to ``path`` atomically."""
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """The checkpoint at ``path``, on the CPU (Lightning moves its state where it goes)."""
        return checkpoints.read(path)


class RunConfigCallback(SaveConfigCallback):
    """Lightning's writer of the resolved config, writing it atomically and durably, as
    ``config.yaml`` for ``fit`` and ``config-<subcommand>.yaml`` for the others."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Save the config of ``stage`` into the run directory."""
        name = str(getattr(stage, "value", stage))  # Lightning passes a TrainerFn
        if name != "fit":
            self.config_filename = f"config-{name}.yaml"
        save = self.parser.save

        def atomic_save(config: Namespace, path: str, **kwargs: Any) -> None:
            with atomic_path(path) as tmp:
                save(config, str(tmp), **{**kwargs, "overwrite": True})

        self.parser.save = atomic_save
        try:
            super().setup(trainer, pl_module, stage)
        finally:
            del self.parser.save


@dataclass(frozen=True)
class CheckpointChoice:
    """What ``--ckpt_path`` named, resolved: the file to load (None: none) with its ``remedi``
    metadata, and why a ``fit`` without one starts anew (``note``)."""

    path: str | None = None
    meta: dict[str, Any] | None = None
    note: str = ""


class RunDirectory(Callback):
    """The run directory's policy during a run: one line on stdout as each subcommand starts and
    ends, saying where the run directory is and what it holds, and ``metrics.json`` after
    ``test``."""

    STARTS: ClassVar[dict[str, str]] = {
        "validate": "validating",
        "test": "testing",
        "predict": "predicting with",
    }

    def __init__(self, root: Path, checkpoint: CheckpointChoice) -> None:
        self.root = root
        self.checkpoint = checkpoint

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Say what this subcommand starts from."""
        path = self.checkpoint.path
        if stage == "fit":
            self.say(trainer, f"resuming {path}" if path else self.checkpoint.note or "new run")
        elif stage in self.STARTS:
            self.say(trainer, f"{self.STARTS[stage]} {path or 'a new editor'}")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Say which checkpoints the run left."""
        best = getattr(trainer.checkpoint_callback, "best_model_path", "")
        self.say(trainer, f"last.ckpt, best {Path(best).name}" if best else "last.ckpt")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write the test metrics (without their ``test/`` prefix) to ``metrics.json``."""
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)  # every rank: a collective
        if not trainer.is_global_zero:
            return
        metrics = {
            key.removeprefix("test/"): float(value)
            for key, value in trainer.callback_metrics.items()
            if key.startswith("test/")
        }
        write_json(run_dir / "metrics.json", dict(sorted(metrics.items())))
        self.say(trainer, "metrics.json")

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Say where the predictions went."""
        output = getattr(getattr(trainer, "datamodule", None), "predict_output", None)
        self.say(trainer, f"predictions: {output or self.root / 'predictions.jsonl'}")

    def say(self, trainer: L.Trainer, what: str) -> None:
        """Print ``run directory: ROOT (WHAT; TensorBoard: ...)`` once (global rank zero)."""
        if trainer.is_global_zero:
            board = f"tensorboard --logdir {shlex.quote(str(self.root))}"
            print(f"run directory: {self.root} ({what}; TensorBoard: {board})", flush=True)


class LogProgressBar(TQDMProgressBar):
    """tqdm progress for output that is not a terminal: a training line every 30 s at most."""

    def __init__(self) -> None:
        super().__init__(refresh_rate=1)

    def init_train_tqdm(self) -> Any:
        """Lightning's training bar, drawn at most every 30 s."""
        bar = super().init_train_tqdm()
        bar.mininterval = 30.0  # seconds between lines in a log
        return bar


def run_callbacks_and_plugins(trainer: Any, run_directory: RunDirectory) -> dict[str, list[Any]]:
    """The Trainer's ``callbacks`` and ``plugins``: those ``trainer`` (the configured Trainer
    arguments) gives, plus ``run_directory``, tqdm lines when the output is not a terminal
    (Lightning's rich bar draws only its last frame into a file or pipe, so a redirected fit
    would say nothing for its whole length) unless a bar is given or turned off, and
    :class:`AtomicCheckpointIO` unless a ``CheckpointIO`` is given."""
    callbacks = [*_as_list(trainer.get("callbacks")), run_directory]
    bar_wanted = trainer.get("enable_progress_bar", True) is not False
    has_bar = any(isinstance(c, ProgressBar) for c in callbacks)
    if not sys.stdout.isatty() and bar_wanted and not has_bar:
        callbacks.append(LogProgressBar())
    plugins = _as_list(trainer.get("plugins"))
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return {"callbacks": callbacks, "plugins": plugins}


def _as_list(value: Any) -> list[Any]:
    """``value`` as a list (None: empty; one item: a list of it)."""
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


# -- --ckpt_path ----------------------------------------------------------------------------------
def parse_with_checkpoint(
    parser: LightningArgumentParser, args: Any, config: Namespace, subcommand: str
) -> tuple[Namespace, CheckpointChoice]:
    """``config`` (``args`` parsed) parsed again with the module arguments of the checkpoint
    ``--ckpt_path`` names as defaults: what the config and command line leave unset comes from
    the checkpoint, and a given value the checkpoint cannot take is refused in one line. The
    returned config's ``ckpt_path`` is None; the resolved file is in the :class:`CheckpointChoice`.
    """
    choice = resolve_ckpt_path(subcommand, config[subcommand])
    if choice.path is None:
        config[subcommand].ckpt_path = None
        return config, choice
    path = choice.path
    checkpoint = read_ckpt_path(path)
    saved_class, defaults = checkpoint_defaults(path, checkpoint, config[subcommand].model)
    model = {"class_path": str(config[subcommand].model.class_path), "init_args": defaults}
    parser.set_defaults({f"{subcommand}.model": model})
    config = parser.parse_args(args)
    given = config[subcommand].model.init_args
    check_checkpoint_arguments(saved_class, defaults, given, path, resume=subcommand == "fit")
    problem = checkpoints.meta_problem(checkpoint["remedi"], {"model": given.get("model")})
    if problem:  # a checkpoint without hyperparameters: its remedi entry says, before loading
        raise UsageError(f"--ckpt_path {path}: {problem}")
    config[subcommand].ckpt_path = None
    return config, CheckpointChoice(path, dict(checkpoint["remedi"]))


def resolve_ckpt_path(subcommand: str, config: Namespace) -> CheckpointChoice:
    """The file ``--ckpt_path`` names (``last`` and ``best`` in the run directory); none when
    there is none to read (no ``--ckpt_path``; ``fit --ckpt_path last`` of a new run)."""
    given = config.get("ckpt_path")
    if not given:
        return CheckpointChoice()
    root = Path(config.trainer.get("default_root_dir") or DEFAULT_ROOT)
    best = sorted(root.glob("best*.ckpt"), key=lambda p: p.stat().st_mtime)
    if given == "last":
        if (root / "last.ckpt").is_file():
            return CheckpointChoice(str(root / "last.ckpt"))
        if subcommand == "fit" and best:  # killed while writing its first last.ckpt
            return CheckpointChoice(str(best[-1]))
        if subcommand == "fit":
            return CheckpointChoice(note=f"new run: no {root / 'last.ckpt'} to resume yet")
        raise UsageError(f"--ckpt_path last: there is no {root / 'last.ckpt'} (run fit first)")
    if given == "best":
        if not best:
            raise UsageError(f"--ckpt_path best: there is no {root}/best*.ckpt (run fit first)")
        return CheckpointChoice(str(best[-1]))
    if not Path(given).is_file():
        raise UsageError(f"--ckpt_path {given}: no such file")
    return CheckpointChoice(str(given))


def read_ckpt_path(path: str) -> dict[str, Any]:
    """The checkpoint at ``path`` (:func:`remedi.checkpoints.read`); a one-line
    :class:`UsageError` naming ``--ckpt_path`` when it cannot be read or is not remedi's."""
    try:
        return checkpoints.read(path)
    except checkpoints.CheckpointError as err:
        raise ckpt_path_error(path, err) from err


def ckpt_path_error(path: str, err: checkpoints.CheckpointError) -> UsageError:
    """``err`` (``checkpoint [PATH]: problem``) as ``--ckpt_path PATH: problem``."""
    problem = str(err).removeprefix(f"checkpoint {Path(path)}: ").removeprefix("checkpoint: ")
    return UsageError(f"--ckpt_path {path}: {problem}")


def checkpoint_defaults(
    path: str, checkpoint: dict[str, Any], model: Namespace
) -> tuple[type[LearnedEditorModule], dict[str, Any]]:
    """The module class that wrote ``checkpoint`` and its saved ``__init__`` arguments; a
    one-line refusal when ``model`` (the configured ``--model``) is another class."""
    saved = dict(checkpoint.get("hyper_parameters") or {})
    saved.pop("_instantiator", None)
    saved_class = _checkpoint_class(path, saved.pop("_class_path", None), checkpoint)
    given_path = str(model.class_path)
    if _import(given_path, "--model") is not saved_class:
        raise UsageError(
            f"--model {given_path}: checkpoint {path} holds a {saved_class.method!r} editor "
            f"({saved_class.__name__}); give the config it was trained with"
        )
    accepted = set(init_arguments(saved_class))
    return saved_class, {k: v for k, v in saved.items() if k in accepted}


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


def check_checkpoint_fits(choice: CheckpointChoice, module: LearnedEditorModule) -> None:
    """Refuse, in one line, a checkpoint trained for another method, model, layer set or width
    than ``module`` (built from the config) has."""
    try:
        checkpoints.check_meta({"remedi": choice.meta}, module.checkpoint_meta())
    except checkpoints.CheckpointError as err:
        raise ckpt_path_error(str(choice.path), err) from err


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


# -- before anything is built ---------------------------------------------------------------------
def settle_run_dir(config: Namespace) -> Path:
    """The run directory (``trainer.default_root_dir``), which the default logger's
    ``save_dir`` is set to follow."""
    root = config.trainer.get("default_root_dir") or DEFAULT_ROOT
    logger = config.trainer.get("logger")
    if (
        isinstance(logger, Namespace)
        and str(logger.get("class_path", "")).endswith("TensorBoardLogger")
        and logger.init_args.get("save_dir") == FOLLOW_ROOT
    ):
        logger.init_args.save_dir = root
    return Path(root)


def check_run(config: Namespace, subcommand: str | None, run_dir: Path) -> None:
    """Refuse, before the model loads where possible, a run that would fail later: an unusable
    run directory, a new run where another's checkpoints are, an accelerator this machine does
    not have, missing or malformed data, an unknown model or dtype, layers out of range."""
    check_output_dir(run_dir, "--trainer.default_root_dir")
    if subcommand == "fit" and not config.get("ckpt_path"):
        check_new_run(run_dir)
    check_trainer(config.trainer)
    check_data(config.data, subcommand)
    check_model(config.model)


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


# -- the command ----------------------------------------------------------------------------------
class RemediCLI(LightningCLI):
    """LightningCLI with REMEDI's defaults, ``--ckpt_path`` handling, run directory and one-line
    errors (see the module docstring), through LightningCLI's public hooks only."""

    run_dir: Path
    """The run directory, ``trainer.default_root_dir``."""
    checkpoint = CheckpointChoice()
    """What ``--ckpt_path`` named, resolved and read."""

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """Lightning's parser, whose help keeps the description's line breaks."""
        kwargs.setdefault("formatter_class", TrainHelpFormatter)
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """REMEDI's default module and the run's checkpoint and early-stopping callbacks."""
        add_run_arguments(parser)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse ``args``; with ``--ckpt_path``, over the checkpoint's module arguments
        (:func:`parse_with_checkpoint`). Lightning reads the config's ``ckpt_path`` next and
        would load the checkpoint's arguments over the given ones, so the resolved file is kept
        in :attr:`checkpoint` and put back by :meth:`before_instantiate_classes`."""
        self.config = parser.parse_args(args)
        subcommand = self.config.get("subcommand")
        if subcommand:
            self.config, self.checkpoint = parse_with_checkpoint(
                parser, args, self.config, subcommand
            )

    def before_instantiate_classes(self) -> None:
        """Settle the run directory and refuse what would fail later, before the model loads."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        if self.subcommand:
            config.ckpt_path = self.checkpoint.path
        self.run_dir = settle_run_dir(config)
        check_run(config, self.subcommand, self.run_dir)

    def instantiate_classes(self) -> None:
        """Lightning's, with a class that refuses its arguments reported in one line."""
        try:
            super().instantiate_classes()
        except UsageError:
            raise
        except (ValueError, OSError, MisconfigurationException) as err:
            raise UsageError(parse_error_line(str(err), self.parser)) from err

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """Lightning's Trainer with the run's callbacks and checkpoint plugin
        (:func:`run_callbacks_and_plugins`); a Trainer argument it refuses is one line."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        run_directory = RunDirectory(self.run_dir, self.checkpoint)
        added = run_callbacks_and_plugins(config.get("trainer") or {}, run_directory)
        try:
            return super().instantiate_trainer(**{**added, **kwargs})
        except (TypeError, ValueError, MisconfigurationException) as err:
            raise UsageError(f"--trainer: {one_line(err)}") from err

    def after_instantiate_classes(self) -> None:
        """Refuse a ``--ckpt_path`` checkpoint that does not fit the module just built."""
        if self.checkpoint.path is not None and isinstance(self.model, LearnedEditorModule):
            check_checkpoint_fits(self.checkpoint, self.model)


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
