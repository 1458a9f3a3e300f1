"""Specificity measured against the unedited model: for CounterFact, the neighbourhood KL
(CounterFact+, Hoelscher-Obermaier et al. 2023: how far an edit moves the next-token distribution
of the neighbourhood prompts read after the edit's statement); for zsRE, EasyEdit's locality
(the share of the locality answers' tokens whose top-1 prediction, teacher-forced, is the same
after the edit as before).

For each such prompt, KL(unedited ‖ edited) of the next token. The unedited distribution is taken
once per case, before any method runs, and kept as its :data:`TOP_K` most likely tokens plus the
rest of the vocabulary as one outcome: the KL of these coarsened distributions, never more than
the full KL and, for edits that leave the tail alone, equal to it up to the tail's share.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from remedi.data import EditCase
from remedi.metrics.counterfact import case_rows
from remedi.metrics.rows import EditContext, ScoredRow, renumbered, scored_chunks
from remedi.metrics.zsre import zsre_rows
from remedi.tokens import ContinuationBatch, final_hidden, unembed

TOP_K = 1024
"""Tokens of the unedited distribution kept exactly (the rest is one outcome)."""


@dataclass
class NextToken:
    """The unedited next-token distribution of one prompt: its top tokens' ids and
    log-probabilities."""

    ids: torch.Tensor
    logprobs: torch.Tensor


def plus_rows(case: EditCase, case_index: int) -> list[ScoredRow]:
    """One row per neighbourhood prompt of ``case`` read after its statement: the CounterFact+
    rows of :func:`~remedi.metrics.counterfact.case_rows` (its true-object half: the target
    only makes a batch; the next token is what is compared)."""
    rows = case_rows(case, case_index, plus=True)
    return [row for row in rows if row.kind == "neighborhood_plus"][1::2]


def next_token_logprobs(model: nn.Module, batch: ContinuationBatch) -> torch.Tensor:
    """Log-probabilities ``[rows, vocab]`` of the token after each row's prompt."""
    device = next(model.parameters()).device
    batch = batch.to(device)
    hidden = final_hidden(model, batch.input_ids, batch.attention_mask)
    states = hidden[torch.arange(hidden.shape[0], device=device), batch.last_prompt_index]
    return torch.log_softmax(unembed(model, states).float(), -1)


def _per_row(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[ScoredRow],
    edit: EditContext | None,
    batch_size: int,
    scorer: Callable[[nn.Module, ContinuationBatch], Any],
) -> list[Any]:
    """``scorer``'s result for each of ``rows``, in their order."""
    found: list[Any] = [None] * len(rows)
    for indices, results in scored_chunks(model, tokenizer, rows, edit, batch_size, scorer):
        for i, result in zip(indices, results, strict=True):
            found[i] = result
    return found


def references(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    cases: Sequence[EditCase],
    batch_size: int = 32,
) -> list[list[NextToken]]:
    """Per case, the unedited next-token distribution of each CounterFact+ prompt (top
    :data:`TOP_K`)."""
    rows = [
        row
        for i, case in enumerate(cases)
        if case.benchmark != "zsre"
        for row in plus_rows(case, i)
    ]
    out: list[list[NextToken]] = [[] for _ in cases]
    found = _per_row(model, tokenizer, rows, None, batch_size, next_token_logprobs)
    for row, logprobs in zip(rows, found, strict=True):
        top = torch.topk(logprobs, min(TOP_K, logprobs.shape[-1]))
        out[row.case_index].append(NextToken(top.indices.cpu(), top.values.cpu()))
    return out


def coarse_kl(reference: NextToken, edited: torch.Tensor) -> float:
    """KL(unedited ‖ edited) over the reference's top tokens and the rest as one outcome."""
    p_log = reference.logprobs.double()
    q_log = edited.detach().cpu().double()[reference.ids]
    p, q = p_log.exp(), q_log.exp()
    p_rest = (1.0 - p.sum()).clamp(min=0.0)
    q_rest = (1.0 - q.sum()).clamp(min=1e-30)
    kl = (p * (p_log - q_log)).sum()
    if p_rest > 0:
        kl = kl + p_rest * (p_rest.log() - q_rest.log())
    return max(0.0, float(kl))


def neighborhood_kl(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    cases: Sequence[EditCase],
    reference: Sequence[Sequence[NextToken]],
    edit: EditContext | None = None,
    batch_size: int = 32,
) -> list[float | None]:
    """Per case, the mean KL of its CounterFact+ prompts' next token, the model as it is (under
    ``edit``) against ``reference`` (that case's unedited distributions, from
    :func:`references`); None for a case without them."""
    rows = [row for i, case in enumerate(cases) for row in plus_rows(case, i)]
    if not rows:
        return [None] * len(cases)
    edited = _per_row(model, tokenizer, rows, edit, batch_size, next_token_logprobs)
    per_case: list[list[float]] = [[] for _ in cases]
    seen = [0] * len(cases)
    for row, logprobs in zip(rows, edited, strict=True):
        i = row.case_index
        per_case[i].append(coarse_kl(reference[i][seen[i]], logprobs))
        seen[i] += 1
    return [sum(v) / len(v) if v else None for v in per_case]


def predicted_ids(model: nn.Module, batch: ContinuationBatch) -> list[torch.Tensor]:
    """Each row's top-1 prediction at each of its target's positions (teacher-forced)."""
    device = next(model.parameters()).device
    batch = batch.to(device)
    hidden = final_hidden(model, batch.input_ids, batch.attention_mask)
    out = []
    for i in range(hidden.shape[0]):
        length = int(batch.target_lengths[i])
        positions = batch.target_positions()[i, :length]
        out.append(unembed(model, hidden[i, positions]).argmax(-1).cpu())
    return out


def _locality_rows(case: EditCase, case_index: int) -> list[ScoredRow]:
    return [row for row in zsre_rows(case, case_index) if row.kind == "neighborhood"]


def reference_measures(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    cases: Sequence[EditCase],
    batch_size: int = 32,
) -> list[list[NextToken] | list[torch.Tensor]]:
    """Per case, what the unedited model does that an edit is compared with: the CounterFact+
    next-token distributions (:func:`references`), or a zsRE case's top-1 predictions on its
    locality answers."""
    out: list[list[NextToken] | list[torch.Tensor]] = list(
        references(model, tokenizer, cases, batch_size)
    )
    rows = [
        row
        for i, case in enumerate(cases)
        if case.benchmark == "zsre"
        for row in _locality_rows(case, i)
    ]
    found = _per_row(model, tokenizer, rows, None, batch_size, predicted_ids)
    for row, ids in zip(rows, found, strict=True):
        out[row.case_index].append(ids)
    return out


def compared_with_reference(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    cases: Sequence[EditCase],
    reference: Sequence[Sequence[object]],
    edit: EditContext | None = None,
    batch_size: int = 32,
) -> list[dict[str, float]]:
    """Per case, ``neighborhood_kl`` (CounterFact) or ``locality_agreement`` (zsRE) of the
    model as it is (under ``edit``) against ``reference`` (:func:`reference_measures`)."""
    out: list[dict[str, float]] = [{} for _ in cases]
    plus = [i for i, case in enumerate(cases) if case.benchmark != "zsre"]
    if plus:
        kls = neighborhood_kl(
            model,
            tokenizer,
            [cases[i] for i in plus],
            [reference[i] for i in plus],  # type: ignore[misc]
            renumbered(edit, plus),
            batch_size,
        )
        for i, kl in zip(plus, kls, strict=True):
            if kl is not None:
                out[i]["neighborhood_kl"] = kl
    zsre = [i for i, case in enumerate(cases) if case.benchmark == "zsre"]
    rows = [row for i in zsre for row in _locality_rows(cases[i], i)]
    if rows:
        edited = _per_row(model, tokenizer, rows, edit, batch_size, predicted_ids)
        agree: dict[int, list[float]] = {}
        seen: dict[int, int] = {}
        for row, ids in zip(rows, edited, strict=True):
            k = seen.get(row.case_index, 0)
            before = reference[row.case_index][k]
            assert isinstance(before, torch.Tensor)
            agree.setdefault(row.case_index, []).append(float((ids == before).float().mean()))
            seen[row.case_index] = k + 1
        for i, values in agree.items():
            out[i]["locality_agreement"] = sum(values) / len(values)
    return out
