"""Load a trained editor's LightningModule (the registered trained methods') from its checkpoint,
outside Lightning's loops, with its best-validation weights in place. Commands reach trained
editors through :mod:`remedi.registry` instead, which needs no Lightning."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from lightning_modules.learned_editor import LearnedEditorModule, register_model
from remedi import checkpoints, registry
from remedi.models import LoadedModel

log = logging.getLogger(__name__)


def module_class(method: str) -> type[LearnedEditorModule]:
    """The LightningModule that trains the registered trained ``method``."""
    path = registry.method_class(method).lightning_module
    if path is None:
        trained = ", ".join(registry.trained_names())
        raise ValueError(f"method {method!r} is not a learned editor ({trained})")
    module, _, name = path.partition(":")
    found: type[LearnedEditorModule] = getattr(importlib.import_module(module), name)
    return found


LEARNED_METHODS: dict[str, type[LearnedEditorModule]] = {
    name: module_class(name) for name in registry.trained_names()
}
"""Each registered trained method's LightningModule (from :mod:`remedi.registry`)."""


def load_trained(
    method: str, checkpoint: str | Path, lm: LoadedModel, dtype: str = "float32"
) -> LearnedEditorModule:
    """The ``method`` module saved in ``checkpoint``, bound to ``lm``, in eval mode on the LM's
    device, with the best-validation editor in place (logged). A checkpoint of another method,
    model or layer set, or an unreadable file, raises a one-line ``ValueError``.

    Checkpoints load with ``weights_only=True``: one that pickles any object beyond tensors and
    plain data is refused before anything in it runs."""
    if method not in LEARNED_METHODS:
        raise ValueError(
            f"method {method!r} is not a learned editor ({', '.join(LEARNED_METHODS)})"
        )
    register_model(lm, dtype)
    cls = LEARNED_METHODS[method]
    try:
        checkpoints.check(checkpoint, method=method)
        module = cls.load_from_checkpoint(
            checkpoint, map_location="cpu", weights_only=True, model=lm.spec, model_dtype=dtype
        )
    except ValueError as err:  # another method, model or layer set: name the file
        raise ValueError(str(err).replace("checkpoint:", f"checkpoint {checkpoint}:", 1)) from err
    except (RuntimeError, KeyError, EOFError, AttributeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"checkpoint {checkpoint}: cannot be read as a {method} checkpoint ({first})"
        ) from err
    if not module.use_best_weights():
        log.warning(
            "%s: %s holds no best-validation weights; using its last weights", method, checkpoint
        )
    return module.to(lm.device).eval()
