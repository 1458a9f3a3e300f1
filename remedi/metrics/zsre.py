"""zsRE metrics (METHODS.md §8): teacher-forced top-1 token accuracy, as ROME, MEMIT and MEND
report them, instead of CounterFact's probability comparisons.

Per case, with the edit applied and ``" " + answer`` teacher-forced after each prompt, a prompt's
accuracy is the share of the answer's tokens that are the LM's top-1 prediction:

- ``efficacy_accuracy``: the rewrite question, answer target_new;
- ``paraphrase_accuracy``: the mean over the rephrased questions, answer target_new;
- ``specificity_accuracy``: the mean over the unrelated Natural Questions prompts, answer each
  one's own NQ answer, scored on the *edited* model (ROME's and MEMIT's definition: the post-edit
  model's token accuracy on the NQ answer, not its agreement with the pre-edit predictions that
  MEND's drawdown measures). An edit that leaves these prompts alone keeps the unedited
  model's accuracy; compare with method ``none``.

CounterFact's comparisons make no sense here: an NQ prompt's "true" answer is unrelated to the
edit, so P(NQ answer) > P(target_new) holds whatever the edit does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from remedi.data.cases import EditCase
from remedi.metrics.rows import EditContext, RowKind, ScoredRow, scored_chunks

ZSRE_METRIC_NAMES = ("efficacy_accuracy", "paraphrase_accuracy", "specificity_accuracy")
_NAME_OF_KIND: dict[RowKind, str] = {
    "rewrite": "efficacy_accuracy",
    "paraphrase": "paraphrase_accuracy",
    "neighborhood": "specificity_accuracy",
}


def zsre_rows(case: EditCase, case_index: int = 0) -> list[ScoredRow]:
    """One row per prompt: the rewrite and rephrased questions with target_new, and each NQ
    prompt with its own answer."""
    if case.target_new is None:
        raise ValueError(f"case {case.case_id}: target_new is None; zsRE scores an edit")
    new = case.target_new
    rows = [
        ScoredRow(case_index, "rewrite", case.rewrite_prompt, case.subject, new, case.subject_start)
    ]
    rows += [
        ScoredRow(case_index, "paraphrase", p, case.subject, new) for p in case.paraphrase_prompts
    ]
    answers = case.neighborhood_targets or [case.target_true] * len(case.neighborhood_prompts)
    rows += [
        ScoredRow(case_index, "neighborhood", p, None, a)
        for p, a in zip(case.neighborhood_prompts, answers, strict=True)
    ]
    return rows


def row_accuracies(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[ScoredRow],
    edit: EditContext | None = None,
    batch_size: int = 32,
) -> torch.Tensor:
    """Teacher-forced top-1 token accuracy of each row's target after its prompt."""
    accuracy = torch.zeros(len(rows))
    for indices, scores in scored_chunks(model, tokenizer, rows, edit, batch_size):
        accuracy[indices] = scores.token_accuracy.float().cpu()
    return accuracy


def evaluate_zsre(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    cases: Sequence[EditCase],
    case_indices: Sequence[int] | None = None,
    edit: EditContext | None = None,
    batch_size: int = 32,
) -> list[dict[str, float]]:
    """Per case, the zsRE accuracies of :data:`ZSRE_METRIC_NAMES` that it has prompts for.

    ``case_indices`` are the ``case_index`` the rows carry (what the edit context maps to its
    case; default ``0..len(cases)-1``)."""
    indices = list(case_indices) if case_indices is not None else list(range(len(cases)))
    if len(indices) != len(cases):
        raise ValueError(f"{len(cases)} cases but {len(indices)} case indices")
    rows = [row for case, i in zip(cases, indices, strict=True) for row in zsre_rows(case, i)]
    accuracy = row_accuracies(model, tokenizer, rows, edit, batch_size)
    values: dict[int, dict[str, list[float]]] = {i: {} for i in indices}
    for row, acc in zip(rows, accuracy.tolist(), strict=True):
        values[row.case_index].setdefault(_NAME_OF_KIND[row.kind], []).append(acc)
    return [{name: sum(v) / len(v) for name, v in values[i].items()} for i in indices]
