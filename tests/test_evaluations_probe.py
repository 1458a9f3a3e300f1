"""REMEDI as a probe (remedi.evaluation.probe): scores, labels, controls and the command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import COUNTERFACT_RECORDS, forbid_model_load, tiny_model
from evaluations_fixtures import trained_setup

from remedi import evaluate
from remedi.data import parse_records
from remedi.editors import IdentityEditor
from remedi.evaluation import probe
from remedi.tokens import encode_prompts


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return trained_setup(tmp_path_factory.mktemp("probe"))


def test_shuffled_labels_keep_the_balance_and_score_near_chance() -> None:
    rng = np.random.default_rng(1)
    labels = [bool(x) for x in rng.random(4000) < 0.5]
    perfect = probe.classification_metrics(labels, labels)
    assert perfect["accuracy"] == perfect["f1"] == perfect["mcc"] == 1.0
    shuffled = probe.shuffled_labels(labels, seed=0)
    assert sum(shuffled) == sum(labels) and shuffled != labels
    control = probe.classification_metrics(shuffled, labels)
    assert abs(control["mcc"]) < 0.05 and abs(control["accuracy"] - 0.5) < 0.03
    assert probe.shuffled_labels(labels, seed=0) == shuffled


def test_alignment_is_the_dot_product_of_per_dimension_zscores() -> None:
    torch.manual_seed(0)
    entity, direction = torch.randn(7, 3), torch.randn(7, 3) * 5 + 2
    e, d = entity.numpy(), direction.numpy()
    ze = (e - e.mean(0)) / e.std(0, ddof=1)
    zd = (d - d.mean(0)) / d.std(0, ddof=1)
    expected = (ze * zd).sum(1)
    assert np.allclose(probe.alignment(entity, direction).numpy(), expected, atol=1e-5)
    constant = torch.ones(7, 3)
    assert torch.equal(probe.zscore(constant), torch.zeros(7, 3))


def _constructed(n: int = 400, hidden: int = 4) -> tuple[probe.ProbeInputs, torch.Tensor]:
    """Inputs whose raw attribute states already point along the entity exactly when the LM
    follows the context: the identity editor must then be a perfect probe."""
    gen = torch.Generator().manual_seed(0)
    axis = torch.randn(hidden, generator=gen)
    signs = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)[:, None]
    follows = torch.rand(n, generator=gen) < 0.5
    entity = signs * axis + 0.01 * torch.randn(n, hidden, generator=gen)
    attr_new = torch.where(follows[:, None], signs, -signs) * axis
    logp_follow = torch.where(follows[:, None], torch.tensor([0.0, -1.0]), torch.tensor([-1.0, 0]))
    inputs = probe.ProbeInputs(
        case_ids=list(range(n)),
        attributes_new=attr_new,
        attributes_true=-attr_new,
        entity_prompt=entity,
        entity_in_context=entity,
        logp_prompt=logp_follow,
        logp_in_context=logp_follow,
    )
    return inputs, follows


def test_identity_editor_control_is_a_perfect_probe_on_constructed_inputs() -> None:
    inputs, follows = _constructed()
    identity = IdentityEditor(4)
    assert torch.equal(
        probe.directions(identity, inputs.attributes_new, inputs.entity_prompt),
        inputs.attributes_new,
    )
    _, fails = probe.task_labels(inputs, "fact-med")
    assert torch.equal(fails, ~follows)
    rows, records = probe.run_probe(identity, inputs, seed=0)
    by_key = {(r["method"], r["task"], r["labels"]): r for r in rows}
    assert set(by_key) == {
        ("remedi", "fact-med", "true"),
        ("remedi", "fact-med", "shuffled"),
        ("remedi", "fact-prior", "true"),
        ("remedi", "fact-prior", "shuffled"),
        ("remedi-identity", "fact-med", "true"),
        ("remedi-identity", "fact-prior", "true"),
    }
    for task in probe.TASKS:
        assert by_key["remedi-identity", task, "true"]["accuracy"] == 1.0
        assert by_key["remedi-identity", task, "true"]["mcc"] == 1.0
        assert abs(by_key["remedi", task, "shuffled"]["mcc"]) < 0.15
    first = next(r for r in records if r["method"] == "remedi-identity")
    expected = probe.alignment(inputs.entity_in_context, inputs.attributes_new)[0]
    assert first["score_new"] == pytest.approx(float(expected), abs=1e-5)
    assert len(records) == 4 * 400


def test_entity_states_are_the_block_outputs_at_each_mention() -> None:
    lm = tiny_model("gpt2")
    cases, _ = parse_records(COUNTERFACT_RECORDS)
    inputs = probe.probe_inputs(lm, cases, editor_layer=0, entity_layer=1)
    assert inputs.attributes_new.shape == (2, lm.arch.hidden_size)
    for i, case in enumerate(cases):
        _, _, text, start = probe.case_prompts(case)
        assert text.index(case.subject) < start == text.rindex(case.subject)
        batch = encode_prompts(lm.tokenizer, [text], [case.subject], subject_starts=[start])
        with torch.no_grad():
            hidden = lm.model(batch.input_ids, output_hidden_states=True).hidden_states[2]
        assert torch.allclose(
            inputs.entity_in_context[i], hidden[0, batch.subject_last[0]], atol=1e-5
        )
    assert not torch.allclose(inputs.attributes_new, inputs.attributes_true)


def test_probe_command_writes_the_table_with_both_controls(trained: dict[str, Path]) -> None:
    out = trained["model"].parent / "out-probe"
    args = ["--task", "probe", "--model", str(trained["model"]), "--data", str(trained["data"])]
    args += ["--checkpoint", str(trained["checkpoint"]), "--output", str(out)]
    assert evaluate.main([*args, "--probe.entity_layer", "2"]) == 0
    rows = json.loads((out / "summary.json").read_text())
    assert len(rows) == 6 and {r["labels"] for r in rows} == {"true", "shuffled"}
    assert {r["method"] for r in rows} == {"remedi", "remedi-identity"}
    assert all(r["entity_layer"] == 2 and r["metric_family"] == "probe" for r in rows)
    assert all(0.0 <= r["accuracy"] <= 1.0 and -1.0 <= r["mcc"] <= 1.0 for r in rows)
    table = (out / "summary.md").read_text().splitlines()
    assert table[-1].startswith("Protocol: REMEDI probe (Fact-Med / Fact-Prior) classification")
    assert len((out / "cases.jsonl").read_text().splitlines()) == 4 * 2
    # each true-label row's accuracy and MCC recomputed from its per-case records: the
    # prediction is the score comparison, the metrics scikit-learn's
    from sklearn.metrics import accuracy_score, matthews_corrcoef

    records = [json.loads(line) for line in (out / "cases.jsonl").read_text().splitlines()]
    for row in (r for r in rows if r["labels"] == "true"):
        mine = [x for x in records if x["method"] == row["method"] and x["task"] == row["task"]]
        for x in mine:
            holds_new = x["score_new"] > x["score_true"]
            assert x["predicted_fails"] == (
                not holds_new if row["task"] == "fact-med" else holds_new
            )
        truth = [x["lm_fails"] for x in mine]
        guess = [x["predicted_fails"] for x in mine]
        assert row["accuracy"] == pytest.approx(accuracy_score(truth, guess))
        assert row["mcc"] == pytest.approx(matthews_corrcoef(truth, guess), abs=1e-9)


def test_probe_mistakes_stop_before_the_model_loads(
    trained: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    forbid_model_load(monkeypatch)
    args = ["--task", "probe", "--data", str(trained["data"]), "--output", "unused"]
    assert evaluate.main(args) == 2
    assert "--method remedi needs --checkpoint PATH" in capsys.readouterr().err
    assert evaluate.main([*args, "--method", "rome"]) == 2
    assert "--method rome: --task probe scores remedi" in capsys.readouterr().err
