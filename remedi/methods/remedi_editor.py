"""``remedi``: a trained REMEDI attribute editor (Hernandez et al. 2023). The edit lives in the
activations: each request's statement becomes a direction (the editor applied to the
statement's attribute states) added to the subject's last token at the editor's layer wherever
the subject is mentioned; the weights stay as they are. Trained by
``lightning_modules.remedi_module.RemediModule``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch

from remedi.checkpoints import TrainedCheckpoint
from remedi.data import EditCase
from remedi.editors.apply import (
    RemediSettings,
    apply_editor,
    attribute_states,
    metrics_context,
)
from remedi.editors.modules import Editor, build_editor
from remedi.metrics.generation import GenerationEdit
from remedi.models import LoadedModel
from remedi.registry import Edited, TrainedMethod, as_cases, register
from remedi.tokens import PromptBatch, encode_prompts, generate_continuations


class Directed(Edited):
    """The model with each request's direction added at its subject's last token."""

    def __init__(
        self,
        lm: LoadedModel,
        cases: Sequence[EditCase],
        layer: int,
        editor: Editor,
        attributes: torch.Tensor,
        alpha: float,
    ) -> None:
        super().__init__(lm, cases, metrics_context(lm, layer, editor, attributes, alpha))
        self.layer, self.editor, self.attributes, self.alpha = layer, editor, attributes, alpha

    def generation(self, index: int) -> tuple[str, GenerationEdit | None]:
        def apply(batch: PromptBatch) -> AbstractContextManager[object]:
            rows = self.attributes[index : index + 1].expand(batch.input_ids.shape[0], -1)
            return apply_editor(
                self.lm,
                self.layer,
                self.editor,
                rows,
                batch.subject_last,
                prompt_pass_only=True,
                alpha=self.alpha,
            )

        return "", apply

    @torch.no_grad()
    def generate(self, prompt: str, max_new_tokens: int = 20, **kwargs: Any) -> str:
        """The continuation with the first request whose subject ``prompt`` mentions applied
        (the prompt pass only); the unedited model's when it mentions none."""
        found = [i for i, case in enumerate(self.cases) if case.subject in prompt]
        if not found:
            return super().generate(prompt, max_new_tokens, **kwargs)
        index = found[0]
        batch = encode_prompts(
            self.lm.tokenizer, [prompt], [self.cases[index].subject], padding_side="left"
        ).to(self.lm.device)
        _, hook = self.generation(index)
        assert hook is not None
        with hook(batch):
            options: dict[str, object] = {"do_sample": False, **kwargs}
            return generate_continuations(
                self.lm.model, self.lm.tokenizer, batch, max_new_tokens, **options
            )[0]


@register
class Remedi(TrainedMethod):
    """A trained REMEDI editor; ``alpha`` scales its directions."""

    name = "remedi"
    order = 8
    summary = "trained REMEDI attribute editor (needs a checkpoint; --remedi.alpha)"
    Settings = RemediSettings
    lightning_module = "lightning_modules.remedi_module:RemediModule"
    edits_input = True
    edits_neighbors = False
    group_size = None

    def build(self, lm: LoadedModel, found: TrainedCheckpoint) -> Editor:
        kind = found.meta.get("editor") or found.hparams.get("editor") or "null"
        rank = int(found.hparams.get("rank", 64))
        width = found.hparams.get("mlp_width")
        return build_editor(str(kind), lm.arch.hidden_size, rank, width)

    @property
    def layer(self) -> int:
        """The block the loaded editor edits."""
        return int(self.layers[0])

    @contextmanager
    def edit(self, lm: LoadedModel, requests: Sequence[Any]) -> Iterator[Edited]:
        self.bind(lm)
        cases = as_cases(requests)
        with torch.no_grad():
            attributes = attribute_states(
                lm, self.layer, [c.edit_statement for c in cases], [c.subject for c in cases]
            )
        yield Directed(lm, cases, self.layer, self.loaded, attributes, self.settings.alpha)
