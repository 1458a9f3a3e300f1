"""The locality term of the gradient editors' training (MEND, KE): what an edit must leave alone.

Each edit request brings locality prompts with the answers the unedited LM should keep:
neighbourhood prompts (other subjects with the request's true object, where an edit of the
relation's wording would leak) and unrelated facts (other requests' rewrite prompts with their
true objects). The term is KL(unedited ‖ edited) of the next-token distributions, summed over
the answer's tokens or over every position of the prompt and answer, and averaged over prompts.

The LM is frozen, so the unedited side depends on the text alone: :class:`UneditedStates` holds
the final hidden states of every locality text a training set can draw (the unedited
distributions are their unembedding), computed once before training in a fixed order, so a step
runs the unedited LM on none of them and a resumed run sees the same values as an uninterrupted
one. Large sets are kept in remedi's disk cache (``$REMEDI_CACHE/locality``), so a resumed run,
or another editor trained on the same data, reads them instead of computing them again.
"""

from __future__ import annotations

import hashlib
import logging
import random
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from remedi.atomic import atomic_path
from remedi.data import EditCase
from remedi.editors.gradient import LayerUpdate, apply_updates
from remedi.editors.training import kl_divergence
from remedi.methods.second_moment import UNREADABLE
from remedi.models import LoadedModel
from remedi.models.loading import cache_dir
from remedi.tokens import ContinuationBatch, encode_continuations, final_hidden

log = logging.getLogger(__name__)

LocalityPositions = Literal["answer", "all"]
"""Where the locality KL is taken: at the answer's tokens, or at every position of the
locality prompt and its answer (each position whose next token is in the text)."""


def locality_rows(
    cases: Sequence[EditCase],
    per_case: int,
    unrelated: int = 1,
    draw: str | None = None,
) -> tuple[list[str], list[str], list[int]]:
    """``(prompts, answers, groups)`` of the locality term: up to ``per_case`` neighbourhood
    prompts of each case with their true answers (drawn without replacement from the case's
    prompts, seeded by ``draw`` and the case id, or the first ones when ``draw`` is ``None``)
    and the rewrite prompts of the next ``unrelated`` other cases of the batch with their true
    objects."""
    prompts, answers, groups = [], [], []
    n = len(cases)
    for i, case in enumerate(cases):
        truths = case.neighborhood_targets or [case.target_true] * len(case.neighborhood_prompts)
        pairs = list(zip(case.neighborhood_prompts, truths, strict=True))
        if draw is not None and len(pairs) > per_case:
            seed = zlib.crc32(f"{draw}:{case.case_id}".encode())
            pairs = random.Random(seed).sample(pairs, per_case)
        pairs = pairs[:per_case]
        for k in range(1, min(unrelated, n - 1) + 1):
            other = cases[(i + k) % n]
            pairs.append((other.rewrite_prompt, other.target_true))
        for prompt, answer in pairs:
            prompts.append(prompt)
            answers.append(answer)
            groups.append(i)
    return prompts, answers, groups


def locality_cells(
    batch: ContinuationBatch, where: LocalityPositions
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, cols)`` of the positions whose next-token distribution the term compares."""
    if where == "answer":
        rows, steps = batch.target_mask.nonzero(as_tuple=True)
        return rows, batch.target_positions()[rows, steps]
    if where != "all":
        raise ValueError(f"locality positions {where!r} must be 'answer' or 'all'")
    lengths = batch.attention_mask.sum(-1)
    cols = torch.arange(batch.input_ids.shape[1], device=lengths.device)
    rows, cells = (cols[None, :] < lengths[:, None] - 1).nonzero(as_tuple=True)
    return rows, cells


def states_path(lm: LoadedModel, texts: Sequence[tuple[str, str]], batch_size: int) -> Path:
    """Where the unedited states of ``texts`` are cached for ``lm``."""
    digest = hashlib.sha256()
    dtype = next(lm.model.parameters()).dtype
    digest.update(f"{lm.spec}|{dtype}|{lm.device.type}|{batch_size}".encode())
    for prompt, answer in texts:
        digest.update(f"\0{prompt}\1{answer}".encode())
    return cache_dir() / "locality" / f"{digest.hexdigest()[:24]}.pt"


def training_texts(cases: Sequence[EditCase]) -> list[tuple[str, str]]:
    """Every ``(prompt, answer)`` that :func:`locality_rows` can draw from ``cases`` (each
    case's neighbourhood prompts and rewrite prompt with their true answers), sorted."""
    texts: set[tuple[str, str]] = set()
    for case in cases:
        truths = case.neighborhood_targets or [case.target_true] * len(case.neighborhood_prompts)
        texts.update(zip(case.neighborhood_prompts, truths, strict=True))
        texts.add((case.rewrite_prompt, case.target_true))
    return sorted(texts)


class UneditedStates:
    """Final hidden states of the frozen, unedited LM per locality text (every position of the
    text's tokens), filled once by :meth:`fill`: the unedited distributions of the locality term
    without a second LM pass. Holds about ``tokens × hidden × 4`` bytes."""

    def __init__(self) -> None:
        self._states: dict[tuple[str, str], torch.Tensor] = {}

    def fill(
        self,
        lm: LoadedModel,
        texts: Sequence[tuple[str, str]],
        batch_size: int = 64,
        progress: bool = False,
        cache: bool = False,
    ) -> bool:
        """Compute the states of ``texts`` (in their order, ``batch_size`` at a time), which
        replace any held before: the same texts always give the same values. With ``cache``
        they are read from (or written to) remedi's disk cache, keyed by the model, its dtype
        and device, the batch size and the texts; returns whether they were read from it."""
        self._states.clear()
        path = states_path(lm, texts, batch_size) if cache and texts else None
        if path is not None and self._read(path, texts):
            return True
        self._compute(lm, texts, batch_size, progress)
        if path is not None:
            keys = list(texts)
            with atomic_path(path) as tmp:
                torch.save({"texts": keys, "states": [self._states[k] for k in keys]}, tmp)
        return False

    def _read(self, path: Path, texts: Sequence[tuple[str, str]]) -> bool:
        if not path.is_file():
            return False
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            if [tuple(t) for t in data["texts"]] != list(texts):
                raise ValueError("it holds other texts")
            self._states = {tuple(k): v for k, v in zip(data["texts"], data["states"], strict=True)}
        except UNREADABLE as err:
            log.warning("cached locality states %s are unusable (%s); computing them", path, err)
            self._states.clear()
            return False
        return True

    def _compute(
        self, lm: LoadedModel, texts: Sequence[tuple[str, str]], batch_size: int, progress: bool
    ) -> None:
        starts = range(0, len(texts), batch_size)
        bar = tqdm(starts, desc="unedited locality states", unit="batch", disable=not progress)
        for start in bar:
            chunk = texts[start : start + batch_size]
            batch = encode_continuations(
                lm.tokenizer, [p for p, _ in chunk], [a for _, a in chunk]
            ).to(lm.device)
            lengths = batch.attention_mask.sum(-1).tolist()
            with torch.no_grad():
                hidden = final_hidden(lm.model, batch.input_ids, batch.attention_mask).float()
            for i, key in enumerate(chunk):
                self._states[key] = hidden[i, : lengths[i]].clone()

    def __len__(self) -> int:
        return len(self._states)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._states.values())

    def clear(self) -> None:
        self._states.clear()

    def gather(
        self,
        lm: LoadedModel,
        batch: ContinuationBatch,
        keys: Sequence[tuple[str, str]],
        rows: torch.Tensor,
        cols: torch.Tensor,
    ) -> torch.Tensor:
        """The unedited final hidden states ``[cells, hidden]`` at ``(rows, cols)`` of
        ``batch``, whose row ``i`` is the text ``keys[i]``: held ones from the cache, the rest
        from one unedited pass over ``batch`` (not kept)."""
        if any(key not in self._states for key in keys):
            with torch.no_grad():
                fresh = final_hidden(lm.model, batch.input_ids, batch.attention_mask).float()
        cells = []
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            held = self._states.get(keys[r])
            cells.append(held[c] if held is not None else fresh[r, c])
        if not cells:
            return torch.zeros(0, lm.arch.hidden_size, device=lm.device)
        return torch.stack(cells)


def locality_kl(
    lm: LoadedModel,
    updates: Sequence[LayerUpdate],
    prompts: Sequence[str],
    answers: Sequence[str],
    groups: Sequence[int],
    where: LocalityPositions = "all",
    unedited: UneditedStates | None = None,
) -> torch.Tensor:
    """KL(unedited ‖ edited) summed over the cells of each locality row (``where``) and
    averaged over rows; row ``r`` is edited by group ``groups[r]``'s update. With ``unedited``,
    the unedited states come from (and go into) that cache."""
    batch = encode_continuations(lm.tokenizer, list(prompts), list(answers)).to(lm.device)
    rows, cols = locality_cells(batch, where)
    if unedited is not None:
        keys = list(zip(prompts, answers, strict=True))
        before = unedited.gather(lm, batch, keys, rows, cols)
    else:
        with torch.no_grad():
            before = final_hidden(lm.model, batch.input_ids, batch.attention_mask)[rows, cols]
    with apply_updates(lm, updates, list(groups)):
        after = final_hidden(lm.model, batch.input_ids, batch.attention_mask)[rows, cols]
    return kl_divergence(lm.model, before.to(after.dtype), after) / len(prompts)
