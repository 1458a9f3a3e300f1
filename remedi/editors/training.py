"""REMEDI training examples and loss (plain PyTorch; the Lightning module only calls these).

Loss = -λ_m log p(y_m) - λ_u log(1 - p(y_u)) + λ_kl KL(p_orig ‖ p_edit) [+ λ_norm ‖d‖ + λ_ess KL on
"{entity} is a"], targets read at the last prompt token. KL is summed over the vocabulary and over
every position from the entity's last token up to, not including, the last prompt token, then
averaged over the batch. Logits are computed only at those positions (the vocabulary is large).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from remedi.data import EditCase
from remedi.data.cases import RemediExample
from remedi.editors.apply import DirectionRecord, apply_editor
from remedi.editors.modules import Editor
from remedi.models import LoadedModel
from remedi.tokens import (
    ContinuationBatch,
    encode_continuations,
    encode_prompts,
    final_hidden,
    token_logprobs,
    unembed,
)

TargetTokens = Literal["first", "all"]
TrainPrompt = Literal["paraphrase", "rewrite"]


def examples_from_case(case: EditCase, prompt: TrainPrompt = "paraphrase") -> list[RemediExample]:
    """CounterFact case -> examples: context ``rewrite_prompt + " " + target_new``, one example per
    paraphrase prompt (the rewrite prompt when there are none, or with ``prompt="rewrite"``)."""
    if case.target_new is None:
        raise ValueError(f"case {case.case_id}: target_new is missing; REMEDI needs an attribute")
    context = case.edit_statement
    prompts = case.paraphrase_prompts if prompt == "paraphrase" else []
    return [
        RemediExample(
            entity=case.subject,
            context=context,
            prompt=p,
            target_mediated=case.target_new,
            target_unmediated=case.target_true,
            case_id=case.case_id,
        )
        for p in (prompts or [case.rewrite_prompt])
    ]


@dataclass
class LossWeights:
    """Weights of the loss terms (REMEDI's defaults)."""

    mediated: float = 1.0
    unmediated: float = 1.0
    kl: float = 10.0
    norm: float = 0.0
    essence: float = 0.0


def logits_at(
    lm: LoadedModel, hidden: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """Next-token logits ``[n, vocab]`` at ``(rows, cols)`` of final hidden states only."""
    return unembed(lm.model, hidden[rows, cols])


def _hidden(
    lm: LoadedModel,
    batch: ContinuationBatch,
    width: int,
    rows: torch.Tensor,
    cols: torch.Tensor,
    edit: tuple[int, Editor, torch.Tensor, torch.Tensor, DirectionRecord] | None,
) -> torch.Tensor:
    """Final hidden states ``[cells, hidden]`` at ``(rows, cols)``: of the edited LM (with grad)
    or, for ``edit=None``, of the unedited LM (no grad)."""
    ids, mask = batch.input_ids[:, :width], batch.attention_mask[:, :width]
    if edit is None:
        with torch.no_grad():
            return final_hidden(lm.model, ids, mask)[rows, cols]
    layer, editor, attribute, positions, record = edit
    with apply_editor(lm, layer, editor, attribute, positions, record=record):
        hidden = final_hidden(lm.model, ids, mask)
    return hidden[rows, cols]


KL_CHUNK = 32
"""Cells whose ``[cells, vocab]`` logits exist at once inside :func:`kl_divergence`."""


class _KLDivergence(torch.autograd.Function):
    """Σ over cells of KL(p_orig ‖ p_edit) from final hidden states, unembedding
    :data:`KL_CHUNK` cells at a time and keeping only the gradient with respect to the edited
    states (``[cells, hidden]``): full-vocabulary arrays never outlive one chunk (262k entries a
    row for Gemma)."""

    @staticmethod
    def forward(ctx: Any, model: nn.Module, *states: torch.Tensor) -> torch.Tensor:
        orig, edited = states
        total = torch.zeros((), dtype=torch.float32, device=edited.device)
        grads = []
        for start in range(0, edited.shape[0], KL_CHUNK):
            with torch.enable_grad():
                h = edited[start : start + KL_CHUNK].detach().requires_grad_(True)
                logp = torch.log_softmax(unembed(model, h).float(), -1)
                with torch.no_grad():
                    logp_orig = torch.log_softmax(
                        unembed(model, orig[start : start + KL_CHUNK]).float(), -1
                    )
                kl = (logp_orig.exp() * (logp_orig - logp)).sum()
                (grad,) = torch.autograd.grad(kl, h)
            total += kl.detach()
            grads.append(grad)
        ctx.save_for_backward(torch.cat(grads) if grads else torch.zeros_like(edited))
        return total

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:
        (gradient,) = ctx.saved_tensors
        return None, None, grads[0] * gradient


def kl_divergence(model: nn.Module, orig: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
    """Σ over cells of KL(p_orig ‖ p_edit) of the next-token distributions that ``model``
    unembeds from final hidden states ``orig`` (no grad) and ``edited`` ``[cells, hidden]``,
    memory-lean (see :class:`_KLDivergence`)."""
    result: torch.Tensor = _KLDivergence.apply(model, orig, edited)
    return result


def _target_logprobs(lm: LoadedModel, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids) per row of final hidden states, without a full log-softmax array."""
    return token_logprobs(unembed(lm.model, hidden).float(), ids)


def _log1m_exp(logp: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(logp))``, stable for probabilities near 0 and 1."""
    logp = logp.clamp(max=-1e-6)
    return torch.where(logp > -0.693, torch.log(-torch.expm1(logp)), torch.log1p(-torch.exp(logp)))


def remedi_loss(
    lm: LoadedModel,
    layer: int,
    editor: Editor,
    examples: Sequence[RemediExample],
    attribute: torch.Tensor,
    weights: LossWeights | None = None,
    target_tokens: TargetTokens = "first",
) -> dict[str, torch.Tensor]:
    """Loss terms for one batch; ``attribute`` is ``[batch, hidden]`` from
    :func:`~remedi.editors.apply.attribute_states`. Returns ``loss`` and each term."""
    lm.arch.check_layer(layer)
    w = weights or LossWeights()
    tok, device = lm.tokenizer, lm.device
    n = len(examples)
    prompts = [e.prompt for e in examples]
    entities = [e.entity for e in examples]
    enc_m = encode_continuations(tok, prompts, [e.target_mediated for e in examples], entities)
    has_u = [e.target_unmediated is not None for e in examples]
    enc_u = encode_continuations(
        tok, prompts, [e.target_unmediated or e.target_mediated for e in examples]
    )
    assert enc_m.subject_spans is not None
    subj_last = [s.last for s in enc_m.subject_spans]
    p_len = [int(x) for x in enc_m.prompt_lengths]
    if [int(x) for x in enc_u.prompt_lengths] != p_len:
        raise ValueError("prompt tokenisation differs between the two targets of one example")
    enc_m, enc_u = enc_m.to(device), enc_u.to(device)
    record = DirectionRecord()
    positions = torch.tensor(subj_last, device=device)
    edit = (layer, editor, attribute.to(device), positions, record)

    kl_pos = [(i, c) for i in range(n) for c in range(subj_last[i], p_len[i] - 1)]
    last_pos = [(i, p_len[i] - 1) for i in range(n)]
    if target_tokens == "first":
        # Each target's first token that carries text (after a bare-space token, if the
        # tokenizer splits one off, as Gemma does before digits), predicted where it is.
        pos_m = [int(x) for x in enc_m.first_target_positions()]
        pos_u = [int(x) for x in enc_u.first_target_positions()]
        u_from_prompt = pos_u == [c for _, c in last_pos]
        cells = kl_pos + [(i, pos_m[i]) for i in range(n)]
        if u_from_prompt:
            cells += last_pos
        rows = torch.tensor([r for r, _ in cells], device=device, dtype=torch.long)
        cols = torch.tensor([c for _, c in cells], device=device, dtype=torch.long)
        width = max(max(p_len), max(pos_m) + 1)
        h_orig = _hidden(lm, enc_m, width, rows[: len(kl_pos)], cols[: len(kl_pos)], None)
        edited = _hidden(lm, enc_m, width, rows, cols, edit)
        h_edit, last_m = edited[: len(kl_pos)], edited[len(kl_pos) : len(kl_pos) + n]
        if u_from_prompt:
            last_u = edited[len(kl_pos) + n :]
        else:
            at = torch.tensor(pos_u, device=device, dtype=torch.long)
            every = torch.arange(n, device=device)
            last_u = _hidden(lm, enc_u, max(pos_u) + 1, every, at, edit)
        logp_m = _target_logprobs(lm, last_m, enc_m.first_target_ids())
        logp_u = _target_logprobs(lm, last_u, enc_u.first_target_ids())
    elif target_tokens == "all":
        logp_m, h_edit, h_orig = _sequence_logprob(lm, enc_m, kl_pos, edit, with_kl=True)
        logp_u = _sequence_logprob(lm, enc_u, [], edit, with_kl=False)[0]
    else:
        raise ValueError(f"target_tokens {target_tokens!r} must be 'first' or 'all'")

    mask_u = torch.tensor(has_u, device=device, dtype=torch.float32)
    terms: dict[str, torch.Tensor] = {
        "mediated": -logp_m.mean(),
        "unmediated": -(_log1m_exp(logp_u) * mask_u).sum() / mask_u.sum().clamp(min=1),
        "kl": kl_divergence(lm.model, h_orig, h_edit) / n,
    }
    assert record.directions is not None
    terms["norm"] = record.directions.float().norm(dim=-1).mean()
    if w.essence:
        terms["essence"] = _essence_kl(lm, layer, editor, entities, attribute)
    loss = (
        w.mediated * terms["mediated"]
        + w.unmediated * terms["unmediated"]
        + w.kl * terms["kl"]
        + w.norm * terms["norm"]
    )
    if "essence" in terms:
        loss = loss + w.essence * terms["essence"]
    terms["loss"] = loss
    return terms


def _sequence_logprob(
    lm: LoadedModel,
    batch: ContinuationBatch,
    kl_pos: list[tuple[int, int]],
    edit: tuple[int, Editor, torch.Tensor, torch.Tensor, DirectionRecord],
    with_kl: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed log-prob of every target token under the edit, and the edited and unedited final
    hidden states at the KL cells (when asked)."""
    device = batch.input_ids.device
    target_pos = batch.target_positions()
    t_rows, t_cols = batch.target_mask.nonzero(as_tuple=True)
    cells_r = [r for r, _ in kl_pos] + t_rows.tolist()
    cells_c = [c for _, c in kl_pos] + target_pos[t_rows, t_cols].tolist()
    rows = torch.tensor(cells_r, device=device, dtype=torch.long)
    cols = torch.tensor(cells_c, device=device, dtype=torch.long)
    width = batch.input_ids.shape[1]
    k = len(kl_pos)
    h_orig = _hidden(lm, batch, width, rows[:k], cols[:k], None) if with_kl else torch.zeros(0)
    edited = _hidden(lm, batch, width, rows, cols, edit)
    token_lp = _target_logprobs(lm, edited[k:], batch.target_ids[t_rows, t_cols])
    total = torch.zeros(batch.input_ids.shape[0], device=device).index_add(0, t_rows, token_lp)
    return total, edited[:k], h_orig


def _essence_kl(
    lm: LoadedModel,
    layer: int,
    editor: Editor,
    entities: Sequence[str],
    attribute: torch.Tensor,
) -> torch.Tensor:
    """KL(p_orig ‖ p_edit) of the next token after ``"{entity} is a"``: keeps the entity itself."""
    batch = encode_prompts(lm.tokenizer, [f"{e} is a" for e in entities], list(entities))
    batch = batch.to(lm.device)
    rows = torch.arange(len(entities), device=lm.device)
    cols = batch.last_index
    with torch.no_grad():
        orig = final_hidden(lm.model, batch.input_ids, batch.attention_mask)[rows, cols]
    with apply_editor(lm, layer, editor, attribute.to(lm.device), batch.subject_last):
        edited = final_hidden(lm.model, batch.input_ids, batch.attention_mask)[rows, cols]
    return kl_divergence(lm.model, orig, edited) / len(entities)
