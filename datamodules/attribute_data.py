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


class BiasInBiosDataModule(ExampleDataModule):
    """Bias in Bios from the pickle the official ``biosbias`` scripts write (a list of dicts with
    ``name`` (first, middle, last), ``raw``, ``start_pos`` and ``title``).

    Example (ours, after REMEDI): entity = "First Last"; context = the entity followed by the
    first sentence of the bio *after* the occupation sentence (``raw[start_pos:]``), so the
    occupation must be inferred; prompt = "{entity} has the occupation of"; target = the title.
    The pickle is read only from the ``path`` given (unpickling runs code: use trusted files).
    """

    def __init__(self, path: str, limit: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not Path(path).is_file():
            raise FileNotFoundError(f"path: no such file: {path}")
        self.path = path
        self.limit = limit

    def read_examples(self) -> list[RemediExample]:
        with open(self.path, "rb") as f:
            records = pickle.load(f)
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


def feature_text(feature: str) -> tuple[str, str]:
    """McRae feature label -> (relation head, object), e.g. ``has_wings`` -> (has, wings),
    ``a_bird`` -> (is a, bird), ``used_for_flying`` -> (is used for, flying)."""
    text = re.sub(r"^(beh|inbeh)_-_", "", feature).replace("_", " ").strip()
    for head, out in (
        ("a ", "is a"),
        ("an ", "is an"),
        ("used for ", "is used for"),
        ("made of ", "is made of"),
        ("found in ", "is found in"),
        ("found on ", "is found on"),
    ):
        if text.startswith(head):
            return out, text[len(head) :]
    head, _, rest = text.partition(" ")
    return (head, rest) if rest else ("is", text)


def concept_text(concept: str) -> str:
    """``apple_(fruit)`` -> ``apple``."""
    return re.sub(r"_?\(.*\)$", "", concept).replace("_", " ").strip()


class McRaeDataModule(ExampleDataModule):
    """McRae feature norms (``CONCS_FEATS_concstats_brm.txt``, tab-separated, with ``Concept``
    and ``Feature`` columns).

    Example (ours): a feature of one concept stated of another concept that lacks it (seeded
    choice): context "{concept} {head} {object}", prompt "{concept} {head}", target the object.
    """

    def __init__(self, path: str, examples_per_concept: int = 2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not Path(path).is_file():
            raise FileNotFoundError(f"path: no such file: {path}")
        if examples_per_concept <= 0:
            raise ValueError(f"examples_per_concept must be positive, got {examples_per_concept}")
        self.path = path
        self.examples_per_concept = examples_per_concept

    def read_examples(self) -> list[RemediExample]:
        features: dict[str, set[str]] = {}
        with open(self.path, newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.DictReader(f, delimiter="\t")
            missing = {"Concept", "Feature"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{self.path}: missing column(s) {', '.join(sorted(missing))}")
            for row in reader:
                features.setdefault(row["Concept"], set()).add(row["Feature"])
        rng = random.Random(self.seed)
        pool = sorted({feat for feats in features.values() for feat in feats})
        examples = []
        for concept in sorted(features):
            entity = concept_text(concept)
            foreign = [feat for feat in pool if feat not in features[concept]]
            for feat in rng.sample(foreign, min(self.examples_per_concept, len(foreign))):
                head, obj = feature_text(feat)
                examples.append(
                    RemediExample(
                        entity=entity,
                        context=f"{entity} {head} {obj}",
                        prompt=f"{entity} {head}",
                        target_mediated=obj,
                        case_id=f"{concept}:{feat}",
                    )
                )
        return examples
