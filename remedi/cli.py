"""What every command line shares: one-line usage errors (exit code 2), help that shows each
flag's default, checks of the model, device and output flags made before anything expensive, and
the filter for third-party warnings that are noise to a user."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NoReturn

import torch
from safetensors import SafetensorError

from remedi.models.loading import DEFAULT_MODEL

USAGE_ERROR = 2
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class UsageError(ValueError):
    """A mistake the user can fix (a flag, a path, a record): one line on stderr, exit code 2."""


def fail(message: str | BaseException) -> int:
    """Print ``error: message`` on stderr and return the usage-error exit code."""
    print(f"error: {message}", file=sys.stderr)
    return USAGE_ERROR


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's and epilog's line breaks (examples) and appends each optional
    flag's default to its help text (not for required flags, switches or a bare ``None``)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default is None or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` with its errors in one line (``error: ... (see PROG --help)``) instead of
    the usage block, and no abbreviated flags (a typo is an error, not a guess)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(USAGE_ERROR)


def add_statistics_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ROME/MEMIT's second-moment statistics, one wording for every command."""
    parser.add_argument(
        "--corpus",
        default=None,
        help="text for ROME/MEMIT's second-moment statistics: file(s) or a folder (one "
        "document per line; .jsonl: one {'text': ...} object per line), hf:NAME[:CONFIG[:SPLIT]], "
        "'sampled' (text sampled from the model, made once and cached; minutes on a CPU) or "
        "'python-docs' (the Python documentation every Python ships; the default)",
    )
    parser.add_argument(
        "--stats-tokens", type=int, default=100_000, help="corpus tokens for the statistics"
    )
    parser.add_argument(
        "--no-stats", action="store_true", help="identity statistics (unwhitened updates)"
    )


def check_model_spec(spec: str, flag: str = "--model") -> None:
    """Reject a model spec that cannot be loaded, without loading it."""
    path = Path(spec).expanduser()
    if spec == DEFAULT_MODEL or (_HUB_ID.match(spec) and not path.exists()):
        return
    if spec.endswith(".gguf") and path.is_file():
        return
    if path.is_dir() and (path / "config.json").is_file():
        return
    raise UsageError(
        f"{flag} {spec!r} is neither {DEFAULT_MODEL!r}, a .gguf file, a model directory with "
        "config.json, nor a hub id 'org/name'"
    )


def _config_dir(spec: str) -> Path | None:
    """The directory holding ``spec``'s config.json when it is on disk already (a model directory,
    the default model once dequantised, a hub model in the local cache), else None."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path if (path / "config.json").is_file() else None
    if spec == DEFAULT_MODEL:
        from remedi.models.loading import built_default_dir

        return built_default_dir()
    if _HUB_ID.match(spec):
        import huggingface_hub

        try:
            cached = huggingface_hub.try_to_load_from_cache(spec, "config.json")
        except ValueError:
            return None
        return Path(cached).parent if isinstance(cached, str) else None
    return None


def model_layer_count(spec: str, flag: str = "--model") -> int | None:
    """The number of layers of ``spec`` read from its config alone (no weights), or None when no
    readable config is on disk yet (the loader reports an unreadable one). An architecture remedi
    does not support is a :class:`UsageError` here, before anything loads."""
    directory = _config_dir(spec)
    if directory is None:
        return None
    from transformers import AutoConfig

    from remedi.models.architectures import spec_for

    try:
        model_type = str(json.loads((directory / "config.json").read_bytes())["model_type"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # the loader reports an unreadable config in its own words
    try:
        architecture = spec_for(model_type)
    except ValueError as err:
        raise UsageError(f"{flag} {spec!r}: {err}") from err
    try:
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
        return int(architecture.num_layers(config))
    except (OSError, ValueError, KeyError, AttributeError):
        return None


def check_layers(
    n_layers: int,
    layers: Mapping[str, Iterable[int | None]],
    spec: str,
    allow_negative: bool = False,
) -> None:
    """Reject a layer flag's value outside ``0..n_layers-1`` (with ``allow_negative``, also
    ``-n_layers..-1``, counted from the end); ``layers`` maps each flag to its values."""
    low = -n_layers if allow_negative else 0
    for flag, values in layers.items():
        bad = [v for v in values if v is not None and not low <= v < n_layers]
        if bad:
            ends = f", or -{n_layers}..-1 counting from the end" if allow_negative else ""
            raise UsageError(
                f"{flag} {bad[0]} is out of range for {spec}, which has {n_layers} layers "
                f"(valid: 0..{n_layers - 1}{ends})"
            )


def check_model_layers(
    spec: str,
    layers: Mapping[str, Iterable[int | None]],
    flag: str = "--model",
    allow_negative: bool = False,
) -> None:
    """Before loading: reject an unsupported architecture and layers out of range, where the
    model's config is on disk (see :func:`model_layer_count`)."""
    n_layers = model_layer_count(spec, flag)
    if n_layers is not None:
        check_layers(n_layers, layers, spec, allow_negative)


def check_device(device: str, flag: str = "--device") -> None:
    """Reject a device this machine does not have (``cpu``, ``cuda``, ``cuda:N``, ``mps``)."""
    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise UsageError(f"{flag} {device!r} is not a device (e.g. cpu, cuda, cuda:1)") from err
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{flag} {device!r}: CUDA is not available on this machine")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise UsageError(
                f"{flag} {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"{flag} {device!r}: MPS is not available on this machine")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"{flag} {device!r}: choose cpu, cuda[:N] or mps")


def check_output_dir(path: Path, flag: str = "--output") -> None:
    """Reject an output directory that is a file or cannot be created or written."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {str(path)!r} exists and is not a directory")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {str(path)!r}: {str(existing)!r} is not writable")


def check_checkpoint_file(
    path: Path, flag: str = "--checkpoint", method: str | None = None, model: str | None = None
) -> None:
    """Reject, before the model loads, a checkpoint (a ``.ckpt`` file or a shipped editor
    folder) that is missing, truncated, unsafe or not remedi's, or (given ``method`` and
    ``model``) trained as another method or for another model (:func:`remedi.checkpoints.check`)."""
    from remedi import checkpoints

    try:
        if method is None:
            checkpoints.read(path)
        else:
            checkpoints.check(path, method=method, model=model)
    except checkpoints.CheckpointError as err:
        detail = str(err).removeprefix(f"checkpoint {path}: ")
        if detail.startswith("file not found"):
            raise UsageError(f"{flag}: file not found: {path}") from err
        raise UsageError(f"{flag} {path}: {detail}") from err


MODEL_LOAD_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    ValueError,
    RuntimeError,
    SafetensorError,
)
"""What :func:`remedi.models.load_model` raises for a model that is missing, unreadable or corrupt
(a truncated safetensors file raises ``SafetensorError``)."""


def one_line(err: BaseException) -> str:
    """The first non-blank line of an exception's message (its type name when it has none):
    loaders' messages can run over many lines, a usage error gets one."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return _TORCH_APPENDIX.sub("", lines[0]) if lines else type(err).__name__


def load_lm(args: argparse.Namespace) -> Any:
    """The ``LoadedModel`` of ``--model`` with ``--dtype`` and ``--device``; a model that cannot
    be loaded is a :class:`UsageError` of one line naming ``--model``."""
    from remedi.models import load_model

    try:
        return load_model(args.model, dtype=args.dtype, device=args.device)
    except MODEL_LOAD_ERRORS as err:
        raise UsageError(f"--model {args.model}: {one_line(err)}") from None


_TORCH_APPENDIX = re.compile(r"\s*\(Could this error message be improved\?.*$")
"""What PyTorch appends to its internal errors: nothing a remedi user can act on."""


def file_error(flag: str, path: str | Path, err: BaseException) -> str:
    """``FLAG PATH: problem`` for an unreadable or malformed input file, naming the file once
    (``FLAG: problem`` when the problem names it already)."""
    message = one_line(err)
    return f"{flag}: {message}" if str(path) in message else f"{flag} {path}: {message}"


def check_positive(value: float | None, flag: str) -> None:
    """Reject a count or size that is not positive (None means "not given")."""
    if value is not None and value <= 0:
        raise UsageError(f"{flag} must be positive, got {value}")


def quiet_warnings() -> None:
    """Silence third-party warnings and notices that say nothing a remedi user can act on."""
    for message in (
        r".*past_key_values.*",  # transformers' cache-format deprecation, raised inside generate
        r".*LeafSpec.*",  # torch.utils._pytree deprecation, raised inside Lightning
        r".*transfer_batch_to_device.*",  # Lightning's note about our own batch type
        r"The dirpath has changed from",  # Lightning, testing a checkpoint from another folder
    ):
        warnings.filterwarnings("ignore", message=message)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropAdverts) for f in rank_zero.filters):
        rank_zero.addFilter(_DropAdverts())


class _DropAdverts(logging.Filter):
    """Drops Lightning's "💡 Tip: ... try installing litlogger/litmodels" lines on every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def load_data(spec: str) -> list[Any]:
    """The cases ``--data`` names (:func:`remedi.data.load_spec`: ``builtin[:SPLIT]`` or a
    file); a one-line :class:`UsageError` naming ``--data`` otherwise."""
    from remedi.data import load_spec

    try:
        return load_spec(spec)
    except (OSError, ValueError) as err:
        if spec.startswith("builtin"):
            raise UsageError(f"--data {err}") from err
        raise UsageError(file_error("--data", spec, err)) from err
