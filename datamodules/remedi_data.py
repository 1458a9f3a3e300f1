"""DataModules for REMEDI: edit cases split into train/validation/test, turned into examples.

Training batches are lists of :class:`~remedi.editors.RemediExample`; validation and test batches
are :class:`CaseBatch` es (the cases scored by the CounterFact metrics plus their examples, for the
validation loss). Tokenisation happens in the module, where the frozen LM's tokenizer lives.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from remedi.data import EditCase, load_builtin, load_cases
from remedi.data.neighbourhoods import pool_neighbourhoods
from remedi.editors import RemediExample, examples_from_case
from remedi.editors.training import TrainPrompt

SplitOrder = Literal["seeded", "ordered"]


@dataclass
class CaseBatch:
    """Cases to score together, with the training-style examples built from them."""

    cases: list[EditCase]
    examples: list[RemediExample]


class EpochShuffleSampler(Sampler[int]):
    """A permutation that depends only on ``seed`` and the epoch, so a resumed run sees the same
    order as an uninterrupted one (Lightning calls :meth:`set_epoch`)."""

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0
        self.skip: dict[int, int] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        order = list(range(self.size))
        random.Random(self.seed * 100_003 + self.epoch).shuffle(order)
        return iter(order[self.skip.pop(self.epoch, 0) :])

    def __len__(self) -> int:
        return self.size


class ResumableLoader(DataLoader[Any]):
    """A training loader that records how many batches of the current epoch it has served, so
    that a run resumed mid-epoch continues with the next batch (Lightning saves and restores
    this state with the loop state). Under DDP Lightning wraps the sampler in a distributed one;
    runs then resume at epoch boundaries exactly and mid-epoch from the epoch's start."""

    def __init__(
        self,
        dataset: list[Any],
        batch_size: int = 1,
        sampler: Sampler[int] | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("collate_fn", _collate_examples)
        kwargs.pop("shuffle", None)
        super().__init__(
            dataset,  # type: ignore[arg-type]
            batch_size=batch_size,
            sampler=sampler if sampler is not None else EpochShuffleSampler(len(dataset), seed),
            **kwargs,
        )
        self.served = 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        self.served = 0
        for batch in super().__iter__():
            self.served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(getattr(self.sampler, "epoch", 0)), "served": self.served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        served = int(state["served"])
        if isinstance(self.sampler, EpochShuffleSampler) and 0 < served < len(self):
            self.sampler.skip[int(state["epoch"])] = served * int(self.batch_size or 1)


def _collate_examples(items: list[Any]) -> list[Any]:
    return list(items)


class _CaseCollate:
    def __init__(self, prompt: TrainPrompt, per_case: int | None) -> None:
        self.prompt = prompt
        self.per_case = per_case

    def __call__(self, cases: list[EditCase]) -> CaseBatch:
        examples = [e for c in cases for e in examples_from_case(c, self.prompt)[: self.per_case]]
        return CaseBatch(list(cases), examples)


class EditCaseDataModule(L.LightningDataModule):
    """Base: subclasses fill ``train_cases``, ``val_cases`` and ``test_cases`` in :meth:`setup`.

    ``predict_path`` is a JSONL file of requests (see :func:`read_requests`); ``predict`` writes
    generations and target probabilities to ``predict_output`` (default: the run directory's
    ``predictions.jsonl``), ``max_new_tokens`` per request.

    Batches hold strings and dataclasses only (the module tokenises on the LM's device), so
    :meth:`transfer_batch_to_device` hands them over unchanged.
    """

    def __init__(
        self,
        batch_size: int = 16,
        eval_batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        train_prompt: TrainPrompt = "paraphrase",
        prompts_per_case: int | None = None,
        predict_path: str | None = None,
        predict_output: str | None = None,
        max_new_tokens: int = 20,
    ) -> None:
        super().__init__()
        if prompts_per_case is not None and prompts_per_case <= 0:
            raise ValueError(f"prompts_per_case must be positive, got {prompts_per_case}")
        self.prompts_per_case = prompts_per_case
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if eval_batch_size <= 0:
            raise ValueError(f"eval_batch_size must be positive, got {eval_batch_size}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.train_prompt: TrainPrompt = train_prompt
        self.predict_path = predict_path
        self.predict_output = predict_output
        self.max_new_tokens = max_new_tokens
        self.train_cases: list[EditCase] = []
        self.val_cases: list[EditCase] = []
        self.test_cases: list[EditCase] = []
        self._loaded = False

    def load_splits(self) -> tuple[list[EditCase], list[EditCase], list[EditCase]]:
        raise NotImplementedError

    def transfer_batch_to_device(self, batch: Any, device: torch.device, idx: int) -> Any:
        """The batch as it is: nothing in it lives on a device."""
        return batch

    def setup(self, stage: str | None = None) -> None:
        if not self._loaded:
            self.train_cases, self.val_cases, self.test_cases = self.load_splits()
            self._loaded = True

    @property
    def train_examples(self) -> list[RemediExample]:
        k = self.prompts_per_case
        return [e for c in self.train_cases for e in examples_from_case(c, self.train_prompt)[:k]]

    @property
    def val_examples(self) -> list[RemediExample]:
        k = self.prompts_per_case
        return [e for c in self.val_cases for e in examples_from_case(c, self.train_prompt)[:k]]

    def train_dataloader(self) -> ResumableLoader:
        """Batches of REMEDI examples, or of whole cases when the attached module trains on
        cases (its ``train_unit``, e.g. MEND and KE)."""
        module = getattr(self.trainer, "lightning_module", None)
        unit = getattr(module, "train_unit", "examples")
        items: list[Any] = self.train_examples if unit == "examples" else list(self.train_cases)
        if not items:
            raise ValueError("the training split is empty")
        return ResumableLoader(
            items,
            batch_size=self.batch_size,
            seed=self.seed,
            num_workers=self.num_workers,
            collate_fn=_collate_examples,
        )

    def _cases_loader(self, cases: Sequence[EditCase], split: str) -> DataLoader[EditCase]:
        if not cases:
            raise ValueError(f"the {split} split is empty")
        return DataLoader(
            list(cases),  # type: ignore[arg-type]
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=_CaseCollate(self.train_prompt, self.prompts_per_case),
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader[EditCase]:
        return self._cases_loader(self.val_cases, "validation")

    def test_dataloader(self) -> DataLoader[EditCase]:
        return self._cases_loader(self.test_cases, "test")

    def predict_dataloader(self) -> DataLoader[dict[str, str]]:
        if self.predict_path is None:
            raise ValueError("predict_path is not set; give a JSONL file of requests")
        requests = read_requests(self.predict_path)
        return DataLoader(
            requests,  # type: ignore[arg-type]
            batch_size=self.eval_batch_size,
            collate_fn=list,
            num_workers=self.num_workers,
        )


REQUEST_FIELDS = ("entity", "attribute", "prompt")


def read_requests(path: str) -> list[dict[str, str]]:
    """Predict requests: a JSONL file (or JSON list) of objects with ``entity``, ``attribute``
    (the text stated about the entity, e.g. "is a nurse") and ``prompt`` (mentions the entity),
    optionally ``target`` (whose probability is reported)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"predict_path: no such file: {path}")
    text = file.read_text()
    if text.lstrip().startswith("["):
        records = json.loads(text)
    else:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    for i, rec in enumerate(records):
        for name in REQUEST_FIELDS:
            if not isinstance(rec.get(name), str) or not rec[name].strip():
                raise ValueError(f"{path}: request {i}: field {name!r} is missing or empty")
        if rec["entity"] not in rec["prompt"]:
            raise ValueError(
                f"{path}: request {i}: prompt {rec['prompt']!r} does not mention entity "
                f"{rec['entity']!r}"
            )
    return [dict(r) for r in records]


def _sorted_by_id(cases: list[EditCase]) -> list[EditCase]:
    if all(isinstance(c.case_id, int) for c in cases):
        return sorted(cases, key=lambda c: int(c.case_id))
    return cases


class CounterFactDataModule(EditCaseDataModule):
    """CounterFact-style cases: the built-in facts (``path`` unset) or any layout
    :func:`remedi.data.load_cases` reads.

    From a path, cases are sorted by ``case_id`` and split into ``n_train`` / ``n_val`` /
    ``n_test`` (``split="ordered"``: in that order, as the reference did; ``"seeded"``: after a
    shuffle with ``seed``). ``val_path`` and ``test_path`` take the validation and test cases
    (the first ``n_val`` / ``n_test`` by ``case_id``) from other files instead.
    ``train_neighbors`` gives each training case up to that many neighbourhood prompts, pooled
    from training cases with the same true object
    (:func:`remedi.data.neighbourhoods.pool_neighbourhoods`; validation and test cases keep
    their own).
    """

    def __init__(
        self,
        path: str | None = None,
        test_path: str | None = None,
        val_path: str | None = None,
        n_train: int | None = None,
        n_val: int | None = None,
        n_test: int | None = None,
        split: SplitOrder = "seeded",
        batch_size: int = 16,
        eval_batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        train_prompt: TrainPrompt = "paraphrase",
        prompts_per_case: int | None = None,
        predict_path: str | None = None,
        predict_output: str | None = None,
        max_new_tokens: int = 20,
        train_neighbors: int | None = None,
    ) -> None:
        super().__init__(
            batch_size,
            eval_batch_size,
            num_workers,
            seed,
            train_prompt,
            prompts_per_case,
            predict_path,
            predict_output,
            max_new_tokens,
        )
        for name, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if split not in ("seeded", "ordered"):
            raise ValueError(f"split {split!r} must be 'seeded' or 'ordered'")
        for name, file in (("path", path), ("val_path", val_path), ("test_path", test_path)):
            if file is not None and not Path(file).exists():
                raise FileNotFoundError(f"{name}: no such file: {file}")
        self.path = path
        self.test_path = test_path
        self.val_path = val_path
        self.n_train, self.n_val, self.n_test = n_train, n_val, n_test
        self.split = split
        if train_neighbors is not None and train_neighbors < 0:
            raise ValueError(f"train_neighbors must be >= 0, got {train_neighbors}")
        self.train_neighbors = train_neighbors

    def load_splits(self) -> tuple[list[EditCase], list[EditCase], list[EditCase]]:
        train, val, test = self._split()
        if self.train_neighbors is not None:
            train = pool_neighbourhoods(train, self.train_neighbors)
        return train, val, test

    def _split(self) -> tuple[list[EditCase], list[EditCase], list[EditCase]]:
        if self.path is None:
            train, val, test = (load_builtin(s) for s in ("train", "validation", "test"))
            return (
                train[: self.n_train],
                val[: self.n_val],
                test[: self.n_test],
            )
        cases = _sorted_by_id(load_cases(self.path))
        if self.split == "seeded":
            random.Random(self.seed).shuffle(cases)
        n = len(cases)
        n_val = 0 if self.val_path else (self.n_val if self.n_val is not None else max(1, n // 10))
        n_test = 0 if self.test_path else (self.n_test if self.n_test is not None else n // 10)
        n_train = self.n_train if self.n_train is not None else n - n_val - n_test
        if n_train + n_val + n_test > n:
            raise ValueError(
                f"n_train + n_val + n_test = {n_train + n_val + n_test} exceeds the "
                f"{n} cases in {self.path}"
            )
        train = cases[:n_train]
        if self.val_path:
            val = _sorted_by_id(load_cases(self.val_path))[: self.n_val]
        else:
            val = cases[n_train : n_train + n_val]
        if self.test_path:
            test = _sorted_by_id(load_cases(self.test_path))[: self.n_test]
        else:
            test = cases[n_train + n_val : n_train + n_val + n_test]
        _check_disjoint({"train": train, "validation": val, "test": test})
        return train, val, test


def _check_disjoint(splits: dict[str, list[EditCase]]) -> None:
    """Refuse splits that share a case (e.g. ``val_path`` and ``test_path`` naming one file)."""
    names = list(splits)
    for i, a in enumerate(names):
        seen = {(c.case_id, c.subject, c.prompt) for c in splits[a]}
        for b in names[i + 1 :]:
            shared = [c for c in splits[b] if (c.case_id, c.subject, c.prompt) in seen]
            if shared:
                raise ValueError(
                    f"the {a} and {b} splits share {len(shared)} cases "
                    f"(e.g. case {shared[0].case_id}); give files or counts that do not overlap"
                )
