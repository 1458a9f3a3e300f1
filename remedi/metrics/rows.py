"""Scored rows (a prompt and the target to score after it) and the edit context every metric runs
them under: the piece the CounterFact and zsRE metrics share.

A method is scored through an *edit context*: a callable that takes the
:class:`~remedi.tokens.ContinuationBatch` about to be run (with the :class:`ScoredRow` each row
belongs to) and returns a context manager under which the LM behaves as edited. Weight editors
(ROME, MEMIT, FT, KN) apply their edit once around the whole call and pass ``edit=None``;
activation editors (REMEDI) return hooks that depend on the rows' token positions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import nn
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from remedi.tokens import ContinuationBatch, encode_continuations
from remedi.tokens import score_continuations as _score

RowKind = Literal["rewrite", "paraphrase", "neighborhood", "neighborhood_plus"]


@dataclass(frozen=True)
class ScoredRow:
    """One prompt to score: which case and kind it belongs to, and its subject if it has one.

    ``subject_start`` is the subject's character offset in ``prompt`` when the prompt was made
    from a template (where its ``{}`` was); None: the subject's first occurrence.
    """

    case_index: int
    kind: RowKind
    prompt: str
    subject: str | None
    target: str
    subject_start: int | None = None


EditContext = Callable[[ContinuationBatch, Sequence[ScoredRow]], AbstractContextManager[object]]


def scored_chunks(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[ScoredRow],
    edit: EditContext | None = None,
    batch_size: int = 32,
    scorer: Callable[[nn.Module, ContinuationBatch], Any] = _score,
) -> Iterator[tuple[list[int], Any]]:
    """Score ``rows`` in batches of at most ``batch_size`` under ``edit``; yields the row
    indices of each batch with its scores (``scorer``'s result: by default the targets'
    :class:`~remedi.tokens.ContinuationScores`).

    Rows that mention a subject and rows that do not go into separate batches, so every batch
    with subjects carries their token spans, located by :func:`remedi.tokens.subject_char_span`
    (at the template's ``{}`` where the row knows it) for the edit context to use.
    """
    groups = [
        [i for i, r in enumerate(rows) if r.subject is not None],
        [i for i, r in enumerate(rows) if r.subject is None],
    ]
    for group in groups:
        for start in range(0, len(group), batch_size):
            indices = group[start : start + batch_size]
            chunk = [rows[i] for i in indices]
            with_subject = chunk[0].subject is not None
            batch = encode_continuations(
                tokenizer,
                [r.prompt for r in chunk],
                [r.target for r in chunk],
                subjects=[str(r.subject) for r in chunk] if with_subject else None,
                subject_starts=[r.subject_start for r in chunk] if with_subject else None,
            )
            context = nullcontext() if edit is None else edit(batch, chunk)
            with torch.no_grad(), context:
                scores = scorer(model, batch)
            yield indices, scores


def renumbered(edit: EditContext | None, kept: Sequence[int]) -> EditContext | None:
    """``edit`` for rows numbered among a subset of its cases: row ``case_index`` ``j`` is case
    ``kept[j]`` of the edit (unchanged when ``kept`` is ``0..n-1``)."""
    if edit is None or list(kept) == list(range(len(kept))):
        return edit
    inner = edit

    def context(batch: ContinuationBatch, rows: Sequence[ScoredRow]) -> Any:
        moved = [replace(row, case_index=kept[row.case_index]) for row in rows]
        return inner(batch, moved)

    return context
