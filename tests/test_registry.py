"""The editor registry and the Python API: every method is one registered object that the
commands and a notebook reach the same way; a method registered inside a test runs through the
evaluation and the edit command without any other file knowing it."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import COUNTERFACT_RECORDS as RECORDS
from conftest import tiny_model

import remedi
from remedi import edit, evaluate, registry
from remedi.data import EditCase, parse_records
from remedi.methods.weights import EditHandle, backup, restored_on_error
from remedi.models import LoadedModel

BUILTIN = [
    "none",
    "prefix",
    "replace",
    "ft",
    "ft-l",
    "rome",
    "memit",
    "alphaedit",
    "kn",
    "remedi",
    "mend",
    "ke",
    "serac",
]


@dataclass
class ToySettings:
    """How far the toy editor moves the weights."""

    step: float = 0.5
    layer: int = 1


class ToyEditor(registry.WeightMethod):
    """Adds ``step`` to every entry of one MLP output projection per request."""

    name = "toy"
    summary = "a test's toy weight editor"
    Settings = ToySettings

    def write(self, lm: LoadedModel, cases: Sequence[EditCase]) -> list[EditHandle]:
        weight = lm.arch.mlp_out(self.settings.layer).weight
        names = [n for n, p in lm.model.named_parameters() if p is weight]
        handles = []
        for _ in cases:
            handle = backup(lm.model, names)
            with restored_on_error(handle), torch.no_grad():
                weight.add_(self.settings.step)
            handles.append(handle)
        return handles


@pytest.fixture
def toy() -> Iterator[type[ToyEditor]]:
    registry.register(ToyEditor)
    yield ToyEditor
    registry.unregister("toy")


def _params(lm: LoadedModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


def _same(lm: LoadedModel, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())


def test_every_builtin_method_is_registered_once_with_its_kind() -> None:
    assert registry.names() == BUILTIN == remedi.list_editors()
    assert registry.trained_names() == ["remedi", "mend", "ke", "serac"]
    memory = [n for n in BUILTIN if registry.method_class(n).keeps_memory]
    assert memory == ["serac"]
    weights = [n for n in BUILTIN if registry.method_class(n).writes_weights]
    assert weights == ["ft", "ft-l", "rome", "memit", "alphaedit", "kn", "mend", "ke"]
    assert registry.method_class("mend").lightning_module == (
        "lightning_modules.gradient_editor:MendModule"
    )
    assert set(registry.sections()) == {"ft", "rome", "memit", "alphaedit", "kn", "remedi"}


def test_editor_settings_are_typed_and_an_unknown_one_is_named() -> None:
    rome = remedi.editor("rome", clamp=2.0, layer=1)
    assert (rome.settings.clamp, rome.settings.layer, rome.settings.steps) == (2.0, 1, 10)
    with pytest.raises(ValueError, match=r"rome: unknown setting 'clamps'; its settings are: .*"):
        remedi.editor("rome", clamps=2.0)
    with pytest.raises(ValueError, match="unknown method 'romee'; registered methods: none"):
        remedi.editor("romee")
    with pytest.raises(ValueError, match="mend is a trained editor: give checkpoint=PATH"):
        remedi.editor("mend").bind(tiny_model("gpt2"))


@pytest.mark.parametrize("name", ["none", "prefix", "replace", "ft", "ft-l", "rome", "memit"])
def test_edit_restores_the_model_bitwise_also_on_an_exception(name: str) -> None:
    lm = tiny_model("gpt2")
    cases = parse_records(RECORDS)[0]
    method = remedi.editor(name, **({"steps": 2} if name in ("ft", "ft-l", "rome") else {}))
    method.environment.statistics = registry.Statistics(enabled=False)
    if name == "memit":
        method.settings.layers, method.settings.steps, method.settings.n_context = (0, 1), 2, 0
    before = _params(lm)
    with method.edit(lm, cases[:1]) as edited:
        assert edited.model is lm.model
        changed = not _same(lm, before)
    assert changed == method.writes_weights and _same(lm, before)
    with pytest.raises(RuntimeError, match="inside"), method.edit(lm, cases[:1]):
        raise RuntimeError("inside the edit")
    assert _same(lm, before)


def test_a_toy_editor_runs_through_the_evaluation_and_the_edit_command(
    toy: type[ToyEditor], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REMEDI_CACHE", str(tmp_path / "cache"))
    lm = tiny_model("llama")
    cases = parse_records(RECORDS)[0]
    before = _params(lm)
    rows = remedi.compare(lm, ["none", remedi.editor("toy", step=2.0)], cases, progress=False)
    assert [r["method"] for r in rows] == ["none", "toy"] and _same(lm, before)
    assert rows[1]["settings"] == {"step": 2.0, "layer": 1}
    assert rows[1]["efficacy_magnitude"] != rows[0]["efficacy_magnitude"]
    lm.model.save_pretrained(tmp_path / "model")
    lm.tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "cf.json").write_text(json.dumps(RECORDS))
    argv = ["--model", str(tmp_path / "model"), "--data", str(tmp_path / "cf.json")]
    assert evaluate.main([*argv, "--method", "toy", "--output", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["method"] == "toy" and summary["n_cases"] == len(cases)
    requests = [remedi.EditRequest("{} is located in", "The Eiffel Tower", "Rome")]
    edit.apply(
        lm, edit.build_method(edit.build_parser().parse_args(_edit_argv(tmp_path))), requests
    )
    weight = lm.arch.mlp_out(1).weight
    name = next(n for n, p in lm.model.named_parameters() if p is weight)
    assert torch.allclose(weight, before[name] + 0.5)
    assert "toy" in evaluate.build_parser().format_help()


def _edit_argv(tmp_path: Path) -> list[str]:
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"prompt": "{} is in", "subject": "Paris", "target_new": "Rome"}\n')
    return ["toy", "--requests", str(requests), "--output", str(tmp_path / "edited")]


def test_compare_rows_equal_the_command_rows(tmp_path: Path) -> None:
    lm = tiny_model("llama")
    lm.model.save_pretrained(tmp_path / "model")
    lm.tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "cf.json").write_text(json.dumps(RECORDS))
    argv = ["--model", str(tmp_path / "model"), "--data", str(tmp_path / "cf.json")]
    argv += ["--method", "none", "--method", "prefix", "--output", str(tmp_path / "out")]
    assert evaluate.main(argv) == 0
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    loaded = remedi.load_model(str(tmp_path / "model"))
    data = str(tmp_path / "cf.json")
    cases = remedi.load_cases(data)
    rows = remedi.compare(loaded, ["none", "prefix"], cases, progress=False, data=data)

    def comparable(row: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in row.items() if not k.startswith("seconds")}

    assert [comparable(r) for r in rows] == [comparable(r) for r in written]
    with pytest.raises(TypeError, match="unknown option 'batchsize'; the options are: batch_size"):
        remedi.compare(loaded, ["none"], remedi.load_cases("builtin")[:1], batchsize=2)


def test_generate_applies_the_edit_and_the_plain_model_does_not() -> None:
    lm = tiny_model("gpt2")
    request = remedi.EditRequest("{} is located in", "The Eiffel Tower", "Rome")
    plain = remedi.generate(lm, "The Eiffel Tower is in", max_new_tokens=5)
    with remedi.editor("prefix").edit(lm, [request]) as edited:
        prefixed = remedi.generate(edited, "The Eiffel Tower is in", max_new_tokens=5)
    assert prefixed == remedi.generate(
        lm, "The Eiffel Tower is located in Rome. The Eiffel Tower is in", max_new_tokens=5
    )
    assert plain == remedi.generate(lm, "The Eiffel Tower is in", max_new_tokens=5)


def test_importing_remedi_loads_no_torch() -> None:
    code = "import remedi, sys; print('torch' in sys.modules, remedi.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", remedi.__version__]
