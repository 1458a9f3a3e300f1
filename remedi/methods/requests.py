"""Edit requests (prompt template, subject, new target) and their parsing from JSON/JSONL files.

A request file holds objects ``{prompt, subject, target_new}`` (the prompt either has ``{}`` where
the subject goes or contains the subject) or records of any layout :mod:`remedi.data` reads
(CounterFact, MEND, zsRE).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from remedi.data import CaseError, EditCase, parse_records
from remedi.data.readers import read_records, template_for


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
        if self.target_true is not None and self.target_true.strip() == self.target_new.strip():
            raise ValueError(f"{where}: target_new equals target_true ({self.target_true!r})")
        return self


def as_request(item: EditRequest | EditCase) -> EditRequest:
    """An :class:`EditRequest` from a request or an :class:`EditCase` with a ``target_new``
    (a zsRE case whose target is its true answer gives a request without ``target_true``)."""
    if isinstance(item, EditRequest):
        return item
    if item.target_new is None:
        raise ValueError(f"case {item.case_id}: target_new is missing")
    true = item.target_true if item.target_true.strip() != item.target_new.strip() else None
    return EditRequest(item.prompt, item.subject, item.target_new, true)


def parse_request(record: dict[str, Any], where: str = "request") -> EditRequest:
    """A ``{prompt, subject, target_new[, target_true]}`` object; targets: str or {"str": …}."""
    missing = [key for key in ("prompt", "subject", "target_new") if key not in record]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")

    def text(value: Any) -> str:
        return str(value.get("str", "")) if isinstance(value, dict) else str(value)

    subject = text(record["subject"])
    true = record.get("target_true", record.get("ground_truth"))
    try:
        prompt = template_for(where, text(record["prompt"]), subject)
    except CaseError as err:
        raise ValueError(f"{where}: {err.field}: {err.message}") from None
    return EditRequest(
        prompt=prompt,
        subject=subject,
        target_new=text(record["target_new"]),
        target_true=None if true is None else text(true),
    ).validate(where)


def _is_plain(record: dict[str, Any]) -> bool:
    """Whether ``record`` is a plain request (possibly missing fields, which
    :func:`parse_request` names) rather than a record of a dataset layout."""
    layout_keys = {"rephrase_prompt", "known_id", "requested_rewrite", "src"}
    return {"prompt", "subject"} <= record.keys() and not layout_keys & record.keys()


def load_requests(path: str | Path) -> list[EditRequest]:
    """Read requests from a JSON/JSONL file of plain requests or of edit-case records."""
    path = Path(path)
    records = read_records(path)
    if not records:
        raise ValueError(f"requests: {path} holds no requests")
    if _is_plain(records[0]):
        return [parse_request(rec, f"requests: {path} record {i}") for i, rec in enumerate(records)]
    cases, _ = parse_records(records, on_error="raise", source=str(path))
    return [as_request(case) for case in cases]
