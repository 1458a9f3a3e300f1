"""Tokenisation helpers: subject token spans from character offsets, prompt+target batches and
log-probabilities of target continuations.

Subject spans come from the tokenizer's character offsets, never from string search on decoded
tokens. A subject filled into a template is located where the template's ``{}`` is
(:func:`fill_template` gives its character offset); only prompts written out in full (paraphrases,
generation prompts) fall back to the subject's first occurrence. Targets are scored as
continuations ``" " + target`` tokenised jointly with the prompt, so the model sees exactly the
tokens it would see in running text. Padding is handled here once.

"First-token" scoring uses the first target token that carries the target's text
(:meth:`ContinuationBatch.first_target_ids`): tokenizers such as Gemma's split ``" 1889"`` into
``'▁', '1', '8', '8', '9'``, and the bare ``'▁'`` is the same token for every number, so scoring
it would make different answers collide. That token is predicted from the prompt followed by the
target's leading text-less tokens (:func:`first_text_token`).
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


def subject_char_span(text: str, subject: str, start: int | None = None) -> tuple[int, int]:
    """Character span of ``subject`` in ``text``: at ``start`` when given (where a template's
    ``{}`` was, see :func:`fill_template`), else its first occurrence. The subject-span helper
    every caller uses, so that a subject whose text also occurs earlier in the prompt is still
    found where it was put."""
    if start is None:
        return char_span(text, subject)
    if not subject:
        raise ValueError("subject is empty")
    if text[start : start + len(subject)] != subject:
        raise ValueError(f"subject {subject!r} is not at character {start} of prompt {text!r}")
    return start, start + len(subject)


def fill_template(template: str, subject: str) -> tuple[str, int]:
    """``(prompt, start)``: ``template`` with its one ``{}`` replaced by ``subject``, and the
    character offset where the subject now starts."""
    if template.count("{}") != 1:
        raise ValueError(f"template {template!r} must contain exactly one '{{}}'")
    start = template.index("{}")
    return template[:start] + subject + template[start + 2 :], start


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
    if not rows:
        raise ValueError("no prompts to encode: the batch is empty")
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


def pad_right(
    rows: Sequence[Sequence[int]], pad_id: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask)`` of token id lists."""
    ids, mask, _ = _pad(rows, 0 if pad_id is None else pad_id, "right")
    return ids, mask


def encode_texts(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask, lengths)`` of plain ``texts``."""
    rows = [list(tokenizer(text)["input_ids"]) for text in texts]
    ids, mask = pad_right(rows, tokenizer.pad_token_id)
    return ids, mask, torch.tensor([len(row) for row in rows])


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


def _starts(subject_starts: Sequence[int | None] | None, n: int) -> Sequence[int | None]:
    if subject_starts is None:
        return [None] * n
    if len(subject_starts) != n:
        raise ValueError(f"{n} subjects but {len(subject_starts)} subject starts")
    return subject_starts


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    subjects: Sequence[str],
    padding_side: PaddingSide = "right",
    subject_starts: Sequence[int | None] | None = None,
) -> PromptBatch:
    """Tokenise prompts and locate each row's subject by character offsets: at
    ``subject_starts[i]`` when given (see :func:`subject_char_span`), else its first occurrence."""
    if len(prompts) != len(subjects):
        raise ValueError(f"{len(prompts)} prompts but {len(subjects)} subjects")
    starts = _starts(subject_starts, len(subjects))
    rows: list[list[int]] = []
    spans: list[TokenSpan] = []
    for prompt, subject, start in zip(prompts, subjects, starts, strict=True):
        ids, offsets = _encode(tokenizer, prompt)
        rows.append(ids)
        spans.append(token_span(offsets, *subject_char_span(prompt, subject, start)))
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
    ``first_text[i]`` is the index (within the target) of the first target token that carries
    the target's text; the tokens before it are bare spaces (Gemma's ``'▁'`` before a digit).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_lengths: torch.Tensor
    target_lengths: torch.Tensor
    target_ids: torch.Tensor
    target_mask: torch.Tensor
    subject_spans: list[TokenSpan] | None = None
    first_text: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> ContinuationBatch:
        return ContinuationBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.prompt_lengths.to(device),
            self.target_lengths.to(device),
            self.target_ids.to(device),
            self.target_mask.to(device),
            self.subject_spans,
            None if self.first_text is None else self.first_text.to(device),
        )

    @property
    def last_prompt_index(self) -> torch.Tensor:
        return self.prompt_lengths - 1

    def target_positions(self) -> torch.Tensor:
        """``[batch, max_target_len]`` positions whose logits predict each target token."""
        steps = torch.arange(self.target_ids.shape[1], device=self.input_ids.device)
        positions = self.prompt_lengths[:, None] - 1 + steps[None, :]
        return torch.minimum(positions, torch.tensor(self.input_ids.shape[1] - 1))

    def first_text_index(self) -> torch.Tensor:
        """``[batch]`` index within each target of its first token that carries text."""
        if self.first_text is None:
            return torch.zeros_like(self.prompt_lengths)
        return self.first_text

    def first_target_ids(self) -> torch.Tensor:
        """``[batch]`` id of each target's first token that carries text: the token that
        "first-token" scoring, training and attribution use."""
        index = self.first_text_index()
        return self.target_ids.gather(1, index[:, None])[:, 0]

    def first_target_positions(self) -> torch.Tensor:
        """``[batch]`` positions whose logits predict :meth:`first_target_ids`: the last prompt
        token, or the last of the target's leading bare tokens."""
        return self.last_prompt_index + self.first_text_index()


def _encode_with_specials(
    tokenizer: PreTrainedTokenizerBase, text: str
) -> tuple[list[int], list[tuple[int, int]], list[int]]:
    enc = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    offsets = [(int(s), int(e)) for s, e in enc["offset_mapping"]]
    return list(enc["input_ids"]), offsets, [int(m) for m in enc["special_tokens_mask"]]


def encode_continuations(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    targets: Sequence[str],
    subjects: Sequence[str] | None = None,
    subject_starts: Sequence[int | None] | None = None,
) -> ContinuationBatch:
    """Tokenise ``prompt + " " + target`` jointly; target tokens are the non-special tokens that
    start at or after the end of the prompt (a bare space token included, even one whose offsets
    a tokenizer trims to zero width). With ``subjects``, also locate each subject in its prompt
    (at ``subject_starts[i]`` when given, see :func:`subject_char_span`)."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    starts = _starts(subject_starts, len(prompts))
    rows: list[list[int]] = []
    prompt_lens: list[int] = []
    target_lens: list[int] = []
    first_text: list[int] = []
    spans: list[TokenSpan] = []
    for i, (prompt, target) in enumerate(zip(prompts, targets, strict=True)):
        if not target.strip():
            raise ValueError(f"target is empty for prompt {prompt!r}")
        text = f"{prompt} {target.strip()}"
        ids, offsets, special = _encode_with_specials(tokenizer, text)
        plain = [j for j in range(len(ids)) if not special[j]]
        after = [j for j in plain if offsets[j][0] >= len(prompt)]
        if not after:
            raise ValueError(f"target {target!r} produced no tokens after prompt {prompt!r}")
        n_prompt = after[0]
        ids, offsets = ids[: plain[-1] + 1], offsets[: plain[-1] + 1]  # drop trailing specials
        carries = [j for j in after if text[offsets[j][0] : offsets[j][1]].strip()]
        rows.append(ids)
        prompt_lens.append(n_prompt)
        target_lens.append(len(ids) - n_prompt)
        first_text.append(carries[0] - n_prompt if carries else 0)
        if subjects is not None:
            span = subject_char_span(prompt, subjects[i], starts[i])
            spans.append(token_span(offsets[:n_prompt], *span))
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
        first_text=torch.tensor(first_text),
    )


def first_text_token(
    tokenizer: PreTrainedTokenizerBase, prompt: str, target: str
) -> tuple[torch.Tensor, int]:
    """``(context ids [1, n], token id)``: the first token of ``" " + target`` that carries its
    text, and the ids it is predicted from (the prompt as tokenised jointly with the target,
    followed by the target's leading bare tokens, if any). Knowledge-neuron attribution and
    causal tracing of a given answer use it."""
    batch = encode_continuations(tokenizer, [prompt], [target])
    end = int(batch.first_target_positions()[0]) + 1
    return batch.input_ids[:, :end], int(batch.first_target_ids()[0])


@dataclass
class ContinuationScores:
    """Log-probabilities of each target token (0 where padded) and their summaries per row.

    ``top1`` (when computed) says whether each target token is the model's most probable next
    token there (teacher forcing); ``first_text`` is :meth:`ContinuationBatch.first_text_index`.
    """

    token_logprobs: torch.Tensor
    mask: torch.Tensor
    top1: torch.Tensor | None = None
    first_text: torch.Tensor | None = None

    @property
    def sum(self) -> torch.Tensor:
        return self.token_logprobs.sum(-1)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.mask.sum(-1)

    @property
    def first(self) -> torch.Tensor:
        """Log-probability of each target's first token that carries text (given the bare
        tokens before it, if any)."""
        if self.first_text is None:
            return self.token_logprobs[:, 0]
        index = self.first_text.to(self.token_logprobs.device)
        return self.token_logprobs.gather(1, index[:, None])[:, 0]

    @property
    def mean_prob(self) -> torch.Tensor:
        """``exp(mean token log-prob)``: the CounterFact probability of a continuation."""
        return self.mean.exp()

    @property
    def token_accuracy(self) -> torch.Tensor:
        """Per row, the share of target tokens that are the top-1 prediction under teacher
        forcing (the zsRE accuracy of ROME, MEMIT and MEND)."""
        if self.top1 is None:
            raise ValueError("these scores were computed without top-1 predictions")
        hits = (self.top1 & self.mask).float().sum(-1)
        return hits / self.mask.float().sum(-1)


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
    top1 = (logprobs.argmax(-1) == batch.target_ids) & batch.target_mask
    mask = batch.target_mask
    return ContinuationScores(token_lp * mask, mask, top1, batch.first_text)


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
    that predict real (unpadded) target tokens, :data:`SCORE_CHUNK` at a time. Also records
    whether each target token is the top-1 prediction (``top1``)."""
    device = next(model.parameters()).device
    batch = batch.to(device)
    hidden = final_hidden(model, batch.input_ids, batch.attention_mask)
    rows, cols = batch.target_mask.nonzero(as_tuple=True)
    states = hidden[rows, batch.target_positions()[rows, cols]]
    ids = batch.target_ids[rows, cols]
    values, hits = [], []
    for start in range(0, len(ids), SCORE_CHUNK):
        logits = unembed(model, states[start : start + SCORE_CHUNK]).float()
        chunk_ids = ids[start : start + SCORE_CHUNK]
        values.append(token_logprobs(logits, chunk_ids))
        hits.append(logits.argmax(-1) == chunk_ids)
    token_lp = torch.zeros(batch.target_mask.shape, device=device, dtype=torch.float32)
    top1 = torch.zeros(batch.target_mask.shape, device=device, dtype=torch.bool)
    if values:
        token_lp = token_lp.index_put((rows, cols), torch.cat(values))
        top1 = top1.index_put((rows, cols), torch.cat(hits))
    return ContinuationScores(token_lp, batch.target_mask, top1, batch.first_text)


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


def generate_new_tokens(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    batch: PromptBatch,
    max_new_tokens: int,
    **generate_kwargs: object,
) -> torch.Tensor:
    """The ids ``[rows, new]`` that ``model.generate`` appends to each (left-padded) prompt of
    ``batch``."""
    out = model.generate(  # type: ignore[operator]
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        **generate_kwargs,
    )
    return out[:, batch.input_ids.shape[1] :]


def decode_rows(
    tokenizer: PreTrainedTokenizerBase, ids: torch.Tensor, keep: Sequence[int] | None = None
) -> list[str]:
    """Each row of ``ids`` decoded without special tokens; with ``keep``, only the first
    ``keep[i]`` ids of row ``i``."""
    if keep is None:
        rows = list(ids)
    else:
        if len(keep) != len(ids):
            raise ValueError(f"{len(ids)} rows but {len(keep)} counts to keep")
        rows = [row[:n] for row, n in zip(ids, keep, strict=True)]
    return [str(t) for t in tokenizer.batch_decode(rows, skip_special_tokens=True)]


def generate_continuations(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    batch: PromptBatch,
    max_new_tokens: int,
    **generate_kwargs: object,
) -> list[str]:
    """The decoded new tokens ``model.generate`` appends to each (left-padded) prompt of
    ``batch``."""
    ids = generate_new_tokens(model, tokenizer, batch, max_new_tokens, **generate_kwargs)
    return decode_rows(tokenizer, ids)


@torch.no_grad()
def generate_text(lm: Any, prompt: str, max_new_tokens: int = 20, **generate_kwargs: object) -> str:
    """The continuation ``lm`` (a :class:`~remedi.models.LoadedModel`) generates after
    ``prompt``: greedy unless ``generate_kwargs`` say otherwise; the new text only."""
    ids = lm.tokenizer([prompt], return_tensors="pt").to(lm.device)
    kwargs: dict[str, object] = {"do_sample": False, **generate_kwargs}
    out = lm.model.generate(
        **ids, max_new_tokens=max_new_tokens, pad_token_id=lm.tokenizer.pad_token_id, **kwargs
    )
    return str(lm.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
