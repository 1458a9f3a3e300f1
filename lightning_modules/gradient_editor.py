"""LightningModules for the meta-learned gradient editors MEND and KE (METHODS.md §2).

A training batch is a list of edit cases. Each case's gradient of the edit loss (its rewrite
prompt → ``target_new``) is turned by the editor into its own update of the edited MLP output
projections, applied through hooks (:func:`remedi.editors.gradient.apply_updates`), so the frozen
LM's stored weights never change. Under those updates:

- ``edit`` = mean NLL of ``target_new`` after the rewrite and paraphrase prompts;
- ``loc`` = KL(pre ‖ post) on neighbourhood prompts (``loc_prompts`` a case, drawn each step
  from the case's own) and other cases' rewrite prompts (``unrelated_prompts``), with their
  true answers, at every position or at the answer's tokens (``loc_positions``), summed over
  positions and averaged over prompts (:mod:`remedi.editors.locality`; the unedited side is
  cached per text, the LM being frozen);
- ``loss = c_edit · edit + c_loc · loc``, or, with ``loc_margin`` (KE's constraint,
  De Cao et al. 2021), ``c_edit · edit + λ (loc − loc_margin)`` with a Lagrange multiplier
  ``λ = softplus(ρ) ≥ 0`` (starting at ``c_loc``) that gradient *ascent* on ``ρ`` raises while
  the constraint ``loc ≤ loc_margin`` is broken and lowers while it holds.

Networks and step sizes are separate Adam parameter groups; gradients are clipped by norm.
Validation and test score each case under its own update, as an evaluation applies it.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, ClassVar

import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.types import OptimizerLRScheduler

from lightning_modules.learned_editor import LearnedEditorModule
from remedi.data import EditCase
from remedi.editors.gradient import GradientEditor, LayerUpdate, Positions, apply_updates
from remedi.editors.ke import KeEditor
from remedi.editors.locality import (
    LocalityPositions,
    UneditedStates,
    locality_kl,
    locality_rows,
    training_texts,
)
from remedi.editors.mend import MendEditor
from remedi.metrics import EditContext, ScoredRow
from remedi.metrics.counterfact import Scoring
from remedi.models import LoadedModel
from remedi.tokens import ContinuationBatch, encode_continuations, score_continuations


def default_layers(lm: LoadedModel) -> list[int]:
    """MEND's choice: the last three blocks."""
    n = lm.arch.num_layers
    return list(range(max(0, n - 3), n))


def edit_rows(cases: list[EditCase]) -> tuple[list[str], list[str], list[int]]:
    """``(prompts, targets, groups)`` of the edit loss: each case's rewrite and paraphrase
    prompts with its ``target_new``."""
    prompts, targets, groups = [], [], []
    for i, case in enumerate(cases):
        for prompt in [case.rewrite_prompt, *case.paraphrase_prompts]:
            prompts.append(prompt)
            targets.append(str(case.target_new))
            groups.append(i)
    return prompts, targets, groups


class GradientEditorModule(LearnedEditorModule):
    """Shared training of MEND and KE; subclasses build the editor network.

    Args:
        model: model spec for :func:`remedi.models.load_model`.
        model_dtype: dtype of the frozen LM; the networks stay fp32.
        layers: edited blocks (default: the last three, as MEND).
        c_edit: weight of the edit loss.
        c_loc: weight of the locality KL (the multiplier's start under ``loc_margin``).
        loc_margin: when set, the locality term is a constraint ``loc ≤ loc_margin`` handled
            by a Lagrange multiplier (see the module docstring) instead of a fixed weight.
        lr_multiplier: Adam learning rate of the multiplier's ascent.
        lr: Adam learning rate of the networks.
        lr_step: Adam learning rate of the step sizes.
        grad_clip: gradient-norm clipping (0: none; the Trainer's gradient_clip_val wins).
        loc_prompts: neighbourhood prompts per case in the locality loss (drawn each step).
        unrelated_prompts: other cases' rewrite prompts per case in the locality loss.
        loc_positions: where the locality KL is taken: ``"all"`` positions or the ``"answer"``.
        positions: which prompt tokens feed the editor (``"all"``, ``"subject"``,
            ``"subject_last"``; :data:`remedi.editors.gradient.POSITIONS`).
        selection_margin: the kept epoch has the best validation efficacy among those whose
            neighbourhood score is at least the unedited model's minus this.
        scoring: metric probabilities, "mean" (CounterFact) or "first".
        eval_batch_size: rows per forward pass when scoring the metrics.
    """

    train_unit = "cases"
    checkpoint_fixed: ClassVar[tuple[str, ...]] = ("model", "layers", "positions")
    checkpoint_restored: ClassVar[tuple[str, ...]] = ("lr", "lr_step", "init_step")

    def __init__(
        self,
        model: str = "gemma3-270m",
        model_dtype: str = "float32",
        layers: list[int] | None = None,
        c_edit: float = 0.1,
        c_loc: float = 1.0,
        loc_margin: float | None = None,
        lr_multiplier: float = 1e-2,
        lr: float = 1e-4,
        lr_step: float = 1e-4,
        grad_clip: float = 100.0,
        loc_prompts: int = 1,
        unrelated_prompts: int = 1,
        loc_positions: LocalityPositions = "all",
        positions: Positions = "all",
        selection_margin: float = 0.05,
        scoring: Scoring = "mean",
        eval_batch_size: int = 32,
    ) -> None:
        super().__init__(model, model_dtype, scoring, eval_batch_size, selection_margin)
        self.save_hyperparameters()  # a subclass's own arguments too
        chosen = default_layers(self._lm) if layers is None else list(layers)
        self.layers = [self._lm.arch.check_layer(layer) for layer in chosen]
        for name, value in (("c_edit", c_edit), ("c_loc", c_loc), ("grad_clip", grad_clip)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        for name, count in (("loc_prompts", loc_prompts), ("unrelated_prompts", unrelated_prompts)):
            if count < 0:
                raise ValueError(f"{name} must be >= 0, got {count}")
        if loc_positions not in ("answer", "all"):
            raise ValueError(f"loc_positions {loc_positions!r} must be 'answer' or 'all'")
        self.c_edit, self.c_loc = c_edit, c_loc
        if loc_margin is not None and loc_margin < 0:
            raise ValueError(f"loc_margin must be >= 0, got {loc_margin}")
        self.loc_margin, self.lr_multiplier = loc_margin, lr_multiplier
        self.multiplier: torch.nn.Parameter | None = None
        if loc_margin is not None:
            start = torch.tensor(max(c_loc, 1e-4)).expm1().log()  # softplus⁻¹(c_loc)
            self.multiplier = torch.nn.Parameter(start)
            self.multiplier.register_hook(torch.neg)  # ascent: the optimiser descends on -grad
        self.lr, self.lr_step, self.grad_clip = lr, lr_step, grad_clip
        self.loc_prompts, self.unrelated_prompts = loc_prompts, unrelated_prompts
        self.loc_positions: LocalityPositions = loc_positions
        self.positions: Positions = positions
        self.unedited = UneditedStates()
        self._eval_cache: tuple[list[EditCase], list[LayerUpdate]] | None = None

    editor: GradientEditor

    @property
    def edit_layers(self) -> list[int]:
        return list(self.layers)

    @property
    def projection_shape(self) -> tuple[int, int]:
        """``(in, out)`` widths of the edited MLP output projections."""
        return self._lm.arch.mlp_out_shape(self.layers[0])

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"projection_shape": list(self.projection_shape)}

    def loss_terms(
        self,
        cases: list[EditCase],
        updates: list[LayerUpdate] | None = None,
        draw: str | None = None,
    ) -> dict[str, torch.Tensor]:
        """Loss terms of ``cases`` under their updates (computed here unless given); ``draw``
        seeds which neighbourhood prompts of each case the locality term uses (the first
        ``loc_prompts`` when ``None``)."""
        lm = self._lm
        if updates is None:
            updates = self.editor.updates(lm, cases)
        prompts, targets, groups = edit_rows(cases)
        batch = encode_continuations(lm.tokenizer, prompts, targets).to(lm.device)
        with apply_updates(lm, updates, groups):
            scores = score_continuations(lm.model, batch)
        terms = {"edit": -scores.mean.mean(), "edit_prob": scores.mean_prob.mean().detach()}
        prompts, answers, groups = locality_rows(
            cases, self.loc_prompts, self.unrelated_prompts, draw
        )
        if prompts:
            terms["loc"] = locality_kl(
                lm, updates, prompts, answers, groups, self.loc_positions, self.unedited
            )
        else:
            terms["loc"] = torch.zeros((), device=lm.device)
        if self.multiplier is None:
            terms["loss"] = self.c_edit * terms["edit"] + self.c_loc * terms["loc"]
        else:
            weight = torch.nn.functional.softplus(self.multiplier)
            assert self.loc_margin is not None
            terms["multiplier"] = weight.detach()
            terms["loss"] = self.c_edit * terms["edit"] + weight * (terms["loc"] - self.loc_margin)
        return terms

    def on_fit_start(self) -> None:
        """Compute the unedited LM's states on every locality text of the training split."""
        cases = list(getattr(getattr(self.trainer, "datamodule", None), "train_cases", []))
        texts = training_texts(cases)
        big = len(texts) > 1000  # worth a progress bar and a copy in the disk cache
        read = self.unedited.fill(self._lm, texts, self.eval_batch_size, big, cache=big)
        if texts:
            rank_zero_info(
                f"{self.method}: unedited states of {len(texts)} locality texts "
                f"{'read from the cache' if read else 'computed'} "
                f"({self.unedited.nbytes / 2**20:.0f} MiB)"
            )

    def training_terms(self, batch: list[EditCase]) -> dict[str, torch.Tensor]:
        return self.loss_terms(batch, draw=f"{self.current_epoch}:{self.global_step}")

    def eval_terms(self, batch: Any) -> dict[str, torch.Tensor]:
        return self.loss_terms(batch.cases, self._eval_updates(batch.cases))

    def _eval_updates(self, cases: list[EditCase]) -> list[LayerUpdate]:
        """The cases' updates without gradients, computed once per validation/test batch (the
        loss terms and the metrics of one batch share them: one LM pass, not two)."""
        cached = self._eval_cache
        if cached is None or cached[0] is not cases:
            with torch.no_grad():
                cached = (cases, self.editor.updates(self._lm, cases))
            self._eval_cache = cached
        return cached[1]

    def on_validation_epoch_end(self) -> None:
        self._eval_cache = None
        super().on_validation_epoch_end()

    def on_test_epoch_end(self) -> None:
        self._eval_cache = None
        super().on_test_epoch_end()

    def case_edit(self, cases: list[EditCase]) -> EditContext:
        updates = self._eval_updates(cases)

        def context(
            _batch: ContinuationBatch, rows: Sequence[ScoredRow]
        ) -> AbstractContextManager[None]:
            return apply_updates(self._lm, updates, [row.case_index for row in rows])

        return context

    def configure_optimizers(self) -> OptimizerLRScheduler:
        steps = {id(p) for p in self.editor.step_parameters()}
        networks = [p for p in self.editor.parameters() if id(p) not in steps]
        groups = [
            {"params": networks, "lr": self.lr, "name": "networks"},
            {"params": self.editor.step_parameters(), "lr": self.lr_step, "name": "steps"},
        ]
        if self.multiplier is not None:
            groups.append(
                {"params": [self.multiplier], "lr": self.lr_multiplier, "name": "multiplier"}
            )
        return torch.optim.Adam(groups)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        clip = gradient_clip_val if gradient_clip_val is not None else self.grad_clip
        if clip:
            self.clip_gradients(
                optimizer,
                gradient_clip_val=clip,
                gradient_clip_algorithm=gradient_clip_algorithm or "norm",
            )


class MendModule(GradientEditorModule):
    """Train a MEND editor (Mitchell et al. 2021) on the MLP output projections of ``layers``;
    the other arguments are :class:`GradientEditorModule`'s.

    Args:
        rank: rank of the gradient network's two low-rank blocks.
        init_step: initial per-layer step size α.
    """

    method = "mend"
    checkpoint_fixed = (*GradientEditorModule.checkpoint_fixed, "rank")

    def __init__(self, rank: int = 256, init_step: float = 1e-4, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        n_in, n_out = self.projection_shape
        self.editor = MendEditor(
            self.layers, n_in, n_out, rank=rank, init_step=init_step, positions=self.positions
        )


class KeModule(GradientEditorModule):
    """Train a KnowledgeEditor (De Cao et al. 2021) on the MLP output projections of ``layers``;
    the other arguments are :class:`GradientEditorModule`'s.

    Args:
        hidden: width of the request encoder's LSTM (each direction).
        init_step: initial per-layer step size α.
    """

    method = "ke"
    checkpoint_fixed = (*GradientEditorModule.checkpoint_fixed, "hidden")

    def __init__(self, hidden: int = 128, init_step: float = 1e-4, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        n_in, n_out = self.projection_shape
        embed_dim = self._lm.arch.hidden_size  # the input embeddings' width
        self.editor = KeEditor(
            self.layers,
            n_in,
            n_out,
            embed_dim,
            hidden=hidden,
            init_step=init_step,
            positions=self.positions,
        )
