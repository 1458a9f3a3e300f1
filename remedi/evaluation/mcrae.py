"""McRae entailment (METHODS.md §1.8): does stating one feature of a concept move the LM's belief
in the features that humans say co-occur with it?

Each example of ``datamodules.McRaeDataModule`` states a *context feature* of a concept that has
neither it nor the prompt feature (``"A crow has a pointed end."``). For every feature g that
co-occurs with the context feature f in McRae's norms, the LM scores g of the concept: the prompt
is ``"A crow"`` followed by g's phrase without its last word, the target that word (the
datamodule's split of a feature), and log p(target) is the sum over its tokens. The human
reference is log P(g | f), the share of McRae's concepts with f that also have g
(:func:`remedi.data.attributes.co_probabilities`). Per example we take the Pearson
correlation between the two over its co-occurring features, and report the mean over examples,
*before* (the unedited LM) and *after* each method:

* ``remedi``: the editor's direction for the context is added at the concept's last token;
* ``prefix``: the context sentence is put before every prompt;
* ``replace``: the concept is replaced by another concept that truly has the context feature
  (seeded choice; :mod:`remedi.methods.replace` is the CounterFact counterpart);
* ``none``: the unedited LM (after = before).

The same is measured for the concept's *original* features (what the norms say it has), as the
paper does to check that the edit keeps what the LM knew: the correlation of the LM's log p of
each original feature with the log of its production frequency (how many of McRae's 30
participants listed it), before and after (``orig_correlation_before``, ``orig_correlation``,
``orig_correlation_change``; at most ``max_co_features`` features, a seeded sample; only when the
norms file has the ``Prod_Freq`` column).

This follows REMEDI's reference (``remedi/benchmarks.py``, ``mcrae_entailment``: per-example
Pearson correlation of summed target log-probs with log co-probabilities, averaged) with these
differences: the co-probability is the share of concepts (the reference weighted each concept by
its production frequencies, Prod_Freq / 30); features are phrased and split by the datamodule
(the reference split after a list of leading words); at most ``max_co_features`` co-occurring
features per example (a seeded sample); the reference's replace baseline for McRae was not
implemented there, ours is. Examples with fewer than three co-occurring features, or whose
scores are constant, have no correlation and are left out of the mean (``n_cases`` counts the
rest).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from remedi.data.attributes import concept_text, feature_phrase, indefinite
from remedi.editors import RemediExample
from remedi.metrics import ScoredRow
from remedi.metrics.rows import EditContext, scored_chunks
from remedi.models import LoadedModel

MCRAE_METHODS = ("none", "prefix", "replace", "remedi")
MCRAE_METRIC_NAMES = (
    "co_correlation_before",
    "co_correlation",
    "co_correlation_change",
    "orig_correlation_before",
    "orig_correlation",
    "orig_correlation_change",
)


@dataclass
class EntailmentSample:
    """One example's co-occurring features: prompts about ``entity`` (which starts at character
    ``subject_start`` of each), the target word of each, and log P(feature | context feature)."""

    sample_id: str
    concept: str
    entity: str
    context: str
    context_feature: str
    features: list[str]
    prompts: list[str]
    targets: list[str]
    log_co_probs: list[float]
    subject_start: int
    original_features: list[str] = field(default_factory=list)
    original_prompts: list[str] = field(default_factory=list)
    original_targets: list[str] = field(default_factory=list)
    log_frequencies: list[float] = field(default_factory=list)
    """log Prod_Freq of each original feature."""


def feature_prompt(entity: str, feature: str) -> tuple[str, str, int]:
    """``(prompt, target, subject start)`` stating ``feature`` of ``entity`` as
    ``McRaeDataModule`` does: ``"A crow has a pointed"``, ``"end"``, 2."""
    subject = indefinite(entity)
    subject = subject[0].upper() + subject[1:]
    *head, target = feature_phrase(feature).split()
    return " ".join([subject, *head]), target, len(subject) - len(entity)


def build_samples(
    examples: Sequence[RemediExample],
    features_of: dict[str, set[str]],
    co_prob: dict[tuple[str, str], float],
    max_co_features: int | None = 50,
    seed: int = 0,
    frequencies: dict[tuple[str, str], int] | None = None,
) -> list[EntailmentSample]:
    """An :class:`EntailmentSample` per McRae example (``case_id`` ``"concept|context
    feature|prompt feature"``), with the features that co-occur with its context feature and,
    given production ``frequencies`` per (concept, feature), the concept's own features."""
    by_context: dict[str, list[tuple[str, float]]] = {}
    for (first, second), p in sorted(co_prob.items()):
        by_context.setdefault(first, []).append((second, p))
    samples = []
    for example in examples:
        concept, context_feature, _ = str(example.case_id).split("|", 2)
        if concept not in features_of:
            raise ValueError(f"example {example.case_id}: concept {concept!r} is not in the norms")
        co = by_context.get(context_feature, [])
        if max_co_features is not None and len(co) > max_co_features:
            co = random.Random(f"{seed}:{example.case_id}").sample(co, max_co_features)
        entity = concept_text(concept)
        stated = [feature_prompt(entity, feature) for feature, _ in co]
        own = sorted(f for f in features_of[concept] if (frequencies or {}).get((concept, f)))
        if max_co_features is not None and len(own) > max_co_features:
            own = random.Random(f"{seed}:own:{example.case_id}").sample(own, max_co_features)
        own_stated = [feature_prompt(entity, feature) for feature in own]
        samples.append(
            EntailmentSample(
                sample_id=str(example.case_id),
                concept=concept,
                entity=entity,
                context=example.context,
                context_feature=context_feature,
                features=[feature for feature, _ in co],
                prompts=[s[0] for s in stated],
                targets=[s[1] for s in stated],
                log_co_probs=[math.log(p) for _, p in co],
                subject_start=(stated or own_stated or [("", "", 0)])[0][2],
                original_features=own,
                original_prompts=[x[0] for x in own_stated],
                original_targets=[x[1] for x in own_stated],
                log_frequencies=[
                    math.log((frequencies or {})[concept, feature]) for feature in own
                ],
            )
        )
    return samples


def replacement(
    sample: EntailmentSample, features_of: dict[str, set[str]], seed: int = 0
) -> str | None:
    """Another concept that truly has the sample's context feature (seeded choice), or None."""
    found = sorted(
        c
        for c, feats in features_of.items()
        if sample.context_feature in feats and c != sample.concept
    )
    return random.Random(f"{seed}:{sample.sample_id}").choice(found) if found else None


def method_rows(
    samples: Sequence[EntailmentSample],
    method: str,
    features_of: dict[str, set[str]] | None = None,
    seed: int = 0,
    original: bool = False,
) -> tuple[list[ScoredRow], list[str | None]]:
    """The rows scoring every sample's co-occurring features (its ``original`` ones instead,
    when asked) under ``method`` (none, prefix, replace, remedi), and per sample the replacing
    concept (replace only). A row's ``case_index`` is its sample's index; rows of ``remedi``
    carry the subject, for the edit."""
    if method not in MCRAE_METHODS:
        raise ValueError(f"method {method!r} must be one of {', '.join(MCRAE_METHODS)}")
    rows: list[ScoredRow] = []
    replaced: list[str | None] = []
    for i, sample in enumerate(samples):
        prompts = sample.original_prompts if original else sample.prompts
        targets = sample.original_targets if original else sample.targets
        features = sample.original_features if original else sample.features
        start, other = sample.subject_start, None
        if method == "replace":
            other = replacement(sample, features_of or {}, seed)
            if other is not None:
                swapped = [feature_prompt(concept_text(other), f) for f in features]
                prompts = [s[0] for s in swapped]
        elif method == "prefix":
            prompts = [f"{sample.context} {p}" for p in prompts]
            start += len(sample.context) + 1
        replaced.append(other)
        if method == "replace" and other is None:
            continue
        subject = sample.entity if method == "remedi" else None
        rows += [
            ScoredRow(i, "paraphrase", p, subject, t, start if subject else None)
            for p, t in zip(prompts, targets, strict=True)
        ]
    return rows, replaced


def feature_log_probs(
    lm: LoadedModel,
    rows: Sequence[ScoredRow],
    edit: EditContext | None = None,
    batch_size: int = 32,
    desc: str = "score features",
) -> list[float]:
    """Summed target-token log-probability of each row, under ``edit`` (with a progress bar)."""
    out = [0.0] * len(rows)
    chunks = scored_chunks(lm.model, lm.tokenizer, rows, edit, batch_size)
    with tqdm(total=len(rows), desc=desc, unit="feature") as bar:
        for indices, scores in chunks:
            for i, value in zip(indices, scores.sum.tolist(), strict=True):
                out[i] = float(value)
            bar.update(len(indices))
    return out


def correlation(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson correlation of ``x`` and ``y``; None with fewer than 3 pairs or a constant side."""
    if len(x) != len(y):
        raise ValueError(f"{len(x)} values against {len(y)}")
    a, b = np.asarray(x, float), np.asarray(y, float)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def sample_correlations(
    samples: Sequence[EntailmentSample],
    rows: Sequence[ScoredRow],
    log_probs: Sequence[float],
    original: bool = False,
) -> list[float | None]:
    """Per sample, the correlation of its rows' log-probs with its log co-probabilities (with
    its original features' log production frequencies, when ``original``); None where it has
    none, e.g. a replace sample without a replacement."""
    grouped: dict[int, list[float]] = {}
    for row, value in zip(rows, log_probs, strict=True):
        grouped.setdefault(row.case_index, []).append(value)
    return [
        correlation(grouped[i], s.log_frequencies if original else s.log_co_probs)
        if i in grouped
        else None
        for i, s in enumerate(samples)
    ]


def mean_change(
    before: Sequence[float | None], after: Sequence[float | None]
) -> tuple[int, float | None, float | None, float | None]:
    """``(n, mean before, mean after, change)`` over the samples that have both values."""
    pairs = [(b, a) for b, a in zip(before, after, strict=True) if b is not None and a is not None]
    mean_before = float(np.mean([b for b, _ in pairs])) if pairs else None
    mean_after = float(np.mean([a for _, a in pairs])) if pairs else None
    change = None if mean_before is None or mean_after is None else mean_after - mean_before
    return len(pairs), mean_before, mean_after, change


def summary_row(
    method: str,
    before: Sequence[float | None],
    after: Sequence[float | None],
    original: tuple[Sequence[float | None], Sequence[float | None]] | None = None,
) -> dict[str, Any]:
    """Mean correlation before and after over the samples that have both, and the change; the
    same for the original features when ``original`` = (before, after) is given."""
    n, mean_before, mean_after, change = mean_change(before, after)
    row: dict[str, Any] = {
        "method": method,
        "n_cases": n,
        "co_correlation_before": mean_before,
        "co_correlation": mean_after,
        "co_correlation_change": change,
    }
    if original is not None:
        _, orig_before, orig_after, orig_change = mean_change(*original)
        row.update(
            orig_correlation_before=orig_before,
            orig_correlation=orig_after,
            orig_correlation_change=orig_change,
        )
    return row
