"""``serac``: a trained SERAC editor (Mitchell et al. 2022). The model's weights never change:
requests go into a memory, and each scored prompt is routed by the trained scope classifier to
the counterfactual model (the LM with a LoRA adapter, reading the matched edit's statement) or
to the untouched LM (:mod:`remedi.editors.serac`). Trained by
``lightning_modules.serac_module.SeracModule``.

Under the independent schedule each case is routed against a memory of its own edit; under an
accumulating one (``--schedule sequential`` or ``batch:N``) the memory grows with every edit
and every scored prompt is routed against all of them, until the stream ends.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from remedi.checkpoints import TrainedCheckpoint
from remedi.data import EditCase
from remedi.editors.serac import (
    Memory,
    SeracEditor,
    build_editor,
    routed_edit,
    routed_generate,
)
from remedi.methods.requests import EditRequest
from remedi.metrics.rows import EditContext
from remedi.models import LoadedModel
from remedi.registry import Edited, TrainedMethod, as_cases, register


class SeracEdited(Edited):
    """The model under SERAC: scored rows and free-text generation routed against a memory."""

    def __init__(
        self, lm: LoadedModel, cases: Sequence[EditCase], editor: SeracEditor, memory: Memory
    ) -> None:
        super().__init__(lm, cases, routed_edit(lm, editor, memory, own_edit=True))
        self.editor, self.memory = editor, memory

    def generate(self, prompt: str, max_new_tokens: int = 20, **kwargs: Any) -> str:
        return routed_generate(self.lm, self.editor, self.memory, prompt, max_new_tokens, **kwargs)


@register
class Serac(TrainedMethod):
    """A trained SERAC editor."""

    name = "serac"
    order = 11
    summary = "trained SERAC memory editor: scope classifier + counterfactual LoRA (checkpoint)"
    lightning_module = "lightning_modules.serac_module:SeracModule"
    keeps_memory = True
    scores_free_text = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stream_memory: Memory | None = None

    def build(self, lm: LoadedModel, found: TrainedCheckpoint) -> SeracEditor:
        hparams = dict(found.hparams)
        hparams.setdefault("scope_layer", found.meta.get("scope_layer"))
        return build_editor(lm, hparams, found.layers)

    def memory(self, lm: LoadedModel, cases: Sequence[EditCase]) -> Memory:
        """A memory of ``cases``, keyed by the trained classifier."""
        self.bind(lm)
        editor: SeracEditor = self.loaded
        with torch.no_grad():
            return editor.memory(lm, cases, self.environment.batch_size)

    @contextmanager
    def edit(self, lm: LoadedModel, requests: Sequence[EditRequest | EditCase]) -> Iterator[Edited]:
        cases = as_cases(requests)
        yield SeracEdited(lm, cases, self.loaded, self.memory(lm, cases))

    # -- accumulating schedules ---------------------------------------------------------------
    def begin_stream(self, lm: LoadedModel) -> None:
        self.bind(lm)
        self.stream_memory = self.memory(lm, [])

    def remember(self, lm: LoadedModel, cases: Sequence[EditCase]) -> None:
        """Add ``cases`` to the stream's memory (their keys embedded once)."""
        if self.stream_memory is None:
            raise RuntimeError("serac: remember() outside a stream (call begin_stream first)")
        added = self.memory(lm, cases)
        self.stream_memory = Memory(
            self.stream_memory.cases + added.cases,
            torch.cat([self.stream_memory.keys.to(added.keys.device), added.keys]),
        )

    def stream_edit(self, lm: LoadedModel) -> EditContext | None:
        """The edit context that routes scored rows against the whole stream's memory."""
        if self.stream_memory is None or not len(self.stream_memory):
            return None
        return routed_edit(lm, self.loaded, self.stream_memory)

    def end_stream(self, lm: LoadedModel) -> None:
        self.stream_memory = None


def load_memory(folder: str | Path, lm: LoadedModel | None = None) -> tuple[LoadedModel, Serac]:
    """Reopen what ``python -m remedi.edit serac ... --output FOLDER`` saved: the model its
    edits are for (loaded from the spec it names unless ``lm`` is given) and a SERAC editor whose
    memory holds them. ``editor.stream_edit(lm)`` is the edit context to score under (e.g.
    ``remedi.metrics.evaluate_cases(lm.model, lm.tokenizer, cases, edit=...)``); the model's
    weights are the unedited ones."""
    from remedi.edit import MEMORY_EDITOR, MEMORY_FILE
    from remedi.methods.requests import parse_request
    from remedi.models import load_model

    folder = Path(folder)
    saved = json.loads((folder / MEMORY_FILE).read_text(encoding="utf-8"))
    if lm is None:
        lm = load_model(saved["model"])
    method = Serac(checkpoint=folder / MEMORY_EDITOR)
    method.begin_stream(lm)
    where = f"{folder / MEMORY_FILE} request"
    requests = [parse_request(r, f"{where} {i}") for i, r in enumerate(saved["requests"])]
    method.remember(lm, as_cases(requests))
    return lm, method
