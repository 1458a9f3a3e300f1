"""Tokenisation helpers: subject token spans from character offsets, prompt+target batches and
log-probabilities of target continuations.

Subject spans come from the tokenizer's character offsets, never from string search on decoded
tokens. Targets are scored as continuations ``" " + target`` tokenised jointly with the prompt,
so the model sees exactly the tokens it would see in running text. Padding is handled here once.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

PaddingSide = Literal["left", "right"]


@dataclass(frozen=True)
class TokenSpan:
    """Token positions ``[start, end)`` of a substring within a (padded) row."""

    start: int
    end: int

    @property
    def first(self) -> int:
        return self.start

    @property
    def last(self) -> int:
        return self.end - 1

    @property
    def all(self) -> list[int]:
        return list(range(self.start, self.end))

    def shifted(self, by: int) -> TokenSpan:
        return TokenSpan(self.start + by, self.end + by)


def char_span(text: str, substring: str, field: str = "subject") -> tuple[int, int]:
    """Character span of the first ``substring`` in ``text``; a clear error if it is absent."""
    if not substring:
        raise ValueError(f"{field} is empty")
    start = text.find(substring)
    if start < 0:
        raise ValueError(f"{field} {substring!r} does not occur in prompt {text!r}")
    return start, start + len(substring)


def token_span(offsets: Sequence[tuple[int, int]], start: int, end: int) -> TokenSpan:
    """Tokens whose character offsets overlap ``[start, end)`` (zero-width specials never do)."""
    hits = [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]
    if not hits:
        raise ValueError(f"no token covers characters [{start}, {end})")
    return TokenSpan(hits[0], hits[-1] + 1)


def _encode(
    tokenizer: PreTrainedTokenizerBase, text: str
) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, return_offsets_mapping=True)
    return list(enc["input_ids"]), [(int(s), int(e)) for s, e in enc["offset_mapping"]]


def _pad(
    rows: Sequence[Sequence[int]], pad_id: int, side: PaddingSide
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Pad id lists into ``(input_ids, attention_mask, shift per row)``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    shifts = []
    for i, row in enumerate(rows):
        shift = width - len(row) if side == "left" else 0
        ids[i, shift : shift + len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, shift : shift + len(row)] = 1
        shifts.append(shift)
    return ids, mask, shifts


@dataclass
class PromptBatch:
    """Padded prompts with the subject's token span and the last real token of each row."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    subject_spans: list[TokenSpan]
    last_index: torch.Tensor

    def to(self, device: torch.device | str) -> PromptBatch:
        return PromptBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.subject_spans,
            self.last_index.to(device),
        )

    @property
    def subject_last(self) -> torch.Tensor:
        return torch.tensor([s.last for s in self.subject_spans], device=self.input_ids.device)


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    subjects: Sequence[str],
    padding_side: PaddingSide = "right",
) -> PromptBatch:
    """Tokenise prompts and locate each row's subject (first occurrence) by character offsets."""
    if len(prompts) != len(subjects):
        raise ValueError(f"{len(prompts)} prompts but {len(subjects)} subjects")
    rows: list[list[int]] = []
    spans: list[TokenSpan] = []
    for prompt, subject in zip(prompts, subjects, strict=True):
        ids, offsets = _encode(tokenizer, prompt)
        rows.append(ids)
        spans.append(token_span(offsets, *char_span(prompt, subject)))
    input_ids, mask, shifts = _pad(rows, tokenizer.pad_token_id, padding_side)
    return PromptBatch(
        input_ids=input_ids,
        attention_mask=mask,
        subject_spans=[s.shifted(sh) for s, sh in zip(spans, shifts, strict=True)],
        last_index=torch.tensor([sh + len(r) - 1 for sh, r in zip(shifts, rows, strict=True)]),
    )


@dataclass
class ContinuationBatch:
    """Right-padded ``prompt + " " + target`` rows.

    ``prompt_lengths[i]`` tokens of row ``i`` are prompt; the next ``target_lengths[i]`` are
    the target, whose ids are also in ``target_ids`` (padded with 0, see ``target_mask``).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_lengths: torch.Tensor
    target_lengths: torch.Tensor
    target_ids: torch.Tensor
    target_mask: torch.Tensor
    subject_spans: list[TokenSpan] | None = None

    def to(self, device: torch.device | str) -> ContinuationBatch:
        return ContinuationBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.prompt_lengths.to(device),
            self.target_lengths.to(device),
            self.target_ids.to(device),
            self.target_mask.to(device),
            self.subject_spans,
        )

    @property
    def last_prompt_index(self) -> torch.Tensor:
        return self.prompt_lengths - 1

    def target_positions(self) -> torch.Tensor:
        """``[batch, max_target_len]`` positions whose logits predict each target token."""
        steps = torch.arange(self.target_ids.shape[1], device=self.input_ids.device)
        positions = self.prompt_lengths[:, None] - 1 + steps[None, :]
        return torch.minimum(positions, torch.tensor(self.input_ids.shape[1] - 1))


def encode_continuations(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    targets: Sequence[str],
    subjects: Sequence[str] | None = None,
) -> ContinuationBatch:
    """Tokenise ``prompt + " " + target`` jointly; target tokens are those starting at or after
    the end of the prompt. With ``subjects``, also locate each subject in its prompt."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    rows: list[list[int]] = []
    prompt_lens: list[int] = []
    target_lens: list[int] = []
    spans: list[TokenSpan] = []
    for i, (prompt, target) in enumerate(zip(prompts, targets, strict=True)):
        if not target.strip():
            raise ValueError(f"target is empty for prompt {prompt!r}")
        ids, offsets = _encode(tokenizer, f"{prompt} {target.strip()}")
        real = [j for j, (s, e) in enumerate(offsets) if e > s]
        after = [j for j in real if offsets[j][0] >= len(prompt)]
        if not after:
            raise ValueError(f"target {target!r} produced no tokens after prompt {prompt!r}")
        n_prompt = after[0]
        ids, offsets = ids[: real[-1] + 1], offsets[: real[-1] + 1]  # drop trailing specials
        rows.append(ids)
        prompt_lens.append(n_prompt)
        target_lens.append(len(ids) - n_prompt)
        if subjects is not None:
            spans.append(token_span(offsets[:n_prompt], *char_span(prompt, subjects[i])))
    input_ids, mask, _ = _pad(rows, tokenizer.pad_token_id, "right")
    target_ids = torch.zeros((len(rows), max(target_lens)), dtype=torch.long)
    target_mask = torch.zeros_like(target_ids, dtype=torch.bool)
    for i, (row, n_p, n_t) in enumerate(zip(rows, prompt_lens, target_lens, strict=True)):
        target_ids[i, :n_t] = torch.tensor(row[n_p:], dtype=torch.long)
        target_mask[i, :n_t] = True
    return ContinuationBatch(
        input_ids=input_ids,
        attention_mask=mask,
        prompt_lengths=torch.tensor(prompt_lens),
        target_lengths=torch.tensor(target_lens),
        target_ids=target_ids,
        target_mask=target_mask,
        subject_spans=spans if subjects is not None else None,
    )


@dataclass
class ContinuationScores:
    """Log-probabilities of each target token (0 where padded) and their summaries per row."""

    token_logprobs: torch.Tensor
    mask: torch.Tensor

    @property
    def sum(self) -> torch.Tensor:
        return self.token_logprobs.sum(-1)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.mask.sum(-1)

    @property
    def first(self) -> torch.Tensor:
        return self.token_logprobs[:, 0]

    @property
    def mean_prob(self) -> torch.Tensor:
        """``exp(mean token log-prob)``: the CounterFact probability of a continuation."""
        return self.mean.exp()


def final_hidden(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Final (normalised) hidden states of a causal LM's body, without the unembedding."""
    body: nn.Module = model.base_model  # type: ignore[assignment]
    out = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


def unembed(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token logits of final hidden states, softcapped where the model softcaps them.

    Applying this only at the positions that matter avoids full-vocabulary logits at every
    position (262k entries per token for Gemma).
    """
    head: nn.Module = model.get_output_embeddings()  # type: ignore[operator]
    logits: torch.Tensor = head(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _at_targets(states: torch.Tensor, batch: ContinuationBatch) -> torch.Tensor:
    """``states[b, t]`` at the positions that predict each target token: ``[b, max_target, d]``."""
    positions = batch.target_positions()
    return states.gather(1, positions[..., None].expand(-1, -1, states.shape[-1]))


def _scores(target_logits: torch.Tensor, batch: ContinuationBatch) -> ContinuationScores:
    logprobs = torch.log_softmax(target_logits.float(), dim=-1)
    token_lp = logprobs.gather(-1, batch.target_ids[..., None]).squeeze(-1)
    return ContinuationScores(token_lp * batch.target_mask, batch.target_mask)


def continuation_logprobs(logits: torch.Tensor, batch: ContinuationBatch) -> ContinuationScores:
    """Score a batch's targets from full logits ``[batch, seq, vocab]`` of ``batch.input_ids``."""
    return _scores(_at_targets(logits, batch), batch)


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[ids]`` per row of ``[n, vocab]`` logits, without a full
    log-softmax array."""
    return logits.gather(1, ids[:, None])[:, 0] - logits.logsumexp(-1)


SCORE_CHUNK = 64
"""Target tokens unembedded at once when scoring: bounds memory to a few ``[64, vocab]`` arrays."""


def score_continuations(model: nn.Module, batch: ContinuationBatch) -> ContinuationScores:
    """Run ``model`` once on ``batch`` and score its targets, unembedding only the positions
    that predict real (unpadded) target tokens, :data:`SCORE_CHUNK` at a time."""
    device = next(model.parameters()).device
    batch = batch.to(device)
    hidden = final_hidden(model, batch.input_ids, batch.attention_mask)
    rows, cols = batch.target_mask.nonzero(as_tuple=True)
    states = hidden[rows, batch.target_positions()[rows, cols]]
    ids = batch.target_ids[rows, cols]
    values = []
    for start in range(0, len(ids), SCORE_CHUNK):
        logits = unembed(model, states[start : start + SCORE_CHUNK]).float()
        values.append(token_logprobs(logits, ids[start : start + SCORE_CHUNK]))
    token_lp = torch.zeros(batch.target_mask.shape, device=device, dtype=torch.float32)
    if values:
        token_lp = token_lp.index_put((rows, cols), torch.cat(values))
    return ContinuationScores(token_lp, batch.target_mask)


def cache_kwargs(model: nn.Module, cache: Any) -> dict[str, Any]:
    """The keyword that hands a key/value cache to ``model``'s forward: ``cache`` where
    transformers has it (5.2x renamed ``past_key_values``, which now warns on every call), else
    ``past_key_values``."""
    forward = type(model).forward
    name = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
    return {name: cache}


def returned_cache(output: Any) -> Any:
    """The key/value cache a forward pass returned (``cache``; before 5.2x ``past_key_values``)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def next_token_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    cache: Any = None,
) -> torch.Tensor:
    """Logits ``[batch, vocab]`` at one position per row (default: the last column).

    Runs the model's base transformer and applies the unembedding to those positions only, as a
    plain 2-D matrix product; this is several times faster on CPU than ``logits_to_keep`` for
    large vocabularies and keeps gradients. Final-logit soft-capping (Gemma 2) is applied.
    ``cache`` continues a prompt whose earlier tokens are cached (and is extended).
    """
    body: nn.Module = model.base_model  # type: ignore[assignment]
    out = body(
        input_ids=input_ids,
        attention_mask=attention_mask,
        use_cache=cache is not None,
        **cache_kwargs(body, cache),
    )
    hidden = out.last_hidden_state
    if positions is None:
        last = hidden[:, -1]
    else:
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), positions]
    return unembed(model, last)


def prefix_cache(model: nn.Module, prefix: torch.Tensor) -> Any:
    """Key/value cache of running ``prefix`` (``[rows, n]``), to continue it without recomputing."""
    body: nn.Module = model.base_model  # type: ignore[assignment]
    with torch.no_grad():
        return returned_cache(body(input_ids=prefix, use_cache=True))


def repeat_cache(cache: Any, repeats: int) -> Any:
    """A copy of ``cache`` with each row repeated ``repeats`` times (row ``r`` of the copy holds
    row ``r // repeats`` of the original)."""
    own = copy.deepcopy(cache)
    own.batch_repeat_interleave(repeats)
    return own


def top_prediction(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str
) -> tuple[str, float]:
    """The decoded top-1 next token after ``prompt`` (as the tokenizer spells it, e.g. with its
    leading space) and its probability."""
    device = next(model.parameters()).device
    ids = tokenizer([prompt], return_tensors="pt")["input_ids"].to(device)
    with torch.no_grad():
        probs = torch.softmax(next_token_logits(model, ids)[0].float(), -1)
    token = int(probs.argmax())
    return str(tokenizer.decode([token])), float(probs[token])


def top_token(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The decoded top-1 next token after ``prompt`` (see :func:`top_prediction`)."""
    return top_prediction(model, tokenizer, prompt)[0]


def generate_continuations(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    batch: PromptBatch,
    max_new_tokens: int,
    **generate_kwargs: object,
) -> list[str]:
    """The decoded new tokens ``model.generate`` appends to each (left-padded) prompt of
    ``batch``."""
    out = model.generate(  # type: ignore[operator]
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        **generate_kwargs,
    )
    new_tokens = out[:, batch.input_ids.shape[1] :]
    return [str(t) for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
