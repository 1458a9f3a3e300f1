"""The famous-neighbour built-in splits: harder neighbourhoods, two splits that share no subject."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from remedi import evaluate
from remedi.cli import UsageError
from remedi.data import ALL_SPLITS, FAMOUS_SPLITS, SPLITS, EditCase, load_builtin
from remedi.metrics import ScoredRow, row_probabilities
from remedi.models import LoadedModel


def _key(text: str) -> str:
    text = text.strip().lower()
    return text[4:] if text.startswith("the ") else text


def neighbour_subject(case: EditCase, prompt: str) -> str:
    """The subject of a prompt written with the case's template ("The {} is" may lose "The ")."""
    before, _, after = case.prompt.partition("{}")
    assert prompt.endswith(after), (case.case_id, prompt)
    head = prompt[: len(prompt) - len(after)]
    for prefix in (before, re.sub(r"[Tt]he $", "", before)):
        if prefix and head.startswith(prefix):
            return head[len(prefix) :]
    return head


def subjects(cases: list[EditCase]) -> set[str]:
    out = set()
    for case in cases:
        out.add(_key(case.subject))
        out |= {_key(neighbour_subject(case, p)) for p in case.neighborhood_prompts}
        out |= {_key(neighbour_subject(case, p)) for p in case.attribute_prompts}
    return out


@pytest.fixture(scope="module")
def famous() -> dict[str, list[EditCase]]:
    return {name: load_builtin(name) for name in FAMOUS_SPLITS}


def test_famous_splits_load(famous: dict[str, list[EditCase]]) -> None:
    assert FAMOUS_SPLITS == ("famous-tune", "famous-test")
    assert ALL_SPLITS == SPLITS + FAMOUS_SPLITS
    for name, cases in famous.items():
        assert len(cases) >= 45, name
        assert all(c.benchmark == "counterfact" for c in cases)
        assert [c.case_id for c in evaluate.load_data(f"builtin:{name}")] == [
            c.case_id for c in cases
        ]
    # builtin alone is still the three original splits
    assert len(load_builtin()) == sum(len(load_builtin(s)) for s in SPLITS)
    ids = [c.case_id for cases in famous.values() for c in cases]
    original = {c.case_id for c in load_builtin()}
    assert len(set(ids)) == len(ids)
    assert not original & set(ids)
    with pytest.raises(ValueError, match="famous-tune, famous-test"):
        load_builtin("famous")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="famous-test"):
        evaluate.load_data("builtin:famous")


def test_famous_test_repeats_no_fact_editors_are_trained_or_selected_on(
    famous: dict[str, list[EditCase]],
) -> None:
    trained_on = {(c.subject, c.prompt) for s in ("train", "validation") for c in load_builtin(s)}
    repeated = [c.case_id for c in famous["famous-test"] if (c.subject, c.prompt) in trained_on]
    assert repeated == []


def test_famous_splits_share_no_subject(famous: dict[str, list[EditCase]]) -> None:
    tune, test = (subjects(famous[name]) for name in FAMOUS_SPLITS)
    assert not tune & test
    edited = [{c.subject for c in cases} for cases in famous.values()]
    assert not edited[0] & edited[1]


def test_famous_cases_are_well_formed(famous: dict[str, list[EditCase]]) -> None:
    for cases in famous.values():
        for case in cases:
            cid = case.case_id
            assert case.target_new and case.target_new != case.target_true, cid
            assert 2 <= len(case.paraphrase_prompts) <= 3, cid
            assert 3 <= len(case.neighborhood_prompts) <= 6, cid
            assert case.attribute_prompts and case.generation_prompts, cid
            assert all(case.subject not in p for p in case.neighborhood_prompts), cid
            assert all(case.subject not in p for p in case.attribute_prompts), cid
            neighbours = [_key(neighbour_subject(case, p)) for p in case.neighborhood_prompts]
            assert len(set(neighbours)) == len(neighbours), cid
            assert _key(case.subject) not in neighbours, cid


def test_famous_relations_are_varied_and_balanced(famous: dict[str, list[EditCase]]) -> None:
    tune, test = (Counter(c.relation_id for c in famous[name]) for name in FAMOUS_SPLITS)
    assert set(tune) == set(test)
    assert len(tune) >= 10
    # split balanced (within one case a relation), then famous-test lost the facts that repeat
    # built-in training facts (official language, sport, landmark city, ...): never more
    for relation in tune:
        assert test[relation] >= 1 and test[relation] - tune[relation] <= 1, relation
    # the neighbours of a case share the edited case's true object, across many cases
    same = Counter(c.target_true for cases in famous.values() for c in cases)
    assert len(same) >= 20


@pytest.mark.slow
def test_default_model_knows_the_famous_facts(
    gemma: LoadedModel, famous: dict[str, list[EditCase]]
) -> None:
    """Unedited, the default model prefers the true object on every rewrite and neighbour."""
    for name, cases in famous.items():
        rows = [
            ScoredRow(i, "neighborhood", prompt, None, target)
            for i, case in enumerate(cases)
            for prompt in (case.rewrite_prompt, *case.neighborhood_prompts)
            for target in (case.target_true, case.target_new or "")
        ]
        probs = row_probabilities(gemma.model, gemma.tokenizer, rows, batch_size=64)
        known = (probs[0::2] > probs[1::2]).float().mean().item()
        print(f"{name}: known {known:.3f} of {len(rows) // 2} prompts")
        assert known >= 0.99, name
