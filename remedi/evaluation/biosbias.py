"""Bias in Bios generation (METHODS.md §1.8): can REMEDI make the LM state a person's occupation
from a sentence of their bio that does not name it?

Examples come from ``datamodules.BiasInBiosDataModule`` (entity "First Last", context = the
entity and the bio's sentence after the occupation sentence, prompt "{entity} has the occupation
of", target the occupation). Two settings, as in REMEDI's reference
(``scripts/eval_bias_gen.py``, ``remedi/benchmarks.py``, ``biosbias_error_correction``):
*decontextual*, the prompt alone; *contextual*, the context, a blank line, then the prompt (the
entity's mention in the prompt is the one edited). Methods: ``none`` (the LM alone) and
``remedi`` (the editor's direction for the context added at the entity's last token, on the
prompt pass only).

Metrics per method and setting: top-1 and top-k (k = 3) occupation accuracy, ranking every
occupation of the data by the log-probability of its first token that carries text after the
prompt; fluency, the weighted bi/trigram entropy of a top-k = 5 sample of ``max_new_tokens``
new tokens (:func:`remedi.metrics.text_entropy`); consistency, the tf-idf cosine between the
sample and the mean tf-idf vector of the reference texts of the true occupation.

Differences from the reference: the reference texts are the contexts (one bio sentence) of the
other examples with that occupation, not whole bios, and the example's own is left out; the
tf-idf vectoriser is fitted on all the examples' contexts (scikit-learn defaults); samples have
``max_new_tokens`` new tokens (the reference: 150 tokens in all, prompt included).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch
from sklearn.feature_extraction.text import TfidfVectorizer

from remedi.editors import Editor, RemediExample, apply_editor, attribute_states
from remedi.metrics import text_entropy
from remedi.models import LoadedModel
from remedi.tokens import (
    PromptBatch,
    decode_rows,
    encode_continuations,
    encode_prompts,
    generate_new_tokens,
    next_token_logits,
)

SETTINGS = ("contextual", "decontextual")
BIOS_METHODS = ("none", "remedi")
BIOS_METRIC_NAMES = ("top1_accuracy", "topk_accuracy", "fluency", "consistency")


def setting_prompt(example: RemediExample, setting: str) -> tuple[str, int]:
    """``(prompt, entity start)`` of an example in a setting (the entity opens the prompt)."""
    if setting == "decontextual":
        return example.prompt, example.prompt.index(example.entity)
    if setting == "contextual":
        prefix = f"{example.context}\n\n"
        return prefix + example.prompt, len(prefix) + example.prompt.index(example.entity)
    raise ValueError(f"setting {setting!r} must be one of {', '.join(SETTINGS)}")


def label_token_ids(lm: LoadedModel, prompt: str, labels: Sequence[str]) -> torch.Tensor:
    """The first token that carries text of each label, continuing ``prompt``."""
    batch = encode_continuations(lm.tokenizer, [prompt] * len(labels), list(labels))
    return batch.first_target_ids()


class Consistency:
    """tf-idf cosine between a text and the mean tf-idf vector of the references of an
    occupation, the text's own example (same ``case_id``) left out."""

    def __init__(self, examples: Sequence[RemediExample]) -> None:
        contexts = [e.context for e in examples]
        self.vectorizer = TfidfVectorizer().fit(contexts)
        rows = self.vectorizer.transform(contexts)
        self.rows = rows
        self.index = {e.case_id: i for i, e in enumerate(examples)}
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, int] = {}
        for i, e in enumerate(examples):
            label = str(e.target_mediated)
            self.sums[label] = rows[i] if label not in self.sums else self.sums[label] + rows[i]
            self.counts[label] = self.counts.get(label, 0) + 1

    def __call__(self, text: str, example: RemediExample) -> float | None:
        """Consistency of ``text`` with ``example``'s occupation; None without other references."""
        label = str(example.target_mediated)
        own = self.index.get(example.case_id)
        count = self.counts.get(label, 0) - (own is not None)
        if count <= 0:
            return None
        total = self.sums[label] - (self.rows[own] if own is not None else 0)
        reference = np.asarray(total.todense()).ravel() / count
        vector = np.asarray(self.vectorizer.transform([text]).todense()).ravel()
        norms = float(np.linalg.norm(reference) * np.linalg.norm(vector))
        return float(reference @ vector / norms) if norms > 0 else 0.0


def _edit(
    lm: LoadedModel,
    layer: int | None,
    editor: Editor | None,
    attributes: torch.Tensor | None,
    batch: PromptBatch,
    prompt_pass_only: bool,
    alpha: float = 1.0,
) -> AbstractContextManager[object]:
    if editor is None or attributes is None or layer is None:
        return nullcontext()
    positions = batch.subject_last
    return apply_editor(lm, layer, editor, attributes, positions, prompt_pass_only, alpha=alpha)


@torch.no_grad()
def evaluate_setting(
    lm: LoadedModel,
    examples: Sequence[RemediExample],
    setting: str,
    labels: Sequence[str],
    consistency: Consistency,
    editor: Editor | None = None,
    layer: int | None = None,
    top_k: int = 3,
    max_new_tokens: int = 100,
    batch_size: int = 16,
    seed: int = 0,
    alpha: float = 1.0,
) -> list[dict[str, Any]]:
    """Per example: the top-k occupations, whether the first / any of them is right, the
    sample and its fluency and consistency (with ``editor``: under REMEDI's edit at ``layer``,
    its directions times ``alpha``)."""
    if editor is not None:
        editor.eval()
    prompts = [setting_prompt(e, setting) for e in examples]
    ids = label_token_ids(lm, examples[0].prompt, labels).to(lm.device) if examples else None
    records: list[dict[str, Any]] = []
    for first in range(0, len(examples), batch_size):
        chunk = list(examples[first : first + batch_size])
        texts = [p[0] for p in prompts[first : first + batch_size]]
        starts = [p[1] for p in prompts[first : first + batch_size]]
        entities = [e.entity for e in chunk]
        batch = encode_prompts(lm.tokenizer, texts, entities, "left", starts).to(lm.device)
        attributes = None
        if editor is not None and layer is not None:
            attributes = attribute_states(lm, layer, [e.context for e in chunk], entities)
        with _edit(lm, layer, editor, attributes, batch, False, alpha):
            logits = next_token_logits(lm.model, batch.input_ids, batch.attention_mask).float()
        assert ids is not None
        label_logp = torch.log_softmax(logits, -1)[:, ids]
        k = min(top_k, len(labels))
        top = label_logp.topk(k, -1).indices.tolist()
        devices = [lm.device] if lm.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed + first)
            with _edit(lm, layer, editor, attributes, batch, True, alpha):
                new = generate_new_tokens(
                    lm.model,
                    lm.tokenizer,
                    batch,
                    max_new_tokens,
                    do_sample=True,
                    top_k=5,
                    top_p=1.0,
                    temperature=1.0,
                    min_new_tokens=max_new_tokens,
                )
        samples = decode_rows(lm.tokenizer, new)
        for example, ranked, sample in zip(chunk, top, samples, strict=True):
            predicted = [labels[j] for j in ranked]
            records.append(
                {
                    "case_id": example.case_id,
                    "setting": setting,
                    "target": example.target_mediated,
                    "predictions": predicted,
                    "top1_correct": predicted[0] == example.target_mediated,
                    "topk_correct": example.target_mediated in predicted,
                    "generation": sample,
                    "fluency": text_entropy(sample),
                    "consistency": consistency(sample, example),
                }
            )
    return records


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """Mean of each metric over the records that have it."""

    def mean(values: list[float]) -> float | None:
        return float(np.mean(values)) if values else None

    return {
        "top1_accuracy": mean([float(r["top1_correct"]) for r in records]),
        "topk_accuracy": mean([float(r["topk_correct"]) for r in records]),
        "fluency": mean([r["fluency"] for r in records]),
        "consistency": mean([r["consistency"] for r in records if r["consistency"] is not None]),
    }
