"""``remedi.evaluate --config FILE``, dotted per-method flags and ``--print_config``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import COUNTERFACT_RECORDS as RECORDS
from conftest import tiny_model

from remedi import evaluate
from remedi.evaluation import compare
from remedi.evaluation import config as evaluate_config
from remedi.methods.finetune import FinetuneHyperParams
from remedi.methods.memit import MemitHyperParams
from remedi.methods.rome import RomeHyperParams

CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "evaluate").glob("*.yaml"))


def _printed(capsys: pytest.CaptureFixture, *argv: str) -> dict[str, Any]:
    assert evaluate.main(["--print_config", *argv]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_the_shipped_configs_exist() -> None:
    assert {path.name for path in CONFIGS} >= {"counterfact_gemma3.yaml", "quick.yaml"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.name)
def test_each_config_parses_and_overrides_win(
    config: Path, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    printed = _printed(capsys, "--config", str(config))
    assert printed["method"] and printed["data"] and printed["output"]
    assert RomeHyperParams(**printed["rome"]) and FinetuneHyperParams(**printed["ft"])
    assert MemitHyperParams(**printed["memit"])
    override = ["--rome.clamp", "3.5", "--memit.layers", "[0, 1]", "--method", "none"]
    changed = _printed(capsys, "--config", str(config), *override, "--ft.lr", "0.01")
    assert changed["rome"]["clamp"] == 3.5 and changed["memit"]["layers"] == [0, 1]
    assert changed["ft"]["lr"] == 0.01 and changed["method"] == ["none"]
    again = tmp_path / "printed.yaml"
    again.write_text(yaml.safe_dump(changed))
    assert _printed(capsys, "--config", str(again)) == changed


def test_precedence_defaults_file_flat_alias_dotted(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "method: [rome, memit]\ndata: builtin\noutput: out\nlimit: 2\n"
        "rome: {clamp: 2.0, steps: 7}\nmemit: {layers: [0, 1], steps: 9}\n"
    )
    printed = _printed(capsys, "--config", str(config), "--steps", "4", "--memit.steps", "11")
    assert printed["limit"] == 2 and printed["method"] == ["rome", "memit"]
    assert printed["rome"]["clamp"] == 2.0 and printed["rome"]["steps"] == 4
    assert printed["memit"]["steps"] == 11 and printed["memit"]["layers"] == [0, 1]
    assert "steps" not in printed and "memit_layers" not in printed
    assert _printed(capsys, "--config", str(config), "--limit", "5")["limit"] == 5


def test_rome_and_ft_overrides_reach_the_method(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REMEDI_CACHE", str(tmp_path / "cache"))
    lm = tiny_model("llama")
    lm.model.save_pretrained(tmp_path / "model")
    lm.tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "cf.json").write_text(json.dumps(RECORDS))
    config = tmp_path / "c.yaml"
    config.write_text(
        f"method: [rome, ft-l, memit]\nmodel: {tmp_path / 'model'}\ndata: {tmp_path / 'cf.json'}\n"
        f"output: {tmp_path / 'out'}\nlimit: 1\nno_stats: true\n"
        "rome: {steps: 2, n_context: 1}\nmemit: {steps: 2, n_context: 0}\nft: {steps: 2}\n"
    )
    seen: dict[str, Any] = {}
    run = compare.run_method

    def spy(lm: Any, method: Any, cases: Any, *rest: Any) -> Any:
        resolved = method.resolve(lm)
        seen[method.name] = {"hparams": resolved, "layer": getattr(resolved, "layer", None)}
        return run(lm, method, cases, *rest)

    monkeypatch.setattr(compare, "run_method", spy)
    extra = [
        "--rome.clamp",
        "2.5",
        "--rome.layer",
        "0",
        "--ft.eps",
        "0.01",
        "--memit.layers",
        "[1]",
    ]
    assert evaluate.main(["--config", str(config), *extra, "--ft.lr", "0.002"]) == 0
    rome = seen["rome"]["hparams"]
    assert isinstance(rome, RomeHyperParams) and seen["rome"]["layer"] == 0
    assert (rome.clamp, rome.steps, rome.n_context) == (2.5, 2, 1)
    ft = seen["ft-l"]["hparams"]
    assert (ft.eps, ft.lr, ft.steps) == (0.01, 0.002, 2)
    assert seen["ft-l"]["layer"] == ft.layer == evaluate_config.model_defaults(lm)["ft"]["layer"]
    assert seen["memit"]["hparams"].layers == (1,) and seen["memit"]["hparams"].n_context == 0


def test_null_fields_take_the_model_defaults() -> None:
    lm = tiny_model("gpt2")
    hp = evaluate_config.resolved(lm, "rome", RomeHyperParams(clamp=None))
    assert hp.layer == evaluate_config.model_defaults(lm)["rome"]["layer"] and hp.clamp == 4.0
    assert evaluate_config.resolved(lm, "rome", RomeHyperParams(layer=1)).layer == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rome.clamp", "abc"], "error: --rome.clamp: "),
        (["--rome.bogus", "1"], "error: unrecognized arguments: --rome.bogus 1"),
        (["--config", "nope.yaml"], "error: --config: File does not exist"),
        (["--rome.n_context", "99", "--method", "rome"], "error: --rome.n_context must be in 0.."),
        (["--rome.clamp"], "error: --rome.clamp needs a value"),
        (["--remedi.alpha", "0"], "error: remedi.alpha must be a finite number > 0, got 0.0"),
        (["--remedi.alpha", "-2"], "error: remedi.alpha must be a finite number > 0, got -2.0"),
    ],
)
def test_bad_settings_are_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    base = ["--method", "none", "--data", "builtin", "--output", str(tmp_path / "out")]
    assert evaluate.main([*base, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message)
    assert not (tmp_path / "out").exists()


def test_unknown_config_keys_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("limt: 3\n")
    assert evaluate.main(["--config", str(config)]) == 2
    assert "'limt' is not accepted" in capsys.readouterr().err


def test_help_lists_the_sections(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        evaluate.main(["--help"])
    text = capsys.readouterr().out
    assert "--print_config" in text and "--rome.FIELD VALUE  RomeHyperParams: layer=None" in text
    assert "--memit.FIELD" in text and "--ft.FIELD" in text
    assert "--remedi.FIELD VALUE RemediSettings: alpha=1.0" in text
