"""Apply a REMEDI direction to a frozen LM: attribute representations, the hook that adds the
direction at the entity's last token, an edit context for :mod:`remedi.metrics`, and generation.

Everything here is plain PyTorch over :mod:`remedi.hooks`, usable from a notebook:

    attr = attribute_states(lm, layer, ["Poland is in Asia"], ["Poland"])
    with apply_editor(lm, layer, editor, attr, positions=batch.subject_last):
        logits = lm.model(**inputs).logits
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch

from remedi.editors.modules import Editor
from remedi.hooks import EditFn, Positions, Site, add_at, intervene, position_index
from remedi.metrics import EditContext, ScoredRow
from remedi.models import LoadedModel
from remedi.tokens import (
    ContinuationBatch,
    encode_continuations,
    encode_prompts,
    generate_continuations,
)


@dataclass
class RemediSettings:
    """How a trained REMEDI editor is applied at evaluation (the ``remedi`` section of
    ``remedi.evaluate``'s config, ``--remedi.alpha 2``).

    Args:
        alpha: the direction is multiplied by ``alpha`` before it is added to the entity's
            state, as the reference's ``alpha`` (default 1, the direction as trained). Larger
            values push the edit harder; choose it on cases you do not report.
    """

    alpha: float = 1.0

    def __post_init__(self) -> None:
        check_alpha(self.alpha)


def check_alpha(alpha: float) -> float:
    """``alpha`` if it is a finite positive number; a ValueError naming it otherwise."""
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"remedi.alpha must be a finite number > 0, got {alpha}")
    return alpha


@torch.no_grad()
def attribute_states(
    lm: LoadedModel,
    layer: int,
    contexts: Sequence[str],
    entities: Sequence[str],
    batch_size: int = 64,
) -> torch.Tensor:
    """Mean block-``layer`` state over the attribute tokens of each context, ``[n, hidden]`` fp32.

    The attribute is the context text after the entity's (first) mention, e.g. ``" is in Asia"``
    in ``"Poland is in Asia"``; only blocks ``0..layer`` run.
    """
    lm.arch.check_layer(layer)
    site = Site("block", layer)
    out: list[torch.Tensor] = []
    for start in range(0, len(contexts), batch_size):
        chunk = list(contexts[start : start + batch_size])
        batch = encode_prompts(lm.tokenizer, chunk, list(entities[start : start + batch_size]))
        for text, span, last in zip(chunk, batch.subject_spans, batch.last_index, strict=True):
            if span.end > int(last):
                raise ValueError(f"context {text!r} has no attribute text after its entity")
        batch = batch.to(lm.device)
        with intervene(lm.arch, record=[site], stop_after=site) as states:
            lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        state = states[site].float()
        cols = torch.arange(state.shape[1], device=state.device)
        starts = torch.tensor([s.end for s in batch.subject_spans], device=state.device)
        mask = (cols[None, :] >= starts[:, None]) & (cols[None, :] <= batch.last_index[:, None])
        weights = mask.float() / mask.sum(-1, keepdim=True)
        out.append(torch.einsum("bt,bth->bh", weights, state))
    return torch.cat(out) if out else torch.zeros(0, lm.arch.hidden_size)


class DirectionRecord:
    """Holds the directions computed inside a hook, so losses can read them afterwards."""

    def __init__(self) -> None:
        self.directions: torch.Tensor | None = None


def editor_edit(
    editor: Editor,
    attribute: torch.Tensor,
    positions: Positions,
    record: DirectionRecord | None = None,
    alpha: float = 1.0,
) -> EditFn:
    """Edit function adding ``alpha · editor(attribute[, entity state])`` at ``positions``.

    ``attribute`` has one row per edited position (in row order). Computing the direction inside
    the hook lets the biaffine editor read the entity state it is about to change.
    """

    def fn(state: torch.Tensor) -> torch.Tensor:
        entity = None
        if editor.uses_entity:
            rows, cols = position_index(positions, state.device)
            entity = state[rows, cols]
        direction = editor(attribute.to(state.device), entity)
        if alpha != 1.0:
            direction = alpha * direction
        if record is not None:
            record.directions = direction
        return add_at(positions, direction)(state)

    return fn


def apply_direction(
    lm: LoadedModel,
    layer: int,
    positions: Positions,
    directions: torch.Tensor,
    prompt_pass_only: bool = False,
) -> AbstractContextManager[dict[Site, torch.Tensor]]:
    """Context manager under which ``lm`` adds ``directions`` to block ``layer`` at ``positions``
    (with ``prompt_pass_only``, only on the prompt pass of ``generate``)."""
    edit = {Site("block", lm.arch.check_layer(layer)): add_at(positions, directions)}
    return intervene(lm.arch, edit=edit, prompt_pass_only=prompt_pass_only)


def apply_editor(
    lm: LoadedModel,
    layer: int,
    editor: Editor,
    attribute: torch.Tensor,
    positions: Positions,
    prompt_pass_only: bool = False,
    record: DirectionRecord | None = None,
    alpha: float = 1.0,
) -> AbstractContextManager[dict[Site, torch.Tensor]]:
    """Like :func:`apply_direction`, with the direction computed by ``editor`` from
    ``attribute`` (and the entity state for editors that use it), times ``alpha``."""
    fn = editor_edit(editor, attribute, positions, record, check_alpha(alpha))
    edit = {Site("block", lm.arch.check_layer(layer)): fn}
    return intervene(lm.arch, edit=edit, prompt_pass_only=prompt_pass_only)


def metrics_context(
    lm: LoadedModel,
    layer: int,
    editor: Editor,
    case_attributes: torch.Tensor,
    alpha: float = 1.0,
) -> EditContext:
    """An :data:`~remedi.metrics.EditContext` for :func:`remedi.metrics.evaluate_cases`.

    Rows that mention the edited subject (rewrite and paraphrase rows) get the direction of their
    case (``case_attributes[case_index]``) at the subject's last token. Neighborhood rows are
    about other subjects and are left unedited: REMEDI edits one mention of one entity, so the
    neighborhood score measures whether that edit leaks into prompts without the entity.
    ``alpha`` scales every direction (see :class:`RemediSettings`).
    """

    def context(
        batch: ContinuationBatch, rows: Sequence[ScoredRow]
    ) -> AbstractContextManager[object]:
        edited = [i for i, row in enumerate(rows) if row.subject is not None]
        if not edited:
            return nullcontext()
        if batch.subject_spans is not None:
            last = {i: batch.subject_spans[i].last for i in edited}
        else:
            sub = encode_continuations(
                lm.tokenizer,
                [rows[i].prompt for i in edited],
                [rows[i].target for i in edited],
                subjects=[str(rows[i].subject) for i in edited],
            )
            assert sub.subject_spans is not None
            last = {i: span.last for i, span in zip(edited, sub.subject_spans, strict=True)}
        positions = [[last[i]] if i in last else [] for i in range(len(rows))]
        attribute = case_attributes[[rows[i].case_index for i in edited]]
        return apply_editor(lm, layer, editor, attribute, positions, alpha=alpha)

    return context


@contextmanager
def _eval_mode(editor: Editor) -> Iterator[None]:
    was_training = editor.training
    editor.eval()
    try:
        yield
    finally:
        editor.train(was_training)


@torch.no_grad()
def generate_edited(
    lm: LoadedModel,
    layer: int,
    editor: Editor,
    prompts: Sequence[str],
    entities: Sequence[str],
    contexts: Sequence[str],
    max_new_tokens: int = 20,
    **generate_kwargs: object,
) -> list[str]:
    """Greedy (by default) continuations of ``prompts`` with each entity edited by the attribute
    its context states; only the prompt pass is edited, the generated tokens are not."""
    attribute = attribute_states(lm, layer, contexts, entities)
    batch = encode_prompts(lm.tokenizer, prompts, entities, padding_side="left").to(lm.device)
    kwargs: dict[str, object] = {"do_sample": False, **generate_kwargs}
    with (
        _eval_mode(editor),
        apply_editor(lm, layer, editor, attribute, batch.subject_last, prompt_pass_only=True),
    ):
        return generate_continuations(lm.model, lm.tokenizer, batch, max_new_tokens, **kwargs)
