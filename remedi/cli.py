"""What every command line shares: one-line usage errors (exit code 2), help that shows each
flag's default, checks of the model, device and output flags made before anything expensive, and
the filter for third-party warnings that are noise to a user."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import warnings
import zipfile
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


def check_checkpoint_file(path: Path, flag: str = "--checkpoint") -> None:
    """Reject a checkpoint that is missing or not a zip archive (what ``torch.save`` writes), so
    that a truncated or wrong file stops before the model loads."""
    if not path.is_file():
        raise UsageError(f"{flag}: file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise UsageError(
            f"{flag} {path}: not a PyTorch checkpoint (not a zip archive; truncated, or another "
            "kind of file?)"
        )


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
    return lines[0] if lines else type(err).__name__


def file_error(flag: str, path: str | Path, err: BaseException) -> str:
    """``FLAG PATH: problem`` for an unreadable or malformed input file, naming the file once."""
    message = one_line(err)
    return message if str(path) in message else f"{flag} {path}: {message}"


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
