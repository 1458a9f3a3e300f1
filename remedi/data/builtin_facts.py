"""The built-in counterfactual facts (CounterFact layout) that the default model knows.

``train``, ``validation`` and ``test`` are the original splits (:data:`SPLITS`; what
``load_builtin()`` returns together). ``famous-tune`` and ``famous-test``
(:data:`FAMOUS_SPLITS`) are a harder set: each neighbourhood prompt states the same relation
about another famous subject whose true object is the edited case's ``target_true`` (Honda's
and Sony's headquarters for Toyota's), kept only where the unedited default model prefers the
true object (``benchmarks/famous_neighbours.py``). The two famous splits share no subject, so
settings tuned on one can be reported on the other.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Literal

from remedi.data.cases import EditCase
from remedi.data.readers import load_cases, parse_records

Split = Literal["train", "validation", "test", "famous-tune", "famous-test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")
FAMOUS_SPLITS: tuple[Split, ...] = ("famous-tune", "famous-test")
ALL_SPLITS: tuple[Split, ...] = SPLITS + FAMOUS_SPLITS


def load_builtin(split: Split | None = None) -> list[EditCase]:
    """Cases of one split of the built-in facts (:data:`ALL_SPLITS`), or those of the original
    splits together (train, validation, test) for None."""
    if split is not None and split not in ALL_SPLITS:
        raise ValueError(f"split {split!r} must be one of {', '.join(ALL_SPLITS)} or None")
    cases: list[EditCase] = []
    for name in SPLITS if split is None else (split,):
        file = f"{name.replace('-', '_')}.json"
        text = resources.files("remedi.data").joinpath("builtin", file).read_text(encoding="utf-8")
        cases.extend(parse_records(json.loads(text), source=f"builtin/{file}")[0])
    return cases


def load_spec(spec: str | Path) -> list[EditCase]:
    """The cases ``spec`` names: ``builtin[:SPLIT]`` (the built-in facts; the test split when
    no split is named) or a JSON/JSONL file in any layout :func:`~remedi.data.load_cases`
    reads. A bad split or file raises a one-line ``ValueError`` or ``OSError``."""
    name, _, split = str(spec).partition(":")
    if name == "builtin":
        if split and split not in ALL_SPLITS:
            raise ValueError(f"{spec}: the built-in splits are {', '.join(ALL_SPLITS)}")
        return load_builtin(split or "test")
    return load_cases(spec)
