"""Edit-case readers for every layout, validation of bad records, and the built-in facts."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from remedi.data import CaseError, load_builtin, load_cases, read_cases
from remedi.methods.requests import as_request

ROME_RECORD = {
    "case_id": 7,
    "pararel_idx": 1,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is",
        "relation_id": "P103",
        "target_new": {"str": "English", "id": "Q1860"},
        "target_true": {"str": "French", "id": "Q150"},
        "subject": "Danielle Darrieux",
    },
    "paraphrase_prompts": ["Danielle Darrieux spoke the language"],
    "neighborhood_prompts": ["The mother tongue of Léon Blum is"],
    "attribute_prompts": ["J.R.R. Tolkien is a native speaker of"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}
MEND_RECORD = {
    "case_id": 3,
    "prompt": "Autonomous University of Madrid, which is located in",
    "target_new": "Sweden",
    "subject": "Autonomous University of Madrid",
    "ground_truth": "Spain",
    "rephrase_prompt": "Autonomous University of Madrid is located in",
    "locality_prompt": "Biure, which is located in",
    "locality_ground_truth": "Spain",
}
KNOWN_RECORD = {
    "known_id": 1,
    "subject": "Beats Music",
    "attribute": "Apple",
    "template": "{} is owned by",
    "prediction": " Apple, which",
    "prompt": "Beats Music is owned by",
    "relation_id": "P127",
}
ZSRE_RECORD = {
    "subject": "UniFirst",
    "src": "What is the product made by UniFirst?",
    "pred": "uniform",
    "rephrase": "What will be the product of UniFirst?",
    "alt": "unmanned aircraft",
    "answers": ["uniform"],
    "loc": "nq question: who wrote hamlet",
    "loc_ans": "Shakespeare",
}
EASYEDIT_RECORD = {
    "case_id": "zsre_1",
    "prompt": "Which state is Pyhrn Pass located?",
    "subject": "Pyhrn Pass",
    "target_new": "Saxony",
    "ground_truth": "Styria",
    "rephrase_prompt": ["What state is Pyhrn Pass?", "Where is Pyhrn Pass?"],
    "locality": [{"prompt": "Home arena of Hammarby IF?", "ground_truth": "Hammarby IP"}],
}


def _write(tmp_path: Path, records, name: str = "data.json") -> Path:
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("\n".join(json.dumps(r) for r in records))
    else:
        path.write_text(json.dumps(records))
    return path


def test_rome_layout(tmp_path: Path) -> None:
    (case,) = load_cases(_write(tmp_path, [ROME_RECORD]))
    assert case.case_id == 7
    assert case.prompt == "The mother tongue of {} is"
    assert case.rewrite_prompt == "The mother tongue of Danielle Darrieux is"
    assert (case.target_true, case.target_new, case.relation_id) == ("French", "English", "P103")
    assert case.paraphrase_prompts == ROME_RECORD["paraphrase_prompts"]
    assert case.generation_prompts and case.attribute_prompts and case.neighborhood_prompts


def test_mend_layout_builds_template(tmp_path: Path) -> None:
    (case,) = load_cases(_write(tmp_path, [MEND_RECORD], "data.jsonl"))
    assert case.prompt == "{}, which is located in"
    assert (case.target_true, case.target_new) == ("Spain", "Sweden")
    assert case.neighborhood_prompts == ["Biure, which is located in"]
    assert case.neighborhood_targets is None


def test_easyedit_and_zsre_layouts(tmp_path: Path) -> None:
    (easy,) = load_cases(_write(tmp_path, {"records": [EASYEDIT_RECORD]}))
    assert easy.paraphrase_prompts[1] == "Where is Pyhrn Pass?"
    assert easy.neighborhood_targets == ["Hammarby IP"]
    (zsre,) = load_cases(_write(tmp_path, [ZSRE_RECORD], "z.json"))
    assert zsre.case_id == 0
    assert zsre.prompt == "What is the product made by {}?"
    assert (zsre.target_true, zsre.target_new) == ("uniform", "unmanned aircraft")
    assert zsre.neighborhood_targets == ["Shakespeare"]


def test_a_zsre_edit_to_the_true_answer_loads_and_makes_a_request(tmp_path: Path) -> None:
    """zsRE edits whose target is the true answer (23 of the 500 EasyEdit dev records) are
    valid zsRE cases; a CounterFact record with identical targets is still refused."""
    same = {**EASYEDIT_RECORD, "target_new": "Styria"}
    (case,) = load_cases(_write(tmp_path, {"records": [same]}, "z.json"))
    assert case.benchmark == "zsre" and case.target_new == case.target_true == "Styria"
    request = as_request(case)
    assert (request.target_new, request.target_true) == ("Styria", None)
    with pytest.raises(CaseError, match="equals target_true"):
        load_cases(_write(tmp_path, [{**MEND_RECORD, "target_new": "Spain"}]))


def test_the_layout_chooses_the_benchmark(tmp_path: Path) -> None:
    """zsRE files (MEND's zsRE layout, flattened files whose locality prompts carry answers of
    their own) are scored as zsRE; CounterFact files, flattened or not, as CounterFact."""
    (zsre,) = load_cases(_write(tmp_path, [ZSRE_RECORD], "z.json"))
    (easy,) = load_cases(_write(tmp_path, {"records": [EASYEDIT_RECORD]}, "e.json"))
    (tagged,) = load_cases(_write(tmp_path, [{**MEND_RECORD, "dataset": "zsre"}], "t.json"))
    assert (zsre.benchmark, easy.benchmark, tagged.benchmark) == ("zsre", "zsre", "zsre")
    (rome,) = load_cases(_write(tmp_path, [ROME_RECORD], "r.json"))
    (mend,) = load_cases(_write(tmp_path, [MEND_RECORD], "m.json"))
    assert (rome.benchmark, mend.benchmark) == ("counterfact", "counterfact")
    mixed = [MEND_RECORD, {**MEND_RECORD, "locality_ground_truth": "Canada"}]
    cases, report = read_cases(_write(tmp_path, mixed, "mixed.json"))
    assert report.benchmark == "zsre" and {c.benchmark for c in cases} == {"zsre"}
    assert all(c.benchmark == "counterfact" for c in load_builtin("test"))


def test_subject_start_is_the_template_slot() -> None:
    case = load_builtin("test")[0]
    assert case.rewrite_prompt[case.subject_start :].startswith(case.subject)


def test_known_facts_layout(tmp_path: Path) -> None:
    (case,) = load_cases(_write(tmp_path, [KNOWN_RECORD]))
    assert (case.case_id, case.prompt, case.target_true) == (1, "{} is owned by", "Apple")
    assert case.target_new is None


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"subject": "Somebody Else"}, "paraphrase_prompts[0]"),
        ({"target_new": {"str": ""}}, "target_new"),
        ({"target_new": {"str": "French"}}, "target_new"),
        ({"prompt": "{} and {} spoke"}, "prompt"),
        ({"target_true": {"str": " "}}, "target_true"),
    ],
)
def test_bad_records_name_case_and_field(tmp_path: Path, change: dict, field: str) -> None:
    bad = json.loads(json.dumps(ROME_RECORD))
    bad["case_id"] = 99
    bad["requested_rewrite"].update(change)
    path = _write(tmp_path, [ROME_RECORD, bad])
    with pytest.raises(CaseError, match=rf"case 99: {re.escape(field)}: [^c]") as info:
        load_cases(path)
    assert info.value.case_id == 99 and info.value.field == field
    cases, report = read_cases(path, on_error="skip")
    assert [c.case_id for c in cases] == [7]
    assert len(report.skipped) == 1 and report.skipped[0].field == field


def test_subject_missing_from_flat_prompt(tmp_path: Path) -> None:
    bad = {**MEND_RECORD, "subject": "Madrid University"}
    with pytest.raises(CaseError, match=r"case 3: subject: 'Madrid University' does not occur"):
        load_cases(_write(tmp_path, [bad]))


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_cases(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_cases(broken)
    with pytest.raises(ValueError, match="unrecognised record layout"):
        load_cases(_write(tmp_path, [{"foo": 1}]))
    with pytest.raises(ValueError, match="no records"):
        load_cases(_write(tmp_path, []))
    with pytest.raises(ValueError, match="on_error"):
        load_cases(_write(tmp_path, [ROME_RECORD]), on_error="ignore")  # type: ignore[arg-type]


def test_builtin_facts_shape() -> None:
    splits = {name: load_builtin(name) for name in ("train", "validation", "test")}
    everything = load_builtin()
    assert len(everything) >= 200
    assert sum(len(v) for v in splits.values()) == len(everything)
    ids = [c.case_id for c in everything]
    assert len(set(ids)) == len(ids)
    relations = Counter(c.relation_id for c in everything)
    assert len(relations) >= 8
    for cases in splits.values():
        assert {c.relation_id for c in cases} == set(relations)
    for case in everything:
        assert len(case.paraphrase_prompts) >= 2, case.case_id
        assert len(case.neighborhood_prompts) >= 3, case.case_id
        assert len(case.generation_prompts) >= 1, case.case_id
        assert all(case.subject not in p for p in case.neighborhood_prompts), case.case_id
    with pytest.raises(ValueError, match="split 'dev'"):
        load_builtin("dev")  # type: ignore[arg-type]
