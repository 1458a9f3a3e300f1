"""Edit cases: the shared schema, readers for the published layouts, and built-in facts."""

from remedi.data.builtin_facts import ALL_SPLITS, FAMOUS_SPLITS, SPLITS, load_builtin, load_spec
from remedi.data.cases import CaseError, EditCase
from remedi.data.readers import LoadReport, detect_layout, load_cases, parse_records, read_cases

__all__ = [
    "ALL_SPLITS",
    "FAMOUS_SPLITS",
    "SPLITS",
    "CaseError",
    "EditCase",
    "LoadReport",
    "detect_layout",
    "load_builtin",
    "load_cases",
    "load_spec",
    "parse_records",
    "read_cases",
]
