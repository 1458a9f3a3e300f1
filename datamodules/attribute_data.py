"""DataModules for REMEDI's attribute datasets without CounterFact scoring: Bias in Bios and the
McRae feature norms. Their validation and test batches carry examples only (the loss terms are
logged; the CounterFact metrics need counterfactual cases)."""

from __future__ import annotations

import csv
import pickle
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from datamodules.remedi_data import CaseBatch, EditCaseDataModule, ResumableLoader
from remedi.editors import RemediExample

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _split_three(
    items: list[RemediExample], n_val: int | None, n_test: int | None, seed: int
) -> tuple[list[RemediExample], list[RemediExample], list[RemediExample]]:
    """Seeded train/validation/test split (10 % each for validation and test by default)."""
    items = list(items)
    random.Random(seed).shuffle(items)
    n_val = n_val if n_val is not None else max(1, len(items) // 10)
    n_test = n_test if n_test is not None else max(1, len(items) // 10)
    if n_val + n_test >= len(items):
        raise ValueError(f"n_val + n_test = {n_val + n_test} leaves no training examples")
    return items[n_val + n_test :], items[:n_val], items[n_val : n_val + n_test]


class ExampleDataModule(EditCaseDataModule):
    """Base for datasets given directly as :class:`RemediExample` s."""

    def __init__(self, n_val: int | None = None, n_test: int | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.n_val, self.n_test = n_val, n_test
        self._train: list[RemediExample] = []
        self._val: list[RemediExample] = []
        self._test: list[RemediExample] = []

    def read_examples(self) -> list[RemediExample]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if not self._loaded:
            examples = self.read_examples()
            self._train, self._val, self._test = _split_three(
                examples, self.n_val, self.n_test, self.seed
            )
            self._loaded = True

    @property
    def train_examples(self) -> list[RemediExample]:
        return self._train

    @property
    def val_examples(self) -> list[RemediExample]:
        return self._val

    def train_dataloader(self) -> ResumableLoader:
        return ResumableLoader(
            self._train, batch_size=self.batch_size, seed=self.seed, num_workers=self.num_workers
        )

    def _examples_loader(self, items: Sequence[RemediExample]) -> DataLoader[RemediExample]:
        return DataLoader(
            list(items),  # type: ignore[arg-type]
            batch_size=self.batch_size,
            collate_fn=_example_batch,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader[RemediExample]:  # type: ignore[override]
        return self._examples_loader(self._val)

    def test_dataloader(self) -> DataLoader[RemediExample]:  # type: ignore[override]
        return self._examples_loader(self._test)


def _example_batch(items: list[RemediExample]) -> CaseBatch:
    return CaseBatch([], list(items))


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


class BiasInBiosDataModule(ExampleDataModule):
    """Bias in Bios from the pickle the official ``biosbias`` scripts write (a list of dicts with
    ``name`` (first, middle, last), ``raw``, ``start_pos`` and ``title``).

    Example (ours, after REMEDI): entity = "First Last"; context = the entity followed by the
    first sentence of the bio *after* the occupation sentence (``raw[start_pos:]``), so the
    occupation must be inferred; prompt = "{entity} has the occupation of"; target = the title.
    The pickle is read only from the ``path`` given, and only as plain data (lists, dicts,
    tuples, sets, strings, numbers): one that names any other class or function is refused
    before it runs, since unpickling can run code.
    """

    def __init__(self, path: str, limit: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not Path(path).is_file():
            raise FileNotFoundError(f"path: no such file: {path}")
        self.path = path
        self.limit = limit

    def read_examples(self) -> list[RemediExample]:
        try:
            with open(self.path, "rb") as f:
                records = _PlainDataUnpickler(f).load()
        except pickle.UnpicklingError as err:
            raise ValueError(f"path: {self.path}: {err}") from err
        if not isinstance(records, list):
            raise ValueError(f"path: {self.path} does not hold a list of bios")
        examples = []
        for i, rec in enumerate(records[: self.limit]):
            try:
                name = [str(p) for p in rec["name"] if p]
                entity = f"{name[0]} {name[-1]}" if len(name) > 1 else name[0]
                rest = str(rec["raw"])[int(rec["start_pos"]) :].strip()
                title = str(rec["title"]).replace("_", " ")
            except (KeyError, IndexError, TypeError, ValueError) as err:
                raise ValueError(f"{self.path}: bio {i}: malformed record ({err})") from err
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


class McRaeDataModule(ExampleDataModule):
    """McRae feature norms (``CONCS_FEATS_concstats_brm.txt``, tab-separated, with ``Concept``
    and ``Feature`` columns), as REMEDI's entailment task.

    An example pairs a *context* feature with a *different* *prompt* feature that co-occurs with
    it (P(prompt feature | context feature) >= ``min_co_prob`` over McRae's concepts, the pair
    seen on at least ``min_co_concepts`` concepts), stated of a concept that has neither: context
    "A {concept} {context feature}.", prompt "A {concept} {prompt feature without its last
    word}", target the prompt feature's last word (REMEDI's split). The editor must infer the
    prompt feature from the context's, not copy it: pairs whose target word occurs in the context
    feature are skipped. There is no unmediated target (the concept has no answer of its own).
    Each concept gets up to ``examples_per_concept`` pairs (seeded choice). Feature labels are
    cleaned by :func:`feature_phrase`; ``case_id`` is ``"concept|context feature|prompt
    feature"``.
    """

    def __init__(
        self,
        path: str,
        examples_per_concept: int = 2,
        min_co_prob: float = 0.1,
        min_co_concepts: int = 2,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not Path(path).is_file():
            raise FileNotFoundError(f"path: no such file: {path}")
        if examples_per_concept <= 0:
            raise ValueError(f"examples_per_concept must be positive, got {examples_per_concept}")
        if not 0 < min_co_prob <= 1:
            raise ValueError(f"min_co_prob must be in (0, 1], got {min_co_prob}")
        if min_co_concepts < 1:
            raise ValueError(f"min_co_concepts must be at least 1, got {min_co_concepts}")
        self.path = path
        self.examples_per_concept = examples_per_concept
        self.min_co_prob = min_co_prob
        self.min_co_concepts = min_co_concepts

    def read_features(self) -> dict[str, set[str]]:
        """Concept -> its feature labels, from the file."""
        features: dict[str, set[str]] = {}
        with open(self.path, newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.DictReader(f, delimiter="\t")
            missing = {"Concept", "Feature"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{self.path}: missing column(s) {', '.join(sorted(missing))}")
            for row in reader:
                features.setdefault(row["Concept"], set()).add(row["Feature"])
        return features

    def read_examples(self) -> list[RemediExample]:
        features = self.read_features()
        co_prob = co_probabilities(features, self.min_co_concepts)
        phrases = {f: feature_phrase(f) for feats in features.values() for f in feats}
        pairs = []
        for (context, prompt), p in sorted(co_prob.items()):
            words = phrases[prompt].split()
            if p < self.min_co_prob or len(words) < 1:
                continue
            if words[-1].lower() in phrases[context].lower().split():
                continue
            pairs.append((context, prompt))
        rng = random.Random(self.seed)
        examples = []
        for concept in sorted(features):
            own = features[concept]
            eligible = [(c, q) for c, q in pairs if c not in own and q not in own]
            entity = concept_text(concept)
            subject = indefinite(entity)
            for context, prompt in rng.sample(
                eligible, min(self.examples_per_concept, len(eligible))
            ):
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
