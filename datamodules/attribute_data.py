"""DataModules for REMEDI's attribute datasets without CounterFact scoring: Bias in Bios and the
McRae feature norms. Their validation and test batches carry examples only (the loss terms are
logged; the CounterFact metrics need counterfactual cases)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from datamodules.remedi_data import CaseBatch, EditCaseDataModule, ResumableLoader
from remedi.data.attributes import (
    co_probabilities,
    concept_text,
    feature_phrase,
    indefinite,
    mcrae_examples,
    read_bios,
    read_mcrae_features,
    split_three,
)
from remedi.editors import RemediExample

__all__ = [
    "BiasInBiosDataModule",
    "ExampleDataModule",
    "McRaeDataModule",
    "co_probabilities",
    "concept_text",
    "feature_phrase",
    "indefinite",
]


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
            self._train, self._val, self._test = split_three(
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
        return read_bios(self.path, self.limit)


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
        return read_mcrae_features(self.path)

    def read_examples(self) -> list[RemediExample]:
        return mcrae_examples(
            self.read_features(),
            self.examples_per_concept,
            self.min_co_prob,
            self.min_co_concepts,
            self.seed,
        )
