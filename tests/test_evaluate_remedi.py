"""A trained REMEDI editor in remedi.evaluate's CounterFact table, with ``--remedi.alpha``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from evaluations_fixtures import trained_setup

from remedi import evaluate


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return trained_setup(tmp_path_factory.mktemp("remedi_eval"))


def _rows(trained: dict[str, Path], out: Path, *extra: str) -> dict[str, dict]:
    argv = ["--model", str(trained["model"]), "--data", str(trained["data"])]
    argv += ["--method", "none", "--method", "remedi", "--checkpoint", str(trained["checkpoint"])]
    assert evaluate.main([*argv, "--output", str(out), *extra]) == 0
    return {row["method"]: row for row in json.loads((out / "summary.json").read_text())}


def test_alpha_scales_the_edit_and_is_recorded_in_the_row(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    plain = _rows(trained, tmp_path / "a1")
    scaled = _rows(trained, tmp_path / "a3", "--remedi.alpha", "3")
    assert plain["remedi"]["settings"] == {"alpha": 1.0}
    assert scaled["remedi"]["settings"] == {"alpha": 3.0} and "settings" not in scaled["none"]
    unedited = plain["none"]["efficacy_magnitude"]
    assert scaled["none"]["efficacy_magnitude"] == pytest.approx(unedited)
    moved = plain["remedi"]["efficacy_magnitude"] - unedited
    # the one-step editor's direction is small, so the change is close to linear in alpha
    assert abs(moved) > 0
    assert scaled["remedi"]["efficacy_magnitude"] - unedited == pytest.approx(3 * moved, rel=0.1)


def test_remedi_is_measured_on_counterfact_plus_and_its_plain_neighbourhood_is_na(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    """REMEDI's plain neighbourhood prompts never mention the subject, so their score would be
    the unedited model's: it is n/a, and Score comes from ES, PS and NS+, which REMEDI moves."""
    rows = _rows(trained, tmp_path / "plus", "--remedi.alpha", "3")
    none, remedi = rows["none"], rows["remedi"]
    assert remedi["neighborhood_score"] is None and remedi["score_from"] == "ES, PS, NS+"
    assert none["score_from"] == "ES, PS, NS" and none["neighborhood_score"] is not None
    assert remedi["neighborhood_plus_magnitude"] != pytest.approx(
        none["neighborhood_plus_magnitude"], abs=1e-7
    )
    assert remedi["neighborhood_kl"] > 1e-6 > none["neighborhood_kl"]
    parts = [
        remedi["efficacy_score"],
        remedi["paraphrase_score"],
        remedi["neighborhood_plus_score"],
    ]
    expected = 0.0 if min(parts) == 0 else 3 / sum(1 / p for p in parts)
    assert remedi["score"] == pytest.approx(expected)
    table = (tmp_path / "plus" / "summary.md").read_text()
    assert "| n/a |" in table and "remedi: ES, PS, NS+" in table


def test_an_exported_editor_folder_edits_as_its_checkpoint(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    """``remedi.checkpoints.export`` writes the shipped format (safetensors + settings JSON, no
    optimiser state); the registry loads it wherever a checkpoint is taken, with the same edits."""
    import json as plain_json

    from safetensors.torch import load_file

    import remedi
    from remedi import checkpoints

    folder = checkpoints.export(trained["checkpoint"], tmp_path / "remedi-tiny")
    assert sorted(p.name for p in folder.iterdir()) == ["editor.safetensors", "settings.json"]
    settings = plain_json.loads((folder / "settings.json").read_text())
    assert settings["remedi"]["method"] == "remedi" and settings["hyper_parameters"]["layer"] == 1
    assert set(load_file(str(folder / "editor.safetensors"))) == {"linear.weight", "linear.bias"}
    lm = remedi.load_model(str(trained["model"]))
    cases = remedi.load_cases(trained["data"])
    rows = [
        remedi.compare(lm, [remedi.editor("remedi", checkpoint=path)], cases, progress=False)[0]
        for path in (trained["checkpoint"], folder)
    ]
    same = [k for k in rows[0] if not k.startswith(("seconds", "settings_sha256"))]
    assert {k: rows[0][k] for k in same} == {k: rows[1][k] for k in same}
    assert (
        evaluate.main(
            [
                "--model",
                str(trained["model"]),
                "--data",
                str(trained["data"]),
                "--method",
                "remedi",
                "--checkpoint",
                str(folder),
                "--output",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
