"""REMEDI as a probe of what the LM believes (METHODS.md §1.7): the Fact-Med and Fact-Prior tasks.

For each CounterFact case the editor turns two statements into directions, one with the new
object (``rewrite prompt + " " + target_new``) and one with the true object; each direction is
compared with the entity's representation at a deeper *entity layer*: score = ⟨z(h_e), z(d)⟩,
with every dimension z-scored across the evaluated cases (entity states and each kind of
direction separately). The probe predicts that the LM holds whichever attribute scores higher.

* **Fact-Med** (contextual): the prompt (the first paraphrase prompt, else the rewrite prompt)
  follows the new fact, ``"{rewrite} {target_new}. {prompt}"``; h_e is taken at the entity's
  mention in the prompt part. Label: the LM follows the context, log p(target_new) >
  log p(target_true) after it. Prediction: score(new) > score(true).
* **Fact-Prior** (decontextual): the prompt alone; label: the LM states the true object,
  log p(target_true) > log p(target_new). Prediction: score(true) > score(new).

Accuracy, F1 and MCC (scikit-learn) are computed, as in REMEDI's reference
(``remedi/benchmarks.py``, ``classification``), with the LM's *failure* as the positive class
(it ignores the context, or does not know the fact), which changes F1 only. Controls: the same
editor with the labels shuffled (seeded; class balance kept), which should score near chance;
and the identity editor (d = h_a, REMEDI (I) in the paper), which asks how much the raw
attribute representation already tells. The reference's third control, a randomly initialised
LM with its own trained editor, needs another training run and is not done here.

Differences from the reference: the targets' log-probabilities are those of their first token
that carries text (:meth:`remedi.tokens.ContinuationScores.first`; the reference took the first
token id, which for Gemma can be a bare space); the prompt is CounterFact's first paraphrase as
given (the reference cleaned it with spaCy); an editor that reads the entity state (biaffine) is
given the entity-layer state, as the reference does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from remedi.data import EditCase
from remedi.editors import Editor, IdentityEditor, attribute_states
from remedi.hooks import Site, intervene
from remedi.metrics import ScoredRow, row_probabilities
from remedi.models import LoadedModel
from remedi.tokens import encode_prompts

TASKS = ("fact-med", "fact-prior")
PROBE_METRIC_NAMES = ("accuracy", "f1", "mcc", "positive_rate")


@dataclass
class ProbeInputs:
    """What the probe needs from the LM, computed once for every editor and control: attribute
    representations at the edit layer (contexts with the new / the true object), entity states
    at the entity layer (prompt alone / prompt after the new fact) and the LM's log-probabilities
    of ``[target_new, target_true]`` after each prompt."""

    case_ids: list[Any]
    attributes_new: torch.Tensor
    attributes_true: torch.Tensor
    entity_prompt: torch.Tensor
    entity_in_context: torch.Tensor
    logp_prompt: torch.Tensor
    logp_in_context: torch.Tensor


def default_entity_layer(num_layers: int) -> int:
    """Two blocks below the top (REMEDI's 26 of GPT-J's 28 for CounterFact)."""
    return max(0, num_layers - 2)


def case_prompts(case: EditCase) -> tuple[str, int | None, str, int]:
    """``(prompt, subject start, prompt in context, subject start there)`` of a case: the first
    paraphrase prompt (else the rewrite prompt), and the same after the new fact."""
    if case.target_new is None:
        raise ValueError(f"case {case.case_id}: target_new is None; the probe needs a new object")
    if case.paraphrase_prompts and case.subject in case.paraphrase_prompts[0]:
        prompt = case.paraphrase_prompts[0]
        start = prompt.index(case.subject)
    else:
        prompt, start = case.rewrite_prompt, case.subject_start
    context = case.edit_statement + ". "
    return prompt, start, context + prompt, len(context) + start


@torch.no_grad()
def entity_states(
    lm: LoadedModel,
    layer: int,
    prompts: Sequence[str],
    subjects: Sequence[str],
    starts: Sequence[int | None],
    batch_size: int = 32,
) -> torch.Tensor:
    """Block-``layer`` output at each subject's last token, ``[n, hidden]`` fp32 (the subject
    located at ``starts[i]``; only blocks ``0..layer`` run)."""
    lm.arch.check_layer(layer)
    site = Site("block", layer)
    out = []
    for first in range(0, len(prompts), batch_size):
        end = first + batch_size
        batch = encode_prompts(
            lm.tokenizer, prompts[first:end], subjects[first:end], subject_starts=starts[first:end]
        ).to(lm.device)
        with intervene(lm.arch, record=[site], stop_after=site) as states:
            lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        rows = torch.arange(batch.input_ids.shape[0], device=lm.device)
        out.append(states[site][rows, batch.subject_last].float().cpu())
    return torch.cat(out) if out else torch.zeros(0, lm.arch.hidden_size)


def _log_probs(
    lm: LoadedModel, cases: Sequence[EditCase], prompts: Sequence[str], batch: int
) -> torch.Tensor:
    """``[n, 2]`` log-probabilities of (target_new, target_true) after each prompt."""
    rows = [
        ScoredRow(i, "paraphrase", prompt, None, str(target))
        for i, (case, prompt) in enumerate(zip(cases, prompts, strict=True))
        for target in (case.target_new, case.target_true)
    ]
    probs = row_probabilities(lm.model, lm.tokenizer, rows, batch_size=batch, scoring="first")
    return probs.clamp_min(1e-30).log().view(len(cases), 2)


@torch.no_grad()
def probe_inputs(
    lm: LoadedModel,
    cases: Sequence[EditCase],
    editor_layer: int,
    entity_layer: int,
    batch_size: int = 32,
) -> ProbeInputs:
    """Run the LM over ``cases`` once for everything the probe compares (:class:`ProbeInputs`)."""
    subjects = [c.subject for c in cases]
    prompts = [case_prompts(c) for c in cases]
    contexts_new = [c.edit_statement for c in cases]
    contexts_true = [f"{c.rewrite_prompt} {c.target_true.strip()}" for c in cases]
    alone = [p[0] for p in prompts]
    in_context = [p[2] for p in prompts]
    return ProbeInputs(
        case_ids=[c.case_id for c in cases],
        attributes_new=attribute_states(lm, editor_layer, contexts_new, subjects).cpu(),
        attributes_true=attribute_states(lm, editor_layer, contexts_true, subjects).cpu(),
        entity_prompt=entity_states(
            lm, entity_layer, alone, subjects, [p[1] for p in prompts], batch_size
        ),
        entity_in_context=entity_states(
            lm, entity_layer, in_context, subjects, [p[3] for p in prompts], batch_size
        ),
        logp_prompt=_log_probs(lm, cases, alone, batch_size).cpu(),
        logp_in_context=_log_probs(lm, cases, in_context, batch_size).cpu(),
    )


def zscore(x: torch.Tensor) -> torch.Tensor:
    """Each column of ``[n, d]`` centred and scaled to unit (sample) standard deviation across
    the rows; a constant column is only centred."""
    std = x.std(0) if x.shape[0] > 1 else torch.ones(x.shape[1])
    return (x - x.mean(0)) / torch.where(std > 0, std, torch.ones_like(std))


def alignment(entity: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """⟨z(h_e), z(d)⟩ per row: REMEDI's probe score."""
    return (zscore(entity.float()) * zscore(directions.float())).sum(-1)


@torch.no_grad()
def directions(editor: Editor, attributes: torch.Tensor, entity: torch.Tensor) -> torch.Tensor:
    """The editor's directions for ``attributes`` (in eval mode, on the editor's device)."""
    was_training = editor.training
    editor.eval()
    try:
        device = next(iter(editor.parameters()), torch.zeros(0)).device
        ent = entity.to(device) if editor.uses_entity else None
        return editor(attributes.to(device), ent).float().cpu()
    finally:
        editor.train(was_training)


def classification_metrics(y_true: Sequence[bool], y_pred: Sequence[bool]) -> dict[str, float]:
    """Accuracy, F1 and MCC of boolean predictions (positive = True), and the positive rate."""
    true, pred = np.asarray(y_true, bool), np.asarray(y_pred, bool)
    return {
        "accuracy": float(accuracy_score(true, pred)),
        "f1": float(f1_score(true, pred, zero_division=0.0)),
        "mcc": float(matthews_corrcoef(true, pred)) if len(true) > 1 else 0.0,
        "positive_rate": float(true.mean()) if len(true) else 0.0,
    }


def shuffled_labels(labels: Sequence[bool], seed: int = 0) -> list[bool]:
    """``labels`` in a seeded random order (the control task: same class balance, no signal)."""
    order = np.random.default_rng(seed).permutation(len(labels))
    return [bool(labels[i]) for i in order]


def task_labels(inputs: ProbeInputs, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(entity states, LM fails)`` of one task: the entity in context and "ignores the new
    fact" for Fact-Med; the prompt alone and "does not state the true object" for Fact-Prior."""
    if task == "fact-med":
        logp = inputs.logp_in_context
        return inputs.entity_in_context, ~(logp[:, 0] > logp[:, 1])
    if task == "fact-prior":
        logp = inputs.logp_prompt
        return inputs.entity_prompt, ~(logp[:, 1] > logp[:, 0])
    raise ValueError(f"task {task!r} must be one of {', '.join(TASKS)}")


def predictions(
    editor: Editor, inputs: ProbeInputs, task: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(score new, score true, predicted failure)`` of ``editor`` on one task."""
    entity, _ = task_labels(inputs, task)
    score_new = alignment(entity, directions(editor, inputs.attributes_new, entity))
    score_true = alignment(entity, directions(editor, inputs.attributes_true, entity))
    holds_new = score_new > score_true
    return score_new, score_true, ~holds_new if task == "fact-med" else holds_new


def run_probe(
    editor: Editor, inputs: ProbeInputs, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows (editor, task, labels, metrics) and per-case records of the probe with ``editor``,
    the shuffled-label control and the identity-editor control."""
    identity = IdentityEditor(inputs.attributes_new.shape[1])
    rows: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    for name, probe in (("remedi", editor), ("remedi-identity", identity)):
        for task in TASKS:
            _, fails = task_labels(inputs, task)
            score_new, score_true, predicted = predictions(probe, inputs, task)
            truth = [bool(x) for x in fails]
            guess = [bool(x) for x in predicted]
            controls = [("true", truth)]
            if name == "remedi":
                controls.append(("shuffled", shuffled_labels(truth, seed)))
            for labels, y in controls:
                row = {"method": name, "task": task, "labels": labels, "n_cases": len(y)}
                rows.append(row | classification_metrics(y, guess))
            for i, case_id in enumerate(inputs.case_ids):
                records.append(
                    {
                        "method": name,
                        "task": task,
                        "case_id": case_id,
                        "lm_fails": truth[i],
                        "predicted_fails": guess[i],
                        "score_new": float(score_new[i]),
                        "score_true": float(score_true[i]),
                    }
                )
    return rows, records
