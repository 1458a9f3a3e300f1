"""What an edit costs the model elsewhere: the perplexity of a fixed held-out text under the edit,
divided by the unedited model's (``perplexity_ratio``; 1 means untouched).

The text is a file the user names (e.g. the WikiText-2 test file) or, by default, a short
built-in passage of plain English prose that mentions no fact the benchmarks edit. Its first
``n_tokens`` tokens are cut into windows of ``window`` tokens and scored in one batch; an edit that
lives in the input reads them after its statement (only the text's own tokens are scored).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from remedi.models import LoadedModel, max_positions
from remedi.tokens import final_hidden, token_logprobs, unembed

BUILTIN_TEXT = "builtin"
"""The name of the built-in passage (``remedi/data/builtin/heldout_text.txt``)."""


@dataclass(frozen=True)
class HeldoutText:
    """Where the held-out text comes from and how much of it is scored."""

    source: str = BUILTIN_TEXT
    n_tokens: int = 256
    window: int = 256

    def describe(self) -> str:
        """``SOURCE (N tokens)`` for the protocol."""
        return f"{self.source} ({self.n_tokens:,} tokens)"


def read_text(source: str) -> str:
    """The text of ``source``: the built-in passage or a UTF-8 file."""
    if source == BUILTIN_TEXT:
        return resources.files("remedi.data").joinpath("builtin/heldout_text.txt").read_text()
    return Path(source).read_text(encoding="utf-8", errors="replace")


def windows(lm: LoadedModel, text: HeldoutText) -> list[list[int]]:
    """The token ids of the text's windows (its first ``n_tokens`` tokens; fewer when the text
    is shorter)."""
    ids = lm.tokenizer(read_text(text.source), add_special_tokens=False)["input_ids"]
    ids = ids[: text.n_tokens]
    if len(ids) < 2:
        raise ValueError(f"held-out text {text.source}: fewer than 2 tokens")
    window = min(text.window, max_positions(lm) // 2)
    return [ids[i : i + window] for i in range(0, len(ids), window)]


@torch.no_grad()
def perplexity(lm: LoadedModel, chunks: list[list[int]], prefix: str = "") -> float:
    """exp(mean negative log-likelihood) of the tokens of ``chunks``, each read after ``prefix``
    (text the edit puts before every input; its own tokens are not scored), BOS first where the
    tokenizer adds one. A window that would not fit after the prefix in the model's positions
    is cut to fit."""
    tokenizer = lm.tokenizer
    head = tokenizer(prefix)["input_ids"] if prefix else tokenizer("")["input_ids"]
    room = max(2, max_positions(lm) - len(head))
    rows = [head + chunk[:room] for chunk in chunks]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    ids, mask = ids.to(lm.device), mask.to(lm.device)
    hidden = final_hidden(lm.model, ids, mask)
    total, count = 0.0, 0
    for i, row in enumerate(rows):
        start = max(len(head), 1)
        positions = torch.arange(start - 1, len(row) - 1, device=lm.device)
        logits = unembed(lm.model, hidden[i, positions]).float()
        targets = ids[i, start : len(row)]
        total -= float(token_logprobs(logits, targets).sum())
        count += len(targets)
    return math.exp(total / count)
