"""The evaluation's measures beyond ES/PS/NS, each checked against a value computed another way:
the CounterFact+ neighbourhood KL, the held-out perplexity ratio, bootstrap intervals, and the
hash that keeps different case lists out of one table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import COUNTERFACT_RECORDS as RECORDS
from conftest import tiny_model

import remedi
from remedi import evaluate
from remedi.data import parse_records
from remedi.evaluation.uncertainty import intervals
from remedi.metrics.perplexity import HeldoutText, perplexity, windows
from remedi.metrics.specificity import coarse_kl, next_token_logprobs, plus_rows, references
from remedi.tokens import encode_continuations


def test_neighbourhood_kl_is_the_full_kl_when_the_vocabulary_fits() -> None:
    """On a tiny vocabulary (320 < TOP_K) the coarsened KL is the exact KL, computed here with
    torch's own ``kl_div`` from two distributions."""
    lm = tiny_model("gpt2")
    case = parse_records(RECORDS)[0][0]
    (reference,) = references(lm.model, lm.tokenizer, [case])
    rows = plus_rows(case, 0)
    batch = encode_continuations(
        lm.tokenizer,
        [r.prompt for r in rows],
        [r.target for r in rows],
        subjects=[case.subject] * len(rows),
    )
    p_log = next_token_logprobs(lm.model, batch)
    q_log = torch.log_softmax(p_log + torch.linspace(0, 3, p_log.shape[-1]), -1)
    for i, ref in enumerate(reference):
        exact = torch.nn.functional.kl_div(q_log[i], p_log[i], log_target=True, reduction="sum")
        assert coarse_kl(ref, q_log[i]) == pytest.approx(float(exact), rel=1e-4, abs=1e-7)
        assert coarse_kl(ref, p_log[i]) == pytest.approx(0.0, abs=1e-6)


def test_perplexity_is_the_exponent_of_the_mean_token_loss() -> None:
    lm = tiny_model("llama")
    chunks = windows(lm, HeldoutText(n_tokens=40, window=20))
    assert [len(c) for c in chunks] == [20, 20]
    losses = []
    for chunk in chunks:
        ids = torch.tensor([lm.tokenizer("")["input_ids"] + chunk])
        logits = lm.model(ids).logits[0, :-1].float()
        losses.append(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none"))
    expected = math.exp(float(torch.cat(losses).mean()))
    assert perplexity(lm, chunks) == pytest.approx(expected, rel=1e-4)


def test_bootstrap_intervals_hold_the_mean_and_shrink_with_more_cases() -> None:
    rng = np.random.default_rng(1)
    few = [{"efficacy_score": float(v)} for v in rng.random(10) < 0.7]
    many = [{"efficacy_score": float(v)} for v in rng.random(400) < 0.7]
    (low_f, high_f) = intervals(few, ["efficacy_score"])["efficacy_score_ci95"]  # type: ignore[misc]
    (low_m, high_m) = intervals(many, ["efficacy_score"])["efficacy_score_ci95"]  # type: ignore[misc]
    mean = np.mean([m["efficacy_score"] for m in many])
    assert low_m <= mean <= high_m and high_m - low_m < high_f - low_f
    # 400 Bernoulli(0.7) draws: the normal interval's half-width is about 0.045
    assert high_m - low_m == pytest.approx(2 * 1.96 * math.sqrt(mean * (1 - mean) / 400), rel=0.2)
    same = [{"efficacy_score": 1.0}] * 5
    assert intervals(same, ["efficacy_score"])["efficacy_score_ci95"] == [1.0, 1.0]


def test_rows_name_their_cases_and_a_table_of_other_cases_refuses_to_append(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    lm = tiny_model("llama")
    lm.model.save_pretrained(tmp_path / "model")
    lm.tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "cf.json").write_text(json.dumps(RECORDS))
    argv = ["--model", str(tmp_path / "model"), "--data", str(tmp_path / "cf.json")]
    argv += ["--output", str(tmp_path / "out"), "--heldout-tokens", "64"]
    assert evaluate.main([*argv, "--method", "none", "--method", "prefix"]) == 0
    none, prefix = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert none["data"] == str(tmp_path / "cf.json") and none["limit"] is None
    assert none["data_sha256"] == prefix["data_sha256"] and len(none["data_sha256"]) == 64
    assert none["perplexity_ratio"] == pytest.approx(1.0, abs=1e-4)
    assert prefix["perplexity_ratio"] != pytest.approx(1.0, abs=1e-4)
    assert prefix["neighborhood_kl"] > 1e-6 and none["neighborhood_kl"] < 1e-6
    low, high = none["efficacy_score_ci95"]
    assert low <= none["efficacy_score"] <= high
    assert evaluate.main([*argv, "--method", "prefix", "--append"]) == 0
    capsys.readouterr()
    assert evaluate.main([*argv, "--method", "none", "--limit", "1", "--append"]) == 2
    assert "--append: the table in summary.json was measured on other cases" in (
        capsys.readouterr().err
    )


def test_settings_digest_changes_with_a_setting_and_names_the_optimised_dtype() -> None:
    lm = tiny_model("gpt2")
    cases = parse_records(RECORDS)[0][:1]
    rows = [
        remedi.compare(
            lm,
            [remedi.editor("rome", steps=s, layer=1)],
            cases,
            no_stats=True,
            progress=False,
            heldout_tokens=0,
        )[0]
        for s in (1, 2)
    ]
    assert rows[0]["settings_sha256"] != rows[1]["settings_sha256"]
    assert rows[0]["settings"]["optimise_dtype"] in ("float32", "bfloat16")
    assert rows[0]["data_sha256"] == rows[1]["data_sha256"]


def test_the_reference_score_idf_can_come_from_a_named_corpus(tmp_path: Path) -> None:
    from remedi.metrics import reference_vectorizer

    corpus = tmp_path / "wiki.txt"
    corpus.write_text("Zebras graze on the savanna.\n\nQuokkas live on Rottnest Island.\n")
    fitted = reference_vectorizer(str(corpus))
    assert set(fitted.vocabulary_) == {
        "zebras",
        "graze",
        "on",
        "the",
        "savanna",
        "quokkas",
        "live",
        "rottnest",
        "island",
    }
    assert "quokkas" not in reference_vectorizer().vocabulary_


def _easyedit_zsre(n: int) -> list[dict]:
    """``n`` zsRE records in EasyEdit's layout, each one's locality prompt the next one's
    question (as 424 of the 500 records of EasyEdit's zsRE dev conversion have it)."""
    subjects = ["Pyhrn Pass", "Hammarby IF", "Lake Bled", "Mount Tabor", "River Tay"]
    records = []
    for i in range(n):
        records.append(
            {
                "case_id": f"z{i}",
                "dataset": "zsre",
                "prompt": f"Which place is {subjects[i]} near?",
                "subject": subjects[i],
                "target_new": "Saxony",
                "ground_truth": f"Place {i}",
                "rephrase_prompt": [f"What is {subjects[i]} near?"],
                "locality": [
                    {
                        "prompt": f"Which place is {subjects[(i + 1) % n]} near?",
                        "ground_truth": f"Place {(i + 1) % n}",
                    }
                ],
            }
        )
    return records


def test_zsre_locality_prompts_are_never_the_questions_of_edited_records(tmp_path: Path) -> None:
    from remedi.data import load_cases
    from remedi.data.locality import disjoint_locality

    path = tmp_path / "zsre.json"
    path.write_text(json.dumps(_easyedit_zsre(5)))
    pool = load_cases(path)
    edited, note = disjoint_locality(pool[:2], pool)
    questions = {c.rewrite_prompt for c in edited}
    assert all(p not in questions for c in edited for p in c.neighborhood_prompts)
    assert [c.neighborhood_prompts for c in edited] == [
        [pool[2].rewrite_prompt],
        [pool[3].rewrite_prompt],
    ]
    assert [c.neighborhood_targets for c in edited] == [["Place 2"], ["Place 3"]]
    assert note.startswith("2 of 2 replaced by held-out records' questions")
    with pytest.raises(ValueError, match="no record is left out of the evaluation"):
        disjoint_locality(pool, pool)
    lm = tiny_model("llama")
    rows = remedi.compare(lm, ["none", "prefix"], pool, limit=2, progress=False)
    assert [r["locality"] for r in rows] == [note, note]
    assert rows[0]["locality_agreement"] == 1.0
    assert 0.0 <= rows[1]["locality_agreement"] <= 1.0


def test_unrelated_entropy_is_measured_under_each_edit() -> None:
    """none's value is the unedited model's; prefix's is the model's after the edit's
    statement: both computed here directly and compared with the rows."""
    from remedi.methods.prefix import statement
    from remedi.metrics.generation import unrelated_entropy

    lm = tiny_model("llama")
    cases = parse_records(RECORDS)[0][:1]
    rows = remedi.compare(lm, ["none", "prefix"], cases, progress=False, unrelated_tokens=12)
    assert rows[0]["unrelated_entropy"] == pytest.approx(unrelated_entropy(lm, 12))
    expected = unrelated_entropy(lm, 12, statement(cases[0]))
    assert rows[1]["unrelated_entropy"] == pytest.approx(expected)
    assert rows[1]["unrelated_entropy"] != pytest.approx(rows[0]["unrelated_entropy"])
