"""The REMEDI LightningModule: one trainable editor at one layer of a frozen LM.

The LM is loaded once per process (through :func:`remedi.models.load_model`) and held as a plain
attribute, so it is neither in the optimizer nor in ``state_dict``: a checkpoint holds the editor
weights, optimizer and loop state only, plus the model spec, layer and hidden size, which are
checked when a checkpoint is loaded. Callbacks can use ``module.lm`` and
``trainer.datamodule.val_cases`` (run the Trainer with ``inference_mode=False`` if they need
gradients in validation).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, cast

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric, SumMetric

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
from remedi.metrics import (
    METRIC_NAMES,
    ScoredRow,
    evaluate_cases,
    harmonic_mean,
    row_probabilities,
)
from remedi.metrics.counterfact import SCORE_NAMES, Scoring
from remedi.models import LoadedModel, load_model

log = logging.getLogger(__name__)

_MODELS: dict[tuple[str, str], LoadedModel] = {}
LOSS_TERMS = ("loss", "mediated", "unmediated", "kl", "norm", "essence")


def register_model(lm: LoadedModel, dtype: str = "float32") -> None:
    """Make ``lm`` the model that ``RemediModule(model=lm.spec, model_dtype=dtype)`` uses
    (tests and notebooks that already hold a model)."""
    _MODELS[(lm.spec, dtype)] = lm


def shared_model(spec: str, dtype: str = "float32") -> LoadedModel:
    """The process-wide frozen LM for ``(spec, dtype)``, loaded on first use."""
    key = (spec, dtype)
    if key not in _MODELS:
        _MODELS[key] = load_model(spec, dtype=dtype)
    return _MODELS[key]


def case_context(case: EditCase) -> tuple[str, str]:
    """``(entity, context)`` whose attribute the editor turns into a direction for ``case``."""
    return case.subject, f"{case.rewrite_prompt} {str(case.target_new).strip()}"


class RemediModule(L.LightningModule):
    """Train a REMEDI editor (METHODS.md §1).

    Args:
        model: model spec for :func:`remedi.models.load_model` (default model, path or hub id).
        model_dtype: dtype of the frozen LM (float32, bfloat16, float16); the editor stays fp32.
        layer: block whose output is edited at the entity's last token (0-indexed).
        editor: affine, low_rank, biaffine, mlp, identity or null.
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
        scoring: metric probabilities, "mean" (CounterFact) or "first" (REMEDI's reference).
        eval_batch_size: rows per forward pass when scoring the metrics.
    """

    def __init__(
        self,
        model: str = "gemma3-270m",
        model_dtype: str = "float32",
        layer: int = 1,
        editor: EditorKind = "affine",
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
        scoring: Scoring = "mean",
        eval_batch_size: int = 32,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if target_tokens not in ("first", "all"):
            raise ValueError(f"target_tokens {target_tokens!r} must be 'first' or 'all'")
        if scoring not in ("mean", "first"):
            raise ValueError(f"scoring {scoring!r} must be 'mean' or 'first'")
        self._lm = shared_model(model, model_dtype)
        self.layer = self._lm.arch.check_layer(layer)
        self.editor: Editor = build_editor(editor, self._lm.arch.hidden_size, rank, mlp_width)
        self.weights = LossWeights(lambda_m, lambda_u, lambda_kl, lambda_norm, lambda_essence)
        self.val_metrics = self._make_metrics()
        self.test_metrics = self._make_metrics()
        self._attribute_cache: dict[tuple[str, str], torch.Tensor] = {}
        self.best_val_loss = float("inf")
        self.best_editor_state: dict[str, torch.Tensor] | None = None

    @property
    def lm(self) -> LoadedModel:
        """The frozen LM (not a registered submodule: never trained, never checkpointed)."""
        return self._lm

    @property
    def val_cases(self) -> list[EditCase]:
        """The validation cases of the attached datamodule (what evaluation callbacks score)."""
        return list(getattr(getattr(self.trainer, "datamodule", None), "val_cases", []))

    def setup(self, stage: str) -> None:
        device = self.trainer.strategy.root_device
        if self._lm.device != device:
            self._lm.model.to(device)  # type: ignore[arg-type]

    def on_fit_start(self) -> None:
        """Compute every attribute representation once, in a fixed order (batching pads, so
        the order matters to the last bit; a resumed run then sees the same numbers)."""
        data = getattr(self.trainer, "datamodule", None)
        pairs = [(e.entity, e.context) for e in getattr(data, "train_examples", [])]
        pairs += [(e.entity, e.context) for e in getattr(data, "val_examples", [])]
        pairs += [case_context(c) for c in getattr(data, "val_cases", [])]
        if pairs:
            self.attributes(pairs)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, idx: int) -> Any:
        return batch  # strings only; tensors are built on the LM's device

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

    def training_step(self, batch: list[RemediExample], batch_idx: int) -> torch.Tensor | None:
        terms = self.loss_terms(batch)
        for name, value in terms.items():
            self.log(
                f"train/{name}", value.detach(), batch_size=len(batch), prog_bar=name == "loss"
            )
        if not terms["loss"].requires_grad:
            return None  # parameterless editor (identity, null): nothing to train
        return terms["loss"]

    def _eval_step(self, batch: Any, stage: str) -> None:
        metrics = cast(dict[str, Any], dict(self._stage_metrics(stage).items()))
        terms = self.loss_terms(batch.examples)
        metrics["loss"].update(terms["loss"].detach(), weight=len(batch.examples))
        for name, value in terms.items():
            if name != "loss":
                self.log(f"{stage}/{name}", value, batch_size=len(batch.examples), sync_dist=True)
        self.log(f"{stage}/loss", metrics["loss"], prog_bar=True)
        if not batch.cases:
            return  # example-only datasets (Bias in Bios, McRae): the loss terms only
        metrics["n_cases"].update(torch.tensor(float(len(batch.cases))))
        self.log(f"{stage}/n_cases", metrics["n_cases"])
        attribute = self.attributes([case_context(c) for c in batch.cases])
        edit = metrics_context(self._lm, self.layer, self.editor, attribute)
        _, per_case = evaluate_cases(
            self._lm.model,
            self._lm.tokenizer,
            batch.cases,
            edit=edit,
            batch_size=self.hparams["eval_batch_size"],
            scoring=self.hparams["scoring"],
        )
        for name in METRIC_NAMES[:-1]:
            values = [m[name] for m in per_case if name in m]
            if values:
                metrics[name].update(torch.tensor(values, dtype=torch.float32))
                self.log(f"{stage}/{name}", metrics[name], prog_bar=name == "efficacy_score")

    @staticmethod
    def _make_metrics() -> nn.ModuleDict:
        means = {n: MeanMetric() for n in (*METRIC_NAMES[:-1], "loss")}
        return nn.ModuleDict({**means, "n_cases": SumMetric()})

    def _stage_metrics(self, stage: str) -> nn.ModuleDict:
        return self.val_metrics if stage == "val" else self.test_metrics

    def _log_score(self, stage: str) -> dict[str, float]:
        metrics = cast(dict[str, Any], dict(self._stage_metrics(stage).items()))
        if metrics["n_cases"].update_count:
            scores = [float(metrics[n].compute()) for n in SCORE_NAMES]
            self.log(f"{stage}/score", harmonic_mean(scores))
        return {"loss": float(metrics["loss"].compute())}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        loss = self._log_score("val")["loss"]
        if not self.trainer.sanity_checking and loss < self.best_val_loss:
            self.best_val_loss = loss
            self.best_editor_state = {
                k: v.detach().clone() for k, v in self.editor.state_dict().items()
            }

    def on_test_epoch_end(self) -> None:
        self._log_score("test")

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

    def restore_best(self) -> None:
        """Load the editor weights of the best validation epoch seen in this process."""
        if self.best_editor_state is None:
            raise RuntimeError("no validation epoch has finished yet; nothing to restore")
        self.editor.load_state_dict(self.best_editor_state)

    def checkpoint_meta(self) -> dict[str, Any]:
        return {
            "model": self._lm.spec,
            "layer": self.layer,
            "hidden_size": self._lm.arch.hidden_size,
            "editor": self.hparams["editor"],
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["remedi"] = self.checkpoint_meta()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("remedi")
        if saved is None:
            raise ValueError("checkpoint: not a REMEDI checkpoint (no 'remedi' entry)")
        mine = self.checkpoint_meta()
        if any(saved.get(k) != mine[k] for k in ("model", "layer", "hidden_size")):
            raise ValueError(
                f"checkpoint: trained for model {saved.get('model')!r} layer {saved.get('layer')} "
                f"(hidden {saved.get('hidden_size')}), but this run uses model {mine['model']!r} "
                f"layer {mine['layer']} (hidden {mine['hidden_size']})"
            )
