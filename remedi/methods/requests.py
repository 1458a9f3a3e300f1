"""Edit requests (prompt template, subject, new target) and their parsing from JSON/JSONL files.

A request file holds objects ``{prompt, subject, target_new}`` (the prompt either has ``{}`` where
the subject goes or contains the subject) or records of any layout :mod:`remedi.data` reads
(CounterFact, MEND, zsRE).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from remedi.data import EditCase, parse_records


@dataclass(frozen=True)
class EditRequest:
    """Make ``prompt`` (a template with one ``{}``) about ``subject`` end in ``target_new``."""

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None

    @property
    def rewrite_prompt(self) -> str:
        return self.prompt.replace("{}", self.subject)

    def validate(self, where: str = "request") -> EditRequest:
        if not self.subject.strip():
            raise ValueError(f"{where}: subject is empty")
        if self.prompt.count("{}") != 1:
            raise ValueError(f"{where}: prompt {self.prompt!r} must hold exactly one '{{}}'")
        if not self.target_new.strip():
            raise ValueError(f"{where}: target_new is empty")
        return self


def as_request(item: EditRequest | EditCase) -> EditRequest:
    """An :class:`EditRequest` from a request or an :class:`EditCase` with a ``target_new``."""
    if isinstance(item, EditRequest):
        return item
    if item.target_new is None:
        raise ValueError(f"case {item.case_id}: target_new is missing")
    return EditRequest(item.prompt, item.subject, item.target_new, item.target_true)


def _template(prompt: str, subject: str, where: str) -> str:
    if "{}" in prompt:
        return prompt
    if not subject or subject not in prompt:
        raise ValueError(f"{where}: subject {subject!r} does not occur in prompt {prompt!r}")
    return prompt.replace(subject, "{}", 1)


def parse_request(record: dict[str, Any], where: str = "request") -> EditRequest:
    """A ``{prompt, subject, target_new[, target_true]}`` object; targets: str or {"str": …}."""
    missing = [key for key in ("prompt", "subject", "target_new") if key not in record]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")

    def text(value: Any) -> str:
        return str(value.get("str", "")) if isinstance(value, dict) else str(value)

    subject = text(record["subject"])
    true = record.get("target_true", record.get("ground_truth"))
    return EditRequest(
        prompt=_template(text(record["prompt"]), subject, where),
        subject=subject,
        target_new=text(record["target_new"]),
        target_true=None if true is None else text(true),
    ).validate(where)


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"requests: file not found: {path}")
    raw = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            data: Any = [json.loads(line) for line in raw.splitlines() if line.strip()]
        else:
            data = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"requests: {path} is not valid JSON: {err}") from None
    if isinstance(data, dict):
        data = data.get("records", [data])
    if not isinstance(data, list) or not data or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"requests: {path} must hold a non-empty list of JSON objects")
    return data


def load_requests(path: str | Path) -> list[EditRequest]:
    """Read requests from a JSON/JSONL file of plain requests or of edit-case records."""
    path = Path(path)
    records = _records(path)
    if {"prompt", "subject", "target_new"} <= records[0].keys() and "rephrase_prompt" not in (
        records[0]
    ):
        return [parse_request(rec, f"requests: {path} record {i}") for i, rec in enumerate(records)]
    cases, _ = parse_records(records, on_error="raise", source=str(path))
    return [as_request(case) for case in cases]
