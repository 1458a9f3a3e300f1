"""Property-based tests: random record shapes for the readers of :mod:`remedi.data.readers` and
:mod:`remedi.methods.requests`, random strings for the tokenisation helpers of
:mod:`remedi.tokens`. The only failures allowed are their clear errors (``ValueError`` and its
subclasses, with a message) — never a ``KeyError``, ``TypeError``, ``IndexError`` or
``AttributeError`` from inside."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import COUNTERFACT_RECORDS, _tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from remedi import tokens
from remedi.data.readers import parse_records, read_cases, read_records
from remedi.methods.requests import load_requests, parse_request

BOUNDED = settings(
    max_examples=200,
    deadline=None,
    database=None,  # no .hypothesis folder in the working tree
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

SCALARS = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
PLAUSIBLE = st.sampled_from(
    ["Toyota", "{} makes", "Toyota makes", "", " ", "{}{}", "cars", ["Toyota makes"], {"str": "x"}]
)
"""Values that get past the first checks, so that the converters' deeper code runs."""

VALID: list[dict[str, Any]] = [
    COUNTERFACT_RECORDS[0],
    {
        "prompt": "The place of Toyota is",
        "subject": "Toyota",
        "target_new": "France",
        "ground_truth": "Japan",
        "rephrase_prompt": "Toyota is tied to",
        "locality_prompt": "The capital of Italy is",
        "locality_ground_truth": "Rome",
        "locality": [{"prompt": "Apple makes", "ground_truth": "phones"}],
    },
    {
        "subject": "Toyota",
        "src": "Which country is Toyota from?",
        "alt": "France",
        "answers": ["Japan"],
        "rephrase": "Where does Toyota come from?",
        "loc": "nq question: who makes the iPhone",
        "loc_ans": "Apple",
    },
    {"known_id": 3, "subject": "Toyota", "attribute": "Japan", "prompt": "Toyota is in"},
    {"prompt": "{} makes", "subject": "Toyota", "target_new": "phones", "target_true": "cars"},
]
KEYS = sorted({key for record in VALID for key in record} | set(VALID[0]["requested_rewrite"]))


@st.composite
def mutated_records(draw: st.DrawFn) -> dict[str, Any]:
    """A valid record of a random layout with keys dropped, retyped or added, at both levels of
    CounterFact's nesting."""
    record = copy.deepcopy(draw(st.sampled_from(VALID)))
    targets = [record]
    if isinstance(record.get("requested_rewrite"), dict):
        targets.append(record["requested_rewrite"])
    for _ in range(draw(st.integers(0, 4))):
        target = draw(st.sampled_from(targets))
        key = draw(st.sampled_from(KEYS))
        if draw(st.booleans()) and key in target:
            del target[key]
        else:
            target[key] = draw(PLAUSIBLE | JSON)
    return record


def _only_clear_errors(call: Callable[[], object]) -> None:
    """Run ``call``: it may succeed or raise a ``ValueError`` with a message, nothing else."""
    try:
        call()
    except ValueError as err:
        assert str(err).strip(), f"{type(err).__name__} without a message"


@BOUNDED
@given(records=st.lists(mutated_records(), min_size=1, max_size=3))
def test_parse_records_fails_only_clearly(records: list[dict[str, Any]]) -> None:
    _only_clear_errors(lambda: parse_records(records))
    _only_clear_errors(lambda: parse_records(records, on_error="skip"))


@BOUNDED
@given(records=st.lists(JSON, max_size=3))
def test_parse_records_of_any_json_values_fails_only_clearly(records: list[Any]) -> None:
    _only_clear_errors(lambda: parse_records(records))


@BOUNDED
@given(
    value=JSON | st.lists(mutated_records(), max_size=3),
    suffix=st.sampled_from([".json", ".jsonl"]),
)
def test_reading_any_json_file_fails_only_clearly(value: Any, suffix: str, tmp_path: Path) -> None:
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl" and isinstance(value, list):
        path.write_text("".join(json.dumps(item) + "\n" for item in value))
    else:
        path.write_text(json.dumps(value))
    _only_clear_errors(lambda: read_records(path))
    _only_clear_errors(lambda: read_cases(path))
    _only_clear_errors(lambda: load_requests(path))


@BOUNDED
@given(text=st.text(max_size=40))
def test_reading_any_text_fails_only_clearly(text: str, tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(text, encoding="utf-8")
    _only_clear_errors(lambda: read_cases(path))


@BOUNDED
@given(record=mutated_records())
def test_parse_request_fails_only_clearly(record: dict[str, Any]) -> None:
    _only_clear_errors(lambda: parse_request(record))


# -- tokenisation helpers -----------------------------------------------------------------------
WORDS = st.sampled_from(["Toyota", "Tokyo", "{}", "{", "}", " ", "", "é", "東京", "\n", "  x"])
PIECES = st.lists(WORDS | st.text(max_size=6), max_size=5).map("".join)


@st.composite
def prompts_with_subjects(draw: st.DrawFn) -> tuple[str, str]:
    """A prompt holding its subject zero, one or more times, among random text."""
    subject = draw(WORDS | st.text(max_size=8))
    parts = [draw(PIECES) for _ in range(draw(st.integers(1, 3)))]
    return draw(st.sampled_from([subject, ""])).join(parts), subject


@pytest.fixture(params=[False, True], ids=["plain", "bos"])
def tokenizer(request: pytest.FixtureRequest) -> Any:
    return _tokenizer(request.param)


@BOUNDED
@given(case=prompts_with_subjects(), start=st.none() | st.integers(-3, 40))
def test_subject_spans_fail_only_clearly(
    tokenizer: Any, case: tuple[str, str], start: int | None
) -> None:
    prompt, subject = case
    _only_clear_errors(lambda: tokens.char_span(prompt, subject))
    _only_clear_errors(lambda: tokens.subject_char_span(prompt, subject, start))
    _only_clear_errors(lambda: tokens.fill_template(prompt, subject))
    _only_clear_errors(
        lambda: tokens.encode_prompts(tokenizer, [prompt], [subject], "left", [start])
    )


@BOUNDED
@given(case=prompts_with_subjects(), target=PIECES)
def test_continuations_fail_only_clearly(
    tokenizer: Any, case: tuple[str, str], target: str
) -> None:
    prompt, subject = case

    def encode() -> None:
        batch = tokens.encode_continuations(tokenizer, [prompt], [target], [subject])
        assert int(batch.target_lengths[0]) >= 1
        assert 0 <= int(batch.first_text_index()[0]) < int(batch.target_lengths[0])

    _only_clear_errors(encode)
    _only_clear_errors(lambda: tokens.first_text_token(tokenizer, prompt, target))


@BOUNDED
@given(n_prompts=st.integers(0, 2), n_subjects=st.integers(0, 2))
def test_mismatched_and_empty_batches_fail_only_clearly(
    tokenizer: Any, n_prompts: int, n_subjects: int
) -> None:
    prompts, subjects = ["Toyota makes"] * n_prompts, ["Toyota"] * n_subjects
    _only_clear_errors(lambda: tokens.encode_prompts(tokenizer, prompts, subjects))
    _only_clear_errors(
        lambda: tokens.encode_continuations(tokenizer, prompts, ["cars"] * n_subjects)
    )
