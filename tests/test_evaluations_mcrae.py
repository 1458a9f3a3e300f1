"""McRae entailment (remedi.evaluation.mcrae): samples, correlations, methods and the command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from evaluations_fixtures import MCRAE_ROWS, trained_setup

from datamodules import McRaeDataModule
from datamodules.attribute_data import co_probabilities
from remedi import evaluate
from remedi.data.attributes import read_mcrae_frequencies
from remedi.evaluation import mcrae


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return trained_setup(tmp_path_factory.mktemp("mcrae"))


def _samples(
    path: Path, frequencies: dict[tuple[str, str], int] | None = None
) -> tuple[list[mcrae.EntailmentSample], dict[str, set[str]]]:
    module = McRaeDataModule(str(path), examples_per_concept=1, n_val=2, n_test=4)
    module.setup()
    features = module.read_features()
    co_prob = co_probabilities(features, 2)
    samples = mcrae.build_samples(module._test, features, co_prob, None, 0, frequencies)
    return samples, features


def test_correlation_matches_a_hand_computation() -> None:
    x, y = [1.0, 2.0, 4.0, 7.0], [0.5, 0.1, -0.3, -2.0]
    mx, my = sum(x) / 4, sum(y) / 4
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sx = math.sqrt(sum((a - mx) ** 2 for a in x))
    sy = math.sqrt(sum((b - my) ** 2 for b in y))
    assert mcrae.correlation(x, y) == pytest.approx(cov / (sx * sy))
    assert mcrae.correlation([1.0, 2.0], [3.0, 4.0]) is None
    assert mcrae.correlation([1.0, 1.0, 1.0], [3.0, 4.0, 5.0]) is None
    row = mcrae.summary_row("x", [0.2, None, 0.4], [0.5, 0.9, None])
    assert row["n_cases"] == 1 and row["co_correlation_change"] == pytest.approx(0.3)


def test_samples_hold_the_co_occurring_features_and_replace_finds_a_true_owner(
    trained: dict[str, Path],
) -> None:
    samples, features = _samples(trained["mcrae"])
    co_prob = co_probabilities(features, 2)
    assert len(samples) == 4
    for sample in samples:
        assert sample.context_feature not in features[sample.concept]
        expected = {g: p for (f, g), p in co_prob.items() if f == sample.context_feature}
        assert dict(zip(sample.features, map(math.exp, sample.log_co_probs), strict=True)) == (
            pytest.approx(expected)
        )
        for prompt in sample.prompts:
            start = sample.subject_start
            assert prompt[start : start + len(sample.entity)] == sample.entity
        other = mcrae.replacement(sample, features)
        assert other != sample.concept and sample.context_feature in MCRAE_ROWS[str(other)]
    frequencies = read_mcrae_frequencies(trained["mcrae"])
    with_own, _ = _samples(trained["mcrae"], frequencies)
    for sample in with_own:  # the concept's own features, with log Prod_Freq
        assert set(sample.original_features) == set(MCRAE_ROWS[sample.concept])
        for feature, log_f in zip(sample.original_features, sample.log_frequencies, strict=True):
            k = MCRAE_ROWS[sample.concept].index(feature)
            assert log_f == pytest.approx(math.log(5 + 6 * k))
    own_rows, _ = mcrae.method_rows(with_own, "none", original=True)
    assert [r.target for r in own_rows] == [t for x in with_own for t in x.original_targets]
    rows, _ = mcrae.method_rows(samples, "prefix")
    first = samples[rows[0].case_index]
    assert rows[0].prompt.startswith(first.context + " ") and rows[0].subject is None
    edited, _ = mcrae.method_rows(samples, "remedi")
    assert all(r.subject is not None for r in edited)
    with pytest.raises(ValueError, match="method 'rome'"):
        mcrae.method_rows(samples, "rome")


def test_mcrae_command_scores_every_method_before_and_after(trained: dict[str, Path]) -> None:
    out = trained["model"].parent / "out-mcrae"
    args = ["--task", "mcrae", "--model", str(trained["model"]), "--data", str(trained["mcrae"])]
    args += ["--checkpoint", str(trained["checkpoint"]), "--output", str(out)]
    args += ["--mcrae.n_val", "2", "--mcrae.n_test", "4"]
    assert evaluate.main(args) == 0
    rows = json.loads((out / "summary.json").read_text())
    assert [r["method"] for r in rows] == ["none", "prefix", "replace", "remedi"]
    assert len({r["co_correlation_before"] for r in rows}) == 1
    assert rows[0]["co_correlation_change"] == 0.0 and rows[2]["n_skipped"] == 0
    assert all(-1.0 <= r["co_correlation"] <= 1.0 for r in rows)
    # the original features: measured, the same before for every method, unchanged by none
    assert len({r["orig_correlation_before"] for r in rows}) == 1
    assert rows[0]["orig_correlation_change"] == 0.0
    assert all(-1.0 <= r["orig_correlation"] <= 1.0 for r in rows)
    assert rows[1]["orig_correlation"] != rows[0]["orig_correlation"]  # prefix moves them
    records = [json.loads(line) for line in (out / "cases.jsonl").read_text().splitlines()]
    assert len(records) == 4 * 4
    for record in records:
        if record["method"] == "replace":
            assert record["context_feature"] in MCRAE_ROWS[record["replacement"]]
    assert (
        (out / "summary.md")
        .read_text()
        .splitlines()[-1]
        .startswith("Protocol: McRae entailment correlations, scoring sum")
    )


def test_mcrae_command_leaves_the_earlier_table_whole_when_writing_fails(
    trained: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from remedi.evaluation import outputs

    out = trained["model"].parent / "out-mcrae-fail"
    args = ["--task", "mcrae", "--model", str(trained["model"]), "--data", str(trained["mcrae"])]
    args += ["--output", str(out), "--mcrae.n_val", "2", "--mcrae.n_test", "4", "--method", "none"]
    assert evaluate.main(args) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*_: object) -> str:
        raise RuntimeError("disk full")

    monkeypatch.setattr(outputs, "markdown_table", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        evaluate.main([*args[:-2], "--method", "prefix"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in out.parent.iterdir() if p.name.startswith("out-mcrae-fail.")] == []
