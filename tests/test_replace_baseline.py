"""The replace baseline (remedi.methods.replace) and ``remedi.evaluate --method replace``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import score_method, tiny_model

from remedi import evaluate
from remedi.data import EditCase
from remedi.methods.replace import partners, replaced_cases


def _case(cid: int, subject: str, true: str, new: str, relation: str = "P1") -> EditCase:
    return EditCase(
        case_id=cid,
        subject=subject,
        prompt="{} is located in",
        target_true=true,
        target_new=new,
        relation_id=relation,
        paraphrase_prompts=[f"Where is {subject}? It is located in"],
        neighborhood_prompts=["Lyon is located in"],
        generation_prompts=[f"{subject} is"],
    )


CASES = [
    _case(0, "Paris", "France", "Japan"),
    _case(1, "Tokyo", "Japan", "France"),
    _case(2, "Osaka", "Japan", "Italy"),
    _case(3, "Kyoto", "Japan ", "Spain", relation="P2"),
    _case(4, "Rome", "Italy", "Peru"),
]


def test_partner_has_the_new_object_as_its_truth_in_the_same_relation() -> None:
    assert [c.subject for c in partners(CASES[0], CASES)] == ["Tokyo", "Osaka"]
    assert [c.subject for c in partners(CASES[2], CASES)] == ["Rome"]
    assert partners(CASES[4], CASES) == []
    swapped = replaced_cases(CASES, seed=0)
    assert swapped[3] is None and swapped[4] is None and swapped[0] is not None
    kyoto_p1 = _case(5, "Kyoto", "Japan ", "Spain")
    assert partners(CASES[0], [*CASES, kyoto_p1])[-1] is kyoto_p1
    first = swapped[0]
    assert first.subject in ("Tokyo", "Osaka") and first.target_new == "Japan"
    assert first.paraphrase_prompts == [f"Where is {first.subject}? It is located in"]
    assert first.neighborhood_prompts == CASES[0].neighborhood_prompts
    assert first.rewrite_prompt == f"{first.subject} is located in"
    assert replaced_cases(CASES, seed=0) == swapped


def test_without_relation_ids_the_template_decides() -> None:
    a = _case(0, "Paris", "France", "Japan", relation="")
    b = _case(1, "Tokyo", "Japan", "France", relation="")
    c = EditCase(2, "Nagoya", "{} is a city in", "Japan", "Chile")
    assert partners(a, [a, b, c]) == [b]


def test_score_method_skips_and_counts_cases_without_a_partner() -> None:
    lm = tiny_model("gpt2")
    result = score_method(lm, "replace", CASES, progress=False)
    assert result.skipped == [3, 4] and result.per_case[4] == {}
    assert all("efficacy_score" in m for m in result.per_case[:3])


def test_evaluate_reports_replace_rows_and_skipped_cases(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lm = tiny_model("llama")
    model = tmp_path / "model"
    lm.model.save_pretrained(model)
    lm.tokenizer.save_pretrained(model)
    records = [
        {
            "case_id": c.case_id,
            "requested_rewrite": {
                "prompt": c.prompt,
                "relation_id": c.relation_id,
                "subject": c.subject,
                "target_new": {"str": c.target_new},
                "target_true": {"str": c.target_true},
            },
            "paraphrase_prompts": c.paraphrase_prompts,
            "neighborhood_prompts": c.neighborhood_prompts,
        }
        for c in CASES
    ]
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "out"
    args = ["--method", "replace", "--model", str(model), "--data", str(data)]
    assert evaluate.main([*args, "--output", str(out)]) == 0
    row = json.loads((out / "summary.json").read_text())
    assert row["method"] == "replace" and row["n_cases"] == 3 and row["n_skipped"] == 2
    lines = [json.loads(x) for x in (out / "cases.jsonl").read_text().splitlines()]
    assert [r.get("skipped", False) for r in lines] == [False] * 3 + [True] * 2
    assert "2 skipped (no other subject of the same relation" in capsys.readouterr().out


def test_seeds_rerun_the_partner_draw_and_report_the_spread() -> None:
    """Paris has two partners (Tokyo, Osaka): over seeds the draw changes, and the row reports
    seed 0's means with each mean's standard deviation over the seeds, computed here by hand."""
    import statistics

    import remedi
    from remedi.evaluation.runner import run_method

    lm = tiny_model("gpt2")
    drawn = {replaced_cases(CASES[:1], CASES, seed=s)[0].subject for s in range(6)}  # type: ignore[union-attr]
    assert drawn == {"Tokyo", "Osaka"}
    (row,) = remedi.compare(lm, ["replace"], CASES[:1], pool=CASES, seeds=6, progress=False)
    by_seed = []
    for seed in range(6):
        method = remedi.editor("replace")
        method.environment.pool, method.environment.seed = CASES, seed
        by_seed.append(run_method(lm, method, CASES[:1]).per_case[0]["efficacy_magnitude"])
    assert row["seeds"] == 6 and row["efficacy_magnitude"] == pytest.approx(by_seed[0])
    assert row["efficacy_magnitude_seed_std"] == pytest.approx(statistics.pstdev(by_seed))
    assert row["efficacy_magnitude_seed_std"] > 0
