"""The LightningModule that trains SERAC (METHODS.md §10) against the frozen LM.

A training batch is a list of edit cases, which are also the memory the batch is routed
against. Two parts learn at once (:mod:`remedi.editors.serac`):

- the scope classifier's head, on each case's rewrite and paraphrase prompts (in its scope)
  against its neighbourhood prompts, plain and after the edit's statement (hard negatives), and
  every other case's prompts: ``scope``;
- the counterfactual model's LoRA adapter, to give ``target_new`` after the rewrite and
  paraphrase prompts read under the statement (``edit``) and to answer as the LM where the edit
  does not apply (``loc``: KL on ``loc_prompts`` neighbourhood prompts drawn each step, after
  the statement as CounterFact+ reads them, and ``unrelated_prompts`` other cases' prompts,
  each read by the counterfactual model under the statement).

``loss = c_scope · scope + c_edit · edit + c_loc · loc``. Validation and test score each case
with a memory of the batch's cases, each row allowed only its own case's edit (as an
evaluation under the independent schedule), so the classifier's misses count.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from lightning.pytorch.utilities.types import OptimizerLRScheduler

from lightning_modules.learned_editor import LearnedEditorModule
from remedi.data import EditCase
from remedi.editors.serac import (
    SeracEditor,
    build_editor,
    counterfactual_terms,
    default_scope_layer,
    locality_texts,
    routed_edit,
    scope_terms,
)
from remedi.metrics import EditContext
from remedi.metrics.counterfact import Scoring


class SeracModule(LearnedEditorModule):
    """Train a SERAC editor.

    Args:
        model: model spec for :func:`remedi.models.load_model`.
        model_dtype: dtype of the frozen LM; the editor stays fp32.
        layers: blocks whose MLP output projection carries the LoRA adapter (default: all).
        scope_layer: the block whose states the classifier reads (default: a third of the way).
        rank: LoRA rank.
        alpha: LoRA scaling numerator (the update is ``alpha / rank · B A``).
        width: the classifier's embedding width.
        c_scope, c_edit, c_loc: weights of the classifier's, the edit and the locality terms.
        loc_prompts: neighbourhood prompts per case in the locality term (drawn each step).
        unrelated_prompts: other cases' rewrite prompts per case in the locality term.
        lr: Adam learning rate of the adapter.
        lr_scope: Adam learning rate of the classifier's head.
        selection_margin: see :class:`~lightning_modules.learned_editor.LearnedEditorModule`.
        scoring: metric probabilities, "mean" (CounterFact) or "first".
        eval_batch_size: rows per forward pass when scoring the metrics.
    """

    method = "serac"
    train_unit = "cases"
    checkpoint_fixed: ClassVar[tuple[str, ...]] = (
        "model",
        "layers",
        "scope_layer",
        "rank",
        "width",
    )
    checkpoint_restored: ClassVar[tuple[str, ...]] = ("lr", "lr_scope")

    def __init__(
        self,
        model: str = "gemma3-270m",
        model_dtype: str = "float32",
        layers: list[int] | None = None,
        scope_layer: int | None = None,
        rank: int = 8,
        alpha: float = 16.0,
        width: int = 256,
        c_scope: float = 1.0,
        c_edit: float = 1.0,
        c_loc: float = 1.0,
        loc_prompts: int = 2,
        unrelated_prompts: int = 1,
        lr: float = 1e-4,
        lr_scope: float = 1e-3,
        selection_margin: float = 0.05,
        scoring: Scoring = "mean",
        eval_batch_size: int = 32,
    ) -> None:
        super().__init__(model, model_dtype, scoring, eval_batch_size, selection_margin)
        self.save_hyperparameters()
        arch = self._lm.arch
        chosen = list(range(arch.num_layers)) if layers is None else list(layers)
        self.layers = [arch.check_layer(layer) for layer in chosen]
        self.scope_layer = arch.check_layer(
            default_scope_layer(self._lm) if scope_layer is None else scope_layer
        )
        for name, value in (("c_scope", c_scope), ("c_edit", c_edit), ("c_loc", c_loc)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        for name, count in (("loc_prompts", loc_prompts), ("unrelated_prompts", unrelated_prompts)):
            if count < 0:
                raise ValueError(f"{name} must be >= 0, got {count}")
        self.c_scope, self.c_edit, self.c_loc = c_scope, c_edit, c_loc
        self.loc_prompts, self.unrelated_prompts = loc_prompts, unrelated_prompts
        self.lr, self.lr_scope = lr, lr_scope
        self.editor = build_editor(
            self._lm,
            {"scope_layer": self.scope_layer, "rank": rank, "alpha": alpha, "width": width},
            self.layers,
        )

    editor: SeracEditor

    @property
    def edit_layers(self) -> list[int]:
        return list(self.layers)

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"scope_layer": self.scope_layer}

    def loss_terms(self, cases: list[EditCase], draw: str | None) -> dict[str, torch.Tensor]:
        """Every loss term of ``cases`` (see the module docstring); ``draw`` seeds which
        neighbourhood prompts the locality term reads (the first ones when ``None``)."""
        terms = scope_terms(self._lm, self.editor, cases)
        locality = locality_texts(cases, self.loc_prompts, self.unrelated_prompts, draw)
        terms.update(counterfactual_terms(self._lm, self.editor, cases, locality))
        terms["loss"] = (
            self.c_scope * terms["scope"] + self.c_edit * terms["edit"] + self.c_loc * terms["loc"]
        )
        return terms

    def training_terms(self, batch: list[EditCase]) -> dict[str, torch.Tensor]:
        return self.loss_terms(batch, draw=f"{self.current_epoch}:{self.global_step}")

    def eval_terms(self, batch: Any) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return self.loss_terms(batch.cases, None)

    def case_edit(self, cases: list[EditCase]) -> EditContext:
        with torch.no_grad():
            memory = self.editor.memory(self._lm, cases, self.eval_batch_size)
        return routed_edit(self._lm, self.editor, memory, own_edit=True)

    def configure_optimizers(self) -> OptimizerLRScheduler:
        adapter = [*self.editor.lora_A.parameters(), *self.editor.lora_B.parameters()]
        return torch.optim.Adam(
            [
                {"params": adapter, "lr": self.lr, "name": "adapter"},
                {
                    "params": list(self.editor.scope.parameters()),
                    "lr": self.lr_scope,
                    "name": "scope",
                },
            ]
        )
