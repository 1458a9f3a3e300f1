"""Readers of REMEDI's attribute datasets as plain data: Bias in Bios bios and McRae feature
norms turned into :class:`~remedi.editors.RemediExample` s, and their seeded splits. The
Lightning data modules (``datamodules.attribute_data``) and REMEDI's own evaluations
(:mod:`remedi.evaluation.tasks`) both read through these."""

from __future__ import annotations

import csv
import pickle
import random
import re
from pathlib import Path
from typing import Any

from remedi.data.cases import RemediExample

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_three(
    items: list[RemediExample], n_val: int | None, n_test: int | None, seed: int
) -> tuple[list[RemediExample], list[RemediExample], list[RemediExample]]:
    """Seeded train/validation/test split by entity (10 % each for validation and test by
    default): an entity's examples all go to one split, so no concept or person of the test
    split is trained on. The entities are shuffled and taken whole, test first, until a split
    holds at least its ``n`` examples (exactly ``n`` when each entity has one example)."""
    groups: dict[str, list[RemediExample]] = {}
    for item in items:
        groups.setdefault(item.entity, []).append(item)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    n_val = n_val if n_val is not None else max(1, len(items) // 10)
    n_test = n_test if n_test is not None else max(1, len(items) // 10)
    if n_val + n_test >= len(items):
        raise ValueError(f"n_val + n_test = {n_val + n_test} leaves no training examples")
    splits: list[list[RemediExample]] = [[], []]
    taken = 0
    for split, wanted in ((splits[0], n_val), (splits[1], n_test)):
        while len(split) < wanted and taken < len(order):
            split.extend(order[taken])
            taken += 1
    train = [item for group in order[taken:] for item in group]
    if not train:
        raise ValueError(f"n_val + n_test = {n_val + n_test} leaves no training entity")
    return train, splits[0], splits[1]


_PLAIN_GLOBALS = frozenset(
    (module, name) for module in ("builtins", "__builtin__") for name in ("set", "frozenset")
)
"""The only globals a plain-data pickle names: the set types (``__builtin__`` in protocol 2)."""


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles plain data only: any class or function a pickle names (which unpickling would
    import and may call) is refused, except the builtin set types."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PLAIN_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refused to unpickle {module}.{name}: only plain data (lists, dicts, strings, "
            "numbers) is read"
        )


def read_bios(path: str | Path, limit: int | None = None) -> list[RemediExample]:
    """Bias in Bios examples from the pickle the official ``biosbias`` scripts write (see
    ``datamodules.attribute_data.BiasInBiosDataModule``), read as plain data only."""
    try:
        with open(path, "rb") as f:
            records = _PlainDataUnpickler(f).load()
    except pickle.UnpicklingError as err:
        raise ValueError(f"path: {path}: {err}") from err
    if not isinstance(records, list):
        raise ValueError(f"path: {path} does not hold a list of bios")
    examples = []
    for i, rec in enumerate(records[:limit]):
        try:
            name = [str(p) for p in rec["name"] if p]
            entity = f"{name[0]} {name[-1]}" if len(name) > 1 else name[0]
            rest = str(rec["raw"])[int(rec["start_pos"]) :].strip()
            title = str(rec["title"]).replace("_", " ")
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: bio {i}: malformed record ({err})") from err
        sentence = _SENTENCE_END.split(rest, maxsplit=1)[0] if rest else ""
        if not sentence:
            continue
        examples.append(
            RemediExample(
                entity=entity,
                context=f"{entity} {sentence}",
                prompt=f"{entity} has the occupation of",
                target_mediated=title,
                case_id=i,
            )
        )
    return examples


_FEATURE_PREFIXES = (
    ("beh_-_", ""),
    ("inbeh_-_", ""),
    ("eg_-_", "has kinds such as "),
    ("eg_", "has kinds such as "),
)
"""McRae's feature-label prefixes that are markup rather than words, and what replaces them:
``beh_-_``/``inbeh_-_`` mark (in)animate behaviours (``beh_-_flies`` -> "flies"); ``eg_-_``
marks an example kind (``eg_-_cowboy`` -> "has kinds such as cowboy")."""

_NEEDS_COPULA = (
    "a ",
    "an ",
    "associated ",
    "bought ",
    "clothing",
    "dropped ",
    "eaten ",
    "found ",
    "furniture",
    "herded ",
    "hunted ",
    "killed ",
    "king ",
    "launched ",
    "like ",
    "made ",
    "owned ",
    "part ",
    "used ",
    "worn",
)
"""Feature texts that are a noun or participle phrase and need "is" before them (``a_fruit`` ->
"is a fruit", ``used_for_cutting`` -> "is used for cutting", ``worn_by_men`` -> "is worn by
men"); the others start with a verb (has, lives, grows, requires, tastes, ...)."""


def feature_phrase(feature: str) -> str:
    """A McRae feature label as the predicate of a sentence about a concept, its markup cleaned:
    ``has_wings`` -> "has wings", ``a_fruit`` -> "is a fruit", ``beh_-_flies`` -> "flies",
    ``eg_-_cowboy`` -> "has kinds such as cowboy", ``has_units_-_cm`` -> "has units such as cm",
    ``is_furry/fuzzy`` -> "is furry or fuzzy", ``eaten_as_prunes_(dried)`` -> "is eaten as
    prunes", ``different_colours`` -> "comes in different colours", ``symbol_of_peace`` -> "is a
    symbol of peace"."""
    text = feature
    for prefix, replacement in _FEATURE_PREFIXES:
        if text.startswith(prefix):
            text = replacement + text[len(prefix) :]
            break
    text = text.replace("_-_", " such as ")
    text = re.sub(r"_?\([^)]*\)", "", text)
    text = " ".join(text.replace("_", " ").replace("/", " or ").split())
    if text.startswith("different "):
        return f"comes in {text}"
    if text.startswith("symbol"):
        return f"is a {text}"
    if text.startswith(_NEEDS_COPULA):
        return f"is {text}"
    return text


def concept_text(concept: str) -> str:
    """``apple_(fruit)`` -> ``apple``."""
    return re.sub(r"_?\(.*\)$", "", concept).replace("_", " ").strip()


def indefinite(noun: str) -> str:
    """``noun`` with "a" or "an" before it (by its first letter: a heuristic)."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def co_probabilities(
    features_of: dict[str, set[str]], min_co_concepts: int = 2
) -> dict[tuple[str, str], float]:
    """P(prompt feature | context feature) over concepts, for every ordered pair of distinct
    features that co-occur on at least ``min_co_concepts`` concepts: the share of the concepts
    with the first feature that also have the second (REMEDI's co-occurrence probability)."""
    concepts_with: dict[str, int] = {}
    together: dict[tuple[str, str], int] = {}
    for feats in features_of.values():
        for a in feats:
            concepts_with[a] = concepts_with.get(a, 0) + 1
            for b in feats:
                if a != b:
                    together[a, b] = together.get((a, b), 0) + 1
    return {
        pair: count / concepts_with[pair[0]]
        for pair, count in together.items()
        if count >= min_co_concepts
    }


def read_mcrae_features(path: str | Path) -> dict[str, set[str]]:
    """Concept -> its feature labels, from the file."""
    features: dict[str, set[str]] = {}
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f, delimiter="\t")
        missing = {"Concept", "Feature"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        for row in reader:
            features.setdefault(row["Concept"], set()).add(row["Feature"])
    return features


def read_mcrae_frequencies(path: str | Path) -> dict[tuple[str, str], int]:
    """(concept, feature) -> its production frequency (``Prod_Freq``: how many of the 30
    participants listed the feature for the concept); empty when the file lacks the column."""
    found: dict[tuple[str, str], int] = {}
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f, delimiter="\t")
        if "Prod_Freq" not in (reader.fieldnames or []):
            return found
        for row in reader:
            value = (row.get("Prod_Freq") or "").strip()
            if value.isdigit() and int(value) > 0:
                found[row["Concept"], row["Feature"]] = int(value)
    return found


def mcrae_examples(
    features: dict[str, set[str]],
    examples_per_concept: int = 2,
    min_co_prob: float = 0.1,
    min_co_concepts: int = 2,
    seed: int = 0,
) -> list[RemediExample]:
    """REMEDI's McRae entailment examples from the feature norms (see
    ``datamodules.attribute_data.McRaeDataModule`` for how a pair is chosen)."""
    co_prob = co_probabilities(features, min_co_concepts)
    phrases = {f: feature_phrase(f) for feats in features.values() for f in feats}
    pairs = []
    for (context, prompt), p in sorted(co_prob.items()):
        words = phrases[prompt].split()
        if p < min_co_prob or len(words) < 1:
            continue
        if words[-1].lower() in phrases[context].lower().split():
            continue
        pairs.append((context, prompt))
    rng = random.Random(seed)
    examples = []
    for concept in sorted(features):
        own = features[concept]
        eligible = [(c, q) for c, q in pairs if c not in own and q not in own]
        entity = concept_text(concept)
        subject = indefinite(entity)
        for context, prompt in rng.sample(eligible, min(examples_per_concept, len(eligible))):
            *head, target = phrases[prompt].split()
            examples.append(
                RemediExample(
                    entity=entity,
                    context=f"{subject[0].upper()}{subject[1:]} {phrases[context]}.",
                    prompt=" ".join([f"{subject[0].upper()}{subject[1:]}", *head]),
                    target_mediated=target,
                    case_id=f"{concept}|{context}|{prompt}",
                )
            )
    return examples
