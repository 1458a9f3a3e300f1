"""Never tune and report on the same cases: ``--tuned-on`` is refused when its cases share an
edited subject with ``--data``; the built-in tuning split shares none with a reported split; and
every shipped evaluation config that names its tuning split is checked against its data."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import forbid_model_load

from remedi import evaluate
from remedi.cli import UsageError, load_data
from remedi.data import load_builtin
from remedi.evaluation.compare import tuning_overlap

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def test_the_builtin_tuning_split_shares_no_subject_with_a_reported_split() -> None:
    tune = load_builtin("famous-tune")
    for reported in ("test", "famous-test"):
        assert tuning_overlap(tune, load_builtin(reported)) is None, reported
    # the check can fail: the built-in validation split shares subjects with training
    found = tuning_overlap(load_builtin("validation"), load_builtin("train")) or ""
    assert found.startswith("shares 12 subject(s) with the evaluated cases: Albert Einstein")


def test_tuning_on_the_reported_cases_is_refused_before_the_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    forbid_model_load(monkeypatch)
    argv = ["--method", "rome", "--data", "builtin:famous-test", "--output", str(tmp_path)]
    assert evaluate.main([*argv, "--tuned-on", "builtin:famous-test"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --tuned-on builtin:famous-test: shares 56 subject(s)")


@pytest.mark.parametrize(
    "config", sorted((ROOT / "configs" / "evaluate").glob("*.yaml")), ids=lambda p: p.stem
)
def test_each_config_tunes_on_cases_it_does_not_report(config: Path) -> None:
    """A config's ``tuned_on`` and ``data`` share no subject (a file of the shared data is
    checked where it is present: ``DATA/`` stands for it)."""
    settings = yaml.safe_load(config.read_text())
    tuned, data = settings.get("tuned_on"), settings.get("data")
    if tuned is None or data is None:
        pytest.skip(f"{config.name} names no tuning split")
    paths = [str(p).replace("DATA/", f"{SHARED}/") for p in (tuned, data)]
    missing = [p for p in paths if not p.startswith("builtin") and not Path(p).is_file()]
    if missing:
        pytest.skip(f"not here: {', '.join(missing)}")
    try:
        tuned_cases, data_cases = (load_data(p) for p in paths)
    except UsageError as err:
        pytest.fail(f"{config.name}: {err}")
    assert tuning_overlap(tuned_cases, data_cases) is None


@pytest.mark.skipif(not SHARED.is_dir(), reason="the shared data is not here")
def test_the_readme_tables_cases_share_no_subject_with_the_tuning_split() -> None:
    """The README's held-out CounterFact cases are cut from counterfact_500: no subject of the
    file is one ROME's settings were tuned on."""
    source = load_data(str(SHARED / "counterfact" / "counterfact_500_rome_format.json"))
    assert tuning_overlap(load_builtin("famous-tune"), source) is None
