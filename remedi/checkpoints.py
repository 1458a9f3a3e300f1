"""The one place a learned editor's checkpoint is read and checked: a Lightning ``.ckpt`` that
``remedi.train`` wrote, or a shipped folder (``editor.safetensors`` + ``settings.json``).

Every command, the Lightning modules and the registry call these functions, so a checkpoint of
another method, model or layer set is refused with the same one line everywhere. Files load with
``weights_only=True``: one that pickles anything beyond tensors and plain data is refused before
anything in it runs. Plain PyTorch: nothing here imports Lightning.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

READ_ERRORS: tuple[type[Exception], ...] = (
    RuntimeError,
    OSError,
    EOFError,
    ValueError,
    KeyError,
    pickle.UnpicklingError,
    zipfile.BadZipFile,
)
"""What ``torch.load`` raises for a truncated, garbled or foreign checkpoint file."""
SETTINGS_FILE = "settings.json"
WEIGHTS_FILE = "editor.safetensors"
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_TORCH_APPENDIX = re.compile(r"\s*\(Could this error message be improved\?.*$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the file."""


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return _TORCH_APPENDIX.sub("", lines[0]) if lines else type(err).__name__


def is_folder_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a shipped editor folder (settings JSON beside safetensors weights)."""
    return Path(path).is_dir() and (Path(path) / SETTINGS_FILE).is_file()


def read(path: str | Path) -> dict[str, Any]:
    """The checkpoint at ``path`` as a dict with at least a ``remedi`` metadata entry.

    A ``.ckpt`` file is read with ``torch.load(weights_only=True)``; a folder checkpoint gives
    ``{"remedi": meta, "hyper_parameters": settings, "editor_state": weights}``. Raises
    :class:`CheckpointError` (one line, naming ``path``) for a missing, truncated, unsafe or
    foreign file."""
    path = Path(path)
    if is_folder_checkpoint(path):
        return _read_folder(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: file not found")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"checkpoint {path}: not a checkpoint (not a PyTorch checkpoint's zip archive; "
            "truncated, or another kind of file?)"
        )
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except READ_ERRORS as err:
        found = _GLOBAL.search(str(err))
        if isinstance(err, pickle.UnpicklingError) and found:
            raise CheckpointError(
                f"checkpoint {path}: refused: it pickles {found.group(1)}, not only tensors and "
                "plain data (remedi loads checkpoints with weights_only=True)"
            ) from err
        raise CheckpointError(
            f"checkpoint {path}: cannot be read as a checkpoint ({_first_line(err)})"
        ) from err
    if not isinstance(saved, dict) or not isinstance(saved.get("remedi"), dict):
        raise CheckpointError(f"checkpoint {path}: not a remedi checkpoint (no 'remedi' entry)")
    return saved


def _read_folder(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    try:
        settings = json.loads((path / SETTINGS_FILE).read_text(encoding="utf-8"))
        state = load_file(str(path / WEIGHTS_FILE))
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint {path}: cannot be read ({_first_line(err)})") from err
    if not isinstance(settings, dict) or not isinstance(settings.get("remedi"), dict):
        raise CheckpointError(f"checkpoint {path}: {SETTINGS_FILE} has no 'remedi' entry")
    return {
        "remedi": settings["remedi"],
        "hyper_parameters": dict(settings.get("hyper_parameters") or {}),
        "editor_state": state,
    }


def normalised_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """``meta`` with the defaults of checkpoints written before MEND/KE existed (method
    ``remedi``, one ``layer`` instead of ``layers``)."""
    found = dict(meta)
    found.setdefault("method", "remedi")
    if "layers" not in found and "layer" in found:
        found["layers"] = [found["layer"]]
    return found


def meta_problem(meta: Mapping[str, Any], expected: Mapping[str, Any]) -> str | None:
    """Why a checkpoint's ``remedi`` entry does not fit ``expected`` (any of ``method``,
    ``model``, ``layers``, ``hidden_size``; a key left out or None is not checked), in words;
    None when it fits."""
    saved = normalised_meta(meta)
    method = expected.get("method")
    if method is not None and saved["method"] != method:
        return f"trained a {saved['method']!r} editor, but this run loads a {method!r} editor"
    keys = [k for k in ("model", "layers", "hidden_size") if expected.get(k) is not None]
    if any(saved.get(k) is not None and saved.get(k) != expected[k] for k in keys):
        if keys == ["model"]:
            return f"trained for model {saved.get('model')!r}, but this run uses model " + repr(
                expected["model"]
            )
        return (
            f"trained for model {saved.get('model')!r} layers {saved.get('layers')} "
            f"(hidden {saved.get('hidden_size')}), but this run uses model "
            f"{expected.get('model')!r} layers {expected.get('layers')} "
            f"(hidden {expected.get('hidden_size')})"
        )
    return None


def check_meta(checkpoint: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    """Raise a one-line :class:`CheckpointError` (``checkpoint: ...``) when ``checkpoint`` has
    no ``remedi`` entry or was trained for another method, model, layer set or width."""
    saved = checkpoint.get("remedi")
    if not isinstance(saved, Mapping):
        raise CheckpointError("checkpoint: not a remedi checkpoint (no 'remedi' entry)")
    problem = meta_problem(saved, expected)
    if problem:
        raise CheckpointError(f"checkpoint: {problem}")


def check(path: str | Path, method: str | None = None, model: str | None = None) -> None:
    """Read ``path`` and refuse it (one line naming it) when it is unreadable, not remedi's,
    or trained as another ``method`` or for another ``model``: the check every command makes
    before loading the model."""
    saved = read(path)
    problem = meta_problem(saved["remedi"], {"method": method, "model": model})
    if problem:
        raise CheckpointError(f"checkpoint {path}: {problem}")


def editor_state(checkpoint: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], bool]:
    """The editor's weights in ``checkpoint`` and whether they are the best-validation ones
    (``False``: the last weights, from a run that never validated)."""
    if "editor_state" in checkpoint:
        return dict(checkpoint["editor_state"]), True
    best = checkpoint.get("remedi_best")
    if best is not None:
        return dict(best["state_dict"]), True
    state = checkpoint.get("state_dict") or {}
    prefix = "editor."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, False


class TrainedCheckpoint:
    """What a learned editor's checkpoint holds for building its network: the ``remedi``
    metadata, the module's hyperparameters and the editor's weights (best-validation ones when
    the run validated)."""

    def __init__(self, path: Path, saved: Mapping[str, Any]) -> None:
        self.path = path
        self.meta = normalised_meta(saved["remedi"])
        self.hparams: dict[str, Any] = dict(saved.get("hyper_parameters") or {})
        self.state, self.best = editor_state(saved)

    @property
    def layers(self) -> list[int]:
        return [int(layer) for layer in self.meta.get("layers") or []]


def load_trained(path: str | Path, method: str, model: str, hidden_size: int) -> TrainedCheckpoint:
    """Read and check a ``method`` checkpoint for a model ``model`` of width ``hidden_size``;
    a :class:`CheckpointError` naming ``path`` when it does not fit."""
    saved = read(path)
    problem = meta_problem(
        saved["remedi"], {"method": method, "model": model, "hidden_size": hidden_size}
    )
    if problem:
        raise CheckpointError(f"checkpoint {path}: {problem}")
    return TrainedCheckpoint(Path(path), saved)


def export(checkpoint: str | Path, folder: str | Path) -> Path:
    """Write a trained editor's checkpoint as a shipped folder: its editor weights (the
    best-validation ones when the run validated) as ``editor.safetensors`` and its metadata and
    hyperparameters as ``settings.json``; no optimiser state, no LM. Written to a staged folder
    that replaces ``folder`` when complete. Loads wherever a checkpoint is taken."""
    from safetensors.torch import save_file

    from remedi.atomic import atomic_dir

    saved = read(checkpoint)
    state, _ = editor_state(saved)
    settings = {
        "remedi": normalised_meta(saved["remedi"]),
        "hyper_parameters": {
            k: v
            for k, v in (saved.get("hyper_parameters") or {}).items()
            if isinstance(v, (str, int, float, bool, list, type(None)))
        },
    }
    with atomic_dir(Path(folder)) as staged:
        save_file({k: v.contiguous() for k, v in state.items()}, str(staged / WEIGHTS_FILE))
        (staged / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n", "utf-8")
    return Path(folder)
