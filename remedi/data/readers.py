"""Readers that turn the published edit-dataset layouts into :class:`EditCase` lists.

Layouts (detected from the keys of the first record):
- ``rome``: CounterFact as published by ROME (``requested_rewrite``, ``paraphrase_prompts``, ...);
- ``mend``: the flattened CounterFact/zsRE layout of MEND-style code (``prompt, subject,
  target_new, ground_truth, rephrase_prompt, locality_prompt, locality_ground_truth``), also with
  EasyEdit's list-valued ``rephrase_prompt`` and ``locality`` entries;
- ``zsre_mend``: MEND's zsRE files (``src, subject, alt, answers, rephrase, loc, loc_ans``);
- ``known``: ROME's known facts (``known_id, subject, attribute, template, prompt``).

The layout also says which metrics score the cases (:attr:`EditCase.benchmark`): ``zsre_mend``
files are zsRE; a ``mend`` file is zsRE when its records say ``"dataset": "zsre"`` or their
locality prompts carry answers of their own (unrelated Natural Questions) rather than the
edited fact's true object, as CounterFact's neighborhood prompts do. A file is one benchmark.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from remedi.data.cases import Benchmark, CaseError, EditCase

log = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]


@dataclass
class LoadReport:
    """What :func:`read_cases` kept and skipped."""

    layout: str
    loaded: int
    skipped: list[CaseError]
    benchmark: Benchmark = "counterfact"


def template_for(case_id: object, prompt: str, subject: str) -> str:
    """Turn a prompt that contains the subject into a template with ``{}`` at its first mention."""
    if "{}" in prompt:
        return prompt
    if not subject or subject not in prompt:
        raise CaseError(case_id, "subject", f"{subject!r} does not occur in prompt {prompt!r}")
    return prompt.replace(subject, "{}", 1)


_TEXT = (str, int, float)
"""JSON scalars that read as text (a year, a number answer); booleans, lists and objects do not."""


def _is_text(value: Any) -> bool:
    return isinstance(value, _TEXT) and not isinstance(value, bool)


def _as_list(rec: dict[str, Any], key: str) -> list[str]:
    """``rec[key]`` as a list of strings: absent or null is empty, one string is a list of one;
    anything but strings (or numbers) is a ``ValueError`` naming the field."""
    value = rec.get(key)
    if value is None:
        return []
    if _is_text(value):
        return [str(value)] if str(value) else []
    if not isinstance(value, list | tuple) or not all(_is_text(v) for v in value):
        raise ValueError(f"{key}: expected a string or a list of strings, got {_shape(value)}")
    return [str(v) for v in value]


def _shape(value: Any) -> str:
    """A JSON value's kind in words, for messages (``a list holding an object``)."""
    if isinstance(value, list):
        odd = next((v for v in value if not _is_text(v)), None)
        return f"a list holding {_shape(odd)}" if value else "an empty list"
    kinds = {dict: "an object", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def _locality(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """EasyEdit's ``locality`` entries: a list of ``{prompt, ground_truth}`` objects."""
    value = rec.get("locality") or []
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise ValueError(
            f"locality: expected a list of {{prompt, ground_truth}} objects, got {_shape(value)}"
        )
    return value


def _str_of(value: Any) -> str:
    """CounterFact targets are ``{"str": ..., "id": ...}``; other layouts give plain strings."""
    if isinstance(value, dict):
        return str(value.get("str", ""))
    return "" if value is None else str(value)


def _from_rome(rec: dict[str, Any]) -> EditCase:
    cid = rec.get("case_id")
    rw = rec.get("requested_rewrite")
    if not isinstance(rw, dict):
        raise CaseError(cid, "requested_rewrite", "is missing or not an object")
    subject = str(rw.get("subject", ""))
    return EditCase(
        case_id=cid if cid is not None else -1,
        subject=subject,
        prompt=template_for(cid, str(rw.get("prompt", "")), subject),
        target_true=_str_of(rw.get("target_true")),
        target_new=_str_of(rw.get("target_new")),
        relation_id=str(rw.get("relation_id", "")),
        paraphrase_prompts=_as_list(rec, "paraphrase_prompts"),
        neighborhood_prompts=_as_list(rec, "neighborhood_prompts"),
        attribute_prompts=_as_list(rec, "attribute_prompts"),
        generation_prompts=_as_list(rec, "generation_prompts"),
    )


def _from_mend(rec: dict[str, Any]) -> EditCase:
    cid = rec.get("case_id")
    subject = str(rec.get("subject", ""))
    truth = _str_of(rec.get("ground_truth"))
    neighborhood = _as_list(rec, "locality_prompt")
    neighbor_targets = _as_list(rec, "locality_ground_truth")
    for item in _locality(rec):
        neighborhood.append(str(item.get("prompt", "")))
        neighbor_targets.append(_str_of(item.get("ground_truth")))
    same_object = all(t == truth for t in neighbor_targets)
    zsre = rec.get("dataset") == "zsre" or not same_object
    return EditCase(
        case_id=cid if cid is not None else -1,
        subject=subject,
        prompt=template_for(cid, str(rec.get("prompt", "")), subject),
        target_true=truth,
        target_new=_str_of(rec.get("target_new")),
        relation_id=str(rec.get("relation_id", "")),
        paraphrase_prompts=_as_list(rec, "rephrase_prompt"),
        neighborhood_prompts=neighborhood,
        neighborhood_targets=None if same_object else neighbor_targets,
        benchmark="zsre" if zsre else "counterfact",
    )


def _from_zsre_mend(rec: dict[str, Any]) -> EditCase:
    cid = rec.get("case_id")
    subject = str(rec.get("subject", ""))
    answers = _as_list(rec, "answers")
    return EditCase(
        case_id=cid if cid is not None else -1,
        subject=subject,
        prompt=template_for(cid, str(rec.get("src", "")), subject),
        target_true=answers[0] if answers else str(rec.get("pred", "")),
        target_new=str(rec.get("alt", "")),
        paraphrase_prompts=_as_list(rec, "rephrase"),
        neighborhood_prompts=_as_list(rec, "loc"),
        neighborhood_targets=_as_list(rec, "loc_ans"),
        benchmark="zsre",
    )


def _from_known(rec: dict[str, Any]) -> EditCase:
    cid = rec.get("known_id")
    subject = str(rec.get("subject", ""))
    prompt = str(rec.get("prompt", ""))
    return EditCase(
        case_id=cid if cid is not None else -1,
        subject=subject,
        prompt=template_for(cid, prompt, subject),
        target_true=str(rec.get("attribute", "")),
        target_new=None,
        relation_id=str(rec.get("relation_id", "")),
    )


_LAYOUTS: dict[str, tuple[frozenset[str], Callable[[dict[str, Any]], EditCase]]] = {
    "rome": (frozenset({"requested_rewrite"}), _from_rome),
    "known": (frozenset({"known_id", "subject", "attribute"}), _from_known),
    "zsre_mend": (frozenset({"src", "alt", "subject"}), _from_zsre_mend),
    "mend": (frozenset({"prompt", "subject", "target_new", "ground_truth"}), _from_mend),
}


def detect_layout(record: dict[str, Any]) -> str:
    """Name the layout whose required keys ``record`` has."""
    for name, (keys, _) in _LAYOUTS.items():
        if keys <= record.keys():
            return name
    raise ValueError(
        f"unrecognised record layout with keys {sorted(record)}; expected one of: "
        + "; ".join(f"{n} ({', '.join(sorted(k))})" for n, (k, _) in _LAYOUTS.items())
    )


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a `.json` file (a list, or `{"records": [...]}`) or a `.jsonl` file."""
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            data: Any = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"data file {path} is not valid JSON: {err}") from None
    if isinstance(data, dict) and isinstance(data.get("records"), list):
        data = data["records"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"data file {path} must hold a JSON list of objects")
    return data


def parse_records(
    records: Iterable[dict[str, Any]], on_error: OnError = "raise", source: str = "records"
) -> tuple[list[EditCase], LoadReport]:
    """Convert records of one layout into validated cases, raising on or skipping bad ones."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error {on_error!r} must be 'raise' or 'skip'")
    records = list(records)
    if not records:
        raise ValueError(f"{source} holds no records")
    odd = next((i for i, rec in enumerate(records) if not isinstance(rec, dict)), None)
    if odd is not None:
        raise ValueError(f"{source}: record {odd} is {_shape(records[odd])}, not a JSON object")
    layout = detect_layout(records[0])
    convert = _LAYOUTS[layout][1]
    cases: list[EditCase] = []
    skipped: list[CaseError] = []
    for index, rec in enumerate(records):
        try:
            if detect_layout(rec) != layout:
                raise CaseError(rec.get("case_id", index), "record", f"is not in {layout} layout")
            if "case_id" not in rec and layout != "known":
                rec = {**rec, "case_id": index}
            cases.append(convert(rec).validate())
        except CaseError as err:
            if on_error == "raise":
                raise CaseError(err.case_id, err.field, f"{err.message} (in {source})") from None
            skipped.append(err)
        except ValueError as err:
            bad = CaseError(rec.get("case_id", index), "record", str(err))
            if on_error == "raise":
                raise bad from None
            skipped.append(bad)
    if skipped:
        log.warning("%s: skipped %d bad records (first: %s)", source, len(skipped), skipped[0])
    benchmark: Benchmark = "zsre" if any(c.benchmark == "zsre" for c in cases) else "counterfact"
    for case in cases:
        case.benchmark = benchmark
    return cases, LoadReport(layout, len(cases), skipped, benchmark)


def read_cases(path: str | Path, on_error: OnError = "raise") -> tuple[list[EditCase], LoadReport]:
    """Read a JSON/JSONL file in any supported layout; also return what was skipped."""
    path = Path(path)
    return parse_records(read_records(path), on_error=on_error, source=str(path))


def load_cases(path: str | Path, on_error: OnError = "raise") -> list[EditCase]:
    """Load ``EditCase``s from a file in any supported layout (see module docstring).

    ``on_error="raise"`` rejects the file at its first bad record, naming the case and field;
    ``"skip"`` drops bad records, logging how many.
    """
    return read_cases(path, on_error)[0]
