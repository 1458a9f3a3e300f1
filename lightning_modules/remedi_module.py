"""The REMEDI LightningModule: one trainable editor at one layer of a frozen LM.

What every learned editor shares (the frozen LM, metrics, checkpoint metadata, best weights,
logging) lives in :class:`~lightning_modules.learned_editor.LearnedEditorModule`; this adds the
REMEDI editor, its attribute cache, loss and prediction. Callbacks can use ``module.lm`` and
``trainer.datamodule.val_cases`` (run the Trainer with ``inference_mode=False`` if they need
gradients in validation).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from lightning_modules.learned_editor import LearnedEditorModule
from remedi.atomic import write_jsonl
from remedi.data import EditCase
from remedi.editors import (
    Editor,
    EditorKind,
    LossWeights,
    RemediExample,
    TargetTokens,
    attribute_states,
    build_editor,
    generate_edited,
    metrics_context,
    remedi_loss,
)
from remedi.metrics import EditContext, ScoredRow, row_probabilities
from remedi.metrics.counterfact import Scoring

log = logging.getLogger(__name__)


def case_context(case: EditCase) -> tuple[str, str]:
    """``(entity, context)`` whose attribute the editor turns into a direction for ``case``."""
    return case.subject, case.edit_statement


class RemediModule(LearnedEditorModule):
    """Train a REMEDI editor (METHODS.md §1).

    Args:
        model: model spec for :func:`remedi.models.load_model` (default model, path or hub id).
        model_dtype: dtype of the frozen LM (float32, bfloat16, float16); the editor stays fp32.
        layer: block whose output is edited at the entity's last token (0-indexed).
        editor: affine, low_rank, biaffine, mlp, identity or null (a YAML null, which is what
            ``--model.editor null`` parses to under the subclass-mode CLI, means null too).
        rank: rank of the low_rank editor.
        mlp_width: hidden width of the mlp editor (default: the model's hidden size).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        lambda_m: weight of -log p(target_new).
        lambda_u: weight of -log(1 - p(target_true)).
        lambda_kl: weight of the KL term on the positions between entity and last prompt token.
        lambda_norm: weight of the mean direction norm.
        lambda_essence: weight of the KL on "{entity} is a".
        target_tokens: train on the first target token (REMEDI) or on all of them.
        selection_margin: the kept epoch has the best validation efficacy among those whose
            neighbourhood score is at least the unedited model's minus this.
        scoring: metric probabilities, "mean" (CounterFact) or "first" (REMEDI's reference).
        eval_batch_size: rows per forward pass when scoring the metrics.
    """

    method = "remedi"
    checkpoint_fixed = ("model", "layer", "editor", "rank", "mlp_width")
    checkpoint_restored = ("lr", "weight_decay")

    def __init__(
        self,
        model: str = "gemma3-270m",
        model_dtype: str = "float32",
        layer: int = 1,
        editor: EditorKind | None = "affine",
        rank: int = 64,
        mlp_width: int | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        lambda_m: float = 1.0,
        lambda_u: float = 1.0,
        lambda_kl: float = 10.0,
        lambda_norm: float = 0.0,
        lambda_essence: float = 0.0,
        target_tokens: TargetTokens = "first",
        selection_margin: float = 0.05,
        scoring: Scoring = "mean",
        eval_batch_size: int = 32,
    ) -> None:
        super().__init__(model, model_dtype, scoring, eval_batch_size, selection_margin)
        self.save_hyperparameters()
        if target_tokens not in ("first", "all"):
            raise ValueError(f"target_tokens {target_tokens!r} must be 'first' or 'all'")
        self.layer = self._lm.arch.check_layer(layer)
        self.editor_kind: EditorKind = "null" if editor is None else editor
        self.editor: Editor = build_editor(
            self.editor_kind, self._lm.arch.hidden_size, rank, mlp_width
        )
        self.weights = LossWeights(lambda_m, lambda_u, lambda_kl, lambda_norm, lambda_essence)
        self._attribute_cache: dict[tuple[str, str], torch.Tensor] = {}

    def on_fit_start(self) -> None:
        """Compute every attribute representation once, in a fixed order (batching pads, so
        the order matters to the last bit; a resumed run then sees the same numbers)."""
        data = getattr(self.trainer, "datamodule", None)
        pairs = [(e.entity, e.context) for e in getattr(data, "train_examples", [])]
        pairs += [(e.entity, e.context) for e in getattr(data, "val_examples", [])]
        pairs += [case_context(c) for c in getattr(data, "val_cases", [])]
        if pairs:
            self.attributes(pairs)

    def attributes(self, pairs: list[tuple[str, str]]) -> torch.Tensor:
        """Attribute representations for ``(entity, context)`` pairs, cached (the LM is frozen)."""
        missing = list(dict.fromkeys(p for p in pairs if p not in self._attribute_cache))
        if missing:
            states = attribute_states(
                self._lm, self.layer, [c for _, c in missing], [e for e, _ in missing]
            )
            for pair, state in zip(missing, states, strict=True):
                self._attribute_cache[pair] = state
        return torch.stack([self._attribute_cache[p] for p in pairs]).to(self._lm.device)

    def loss_terms(self, examples: list[RemediExample]) -> dict[str, torch.Tensor]:
        attribute = self.attributes([(e.entity, e.context) for e in examples])
        return remedi_loss(
            self._lm,
            self.layer,
            self.editor,
            examples,
            attribute,
            self.weights,
            self.hparams["target_tokens"],
        )

    @property
    def edit_layers(self) -> list[int]:
        return [self.layer]

    def training_terms(self, batch: list[RemediExample]) -> dict[str, torch.Tensor]:
        return self.loss_terms(batch)

    def eval_terms(self, batch: Any) -> dict[str, torch.Tensor]:
        return self.loss_terms(batch.examples)

    def case_edit(self, cases: list[EditCase]) -> EditContext:
        attribute = self.attributes([case_context(c) for c in cases])
        return metrics_context(self._lm, self.layer, self.editor, attribute)

    def predict_step(self, batch: list[dict[str, str]], batch_idx: int) -> list[dict[str, Any]]:
        """Generate from each request's prompt with its entity edited, and report the target's
        probability (edited and unedited) when the request names one. The datamodule's
        ``predict_output`` (default ``<run dir>/predictions.jsonl``) receives the JSONL."""
        entities = [r["entity"] for r in batch]
        contexts = [
            r["attribute"] if r["entity"] in r["attribute"] else f"{r['entity']} {r['attribute']}"
            for r in batch
        ]
        prompts = [r["prompt"] for r in batch]
        texts = generate_edited(
            self._lm,
            self.layer,
            self.editor,
            prompts,
            entities,
            contexts,
            max_new_tokens=int(getattr(self._datamodule(), "max_new_tokens", 20)),
        )
        out: list[dict[str, Any]] = [
            {**r, "generation": t} for r, t in zip(batch, texts, strict=True)
        ]
        scored = [i for i, r in enumerate(batch) if r.get("target")]
        if scored:
            rows = [
                ScoredRow(k, "rewrite", prompts[i], entities[i], batch[i]["target"])
                for k, i in enumerate(scored)
            ]
            attribute = attribute_states(
                self._lm, self.layer, [contexts[i] for i in scored], [entities[i] for i in scored]
            )
            edit = metrics_context(self._lm, self.layer, self.editor, attribute)
            tok, scoring = self._lm.tokenizer, self.hparams["scoring"]
            edited = row_probabilities(self._lm.model, tok, rows, edit, scoring=scoring)
            plain = row_probabilities(self._lm.model, tok, rows, None, scoring=scoring)
            for k, i in enumerate(scored):
                out[i]["target_probability"] = float(edited[k])
                out[i]["target_probability_unedited"] = float(plain[k])
        return out

    def on_predict_epoch_start(self) -> None:
        self._predictions: list[dict[str, Any]] = []

    def on_predict_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dl: int = 0) -> None:
        self._predictions.extend(outputs)

    def on_predict_epoch_end(self) -> None:
        gathered = self.all_gather_objects(self._predictions)
        run_dir = self.trainer.log_dir or self.trainer.default_root_dir  # a collective: all ranks
        if not self.trainer.is_global_zero:
            return
        target = getattr(self._datamodule(), "predict_output", None) or str(
            Path(run_dir) / "predictions.jsonl"
        )
        write_jsonl(Path(target), gathered)
        log.info("wrote %d predictions to %s", len(gathered), target)

    def _datamodule(self) -> Any:
        return getattr(self.trainer, "datamodule", None)

    def all_gather_objects(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Every process's items, in rank order (just ``items`` in one process)."""
        if self.trainer.world_size == 1:
            return items
        parts: list[list[dict[str, Any]]] = [[] for _ in range(self.trainer.world_size)]
        torch.distributed.all_gather_object(parts, items)
        return [item for part in parts for item in part]

    def configure_optimizers(self) -> Any:
        params = [p for p in self.editor.parameters() if p.requires_grad]
        if not params:
            return None
        return torch.optim.AdamW(
            params, lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"]
        )

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"editor": self.editor_kind}
