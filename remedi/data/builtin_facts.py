"""The built-in counterfactual facts (CounterFact layout) that the default model knows."""

from __future__ import annotations

import json
from importlib import resources
from typing import Literal

from remedi.data.cases import EditCase
from remedi.data.readers import parse_records

Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")


def load_builtin(split: Split | None = None) -> list[EditCase]:
    """Cases of one split of the built-in facts, or all of them (train, validation, test)."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split {split!r} must be one of {', '.join(SPLITS)} or None")
    cases: list[EditCase] = []
    for name in SPLITS if split is None else (split,):
        text = resources.files("remedi.data").joinpath("builtin", f"{name}.json").read_text()
        cases.extend(parse_records(json.loads(text), source=f"builtin/{name}.json")[0])
    return cases
