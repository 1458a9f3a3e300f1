"""Load a trained learned editor (REMEDI, MEND, KE) from its checkpoint for evaluation or editing,
outside Lightning's loops, with its best-validation weights in place."""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path

import torch

from lightning_modules.gradient_editor import KeModule, MendModule
from lightning_modules.learned_editor import (
    LearnedEditorModule,
    check_checkpoint_meta,
    register_model,
)
from lightning_modules.remedi_module import RemediModule
from remedi.models import LoadedModel

log = logging.getLogger(__name__)

_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")

LEARNED_METHODS: dict[str, type[LearnedEditorModule]] = {
    "remedi": RemediModule,
    "mend": MendModule,
    "ke": KeModule,
}


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
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if saved.get("remedi", {}).get("method", "remedi") != method:  # before building one
            check_checkpoint_meta(saved, {"method": method})
        module = cls.load_from_checkpoint(
            checkpoint, map_location="cpu", weights_only=True, model=lm.spec, model_dtype=dtype
        )
    except ValueError as err:  # another method, model or layer set: name the file
        raise ValueError(str(err).replace("checkpoint:", f"checkpoint {checkpoint}:", 1)) from err
    except (RuntimeError, KeyError, EOFError, AttributeError, pickle.UnpicklingError) as err:
        found = _GLOBAL.search(str(err))
        if isinstance(err, pickle.UnpicklingError) and found:
            raise ValueError(
                f"checkpoint {checkpoint}: refused: it pickles {found.group(1)}, not only tensors "
                "and plain data (remedi loads checkpoints with weights_only=True)"
            ) from err
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"checkpoint {checkpoint}: cannot be read as a {method} checkpoint ({first})"
        ) from err
    if not module.use_best_weights():
        log.warning(
            "%s: %s holds no best-validation weights; using its last weights", method, checkpoint
        )
    return module.to(lm.device).eval()
