"""Every shipped training config trains: ``python -m remedi.train fit --config X`` runs one
``fast_dev_run`` step and one validation batch, each config as written except what a test
machine cannot give it (a tiny random model of the config's family with as many layers as the
config edits, tiny data where the config needs a file, the CPU where it asks for a GPU).

The configs are found by glob, so a new one is covered without touching this file; one whose
datamodule needs a file this test cannot make fails with a message saying where to add it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import HIDDEN, VOCAB, _llama_kwargs, _tokenizer
from evaluations_fixtures import write_bios, write_mcrae
from test_datamodules import write_rome
from transformers import AutoModelForCausalLM, Gemma3TextConfig, GPTJConfig, PretrainedConfig

from lightning_modules import LearnedEditorModule
from remedi.train import run

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(
    p for p in (REPO / "configs").rglob("*.yaml") if "evaluate" not in p.relative_to(REPO).parts
)
"""The training configs (configs/evaluate/ holds remedi.evaluate's)."""
TINY_LAYERS = 28
"""Deep enough for every shipped config's layers (GPT-J's MEND and KE edit 25-27)."""
TINY_DATA: dict[str, Callable[[Path], Path]] = {
    "BiasInBiosDataModule": write_bios,
    "McRaeDataModule": write_mcrae,
    "CounterFactDataModule": write_rome,
}
"""A writer of a tiny data file for each datamodule a config may name."""
SMALL_SPLITS = {"n_train": 6, "n_val": 2, "n_test": 2}
"""Split sizes that fit the tiny data files (CounterFact's has 10 records; the others take no
``n_train``)."""
TINY_FAMILIES: dict[str, Callable[[], PretrainedConfig]] = {
    "gemma3_text": lambda: Gemma3TextConfig(
        **{**_llama_kwargs(), "num_hidden_layers": TINY_LAYERS}, head_dim=8, sliding_window=8
    ),
    "gptj": lambda: GPTJConfig(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=TINY_LAYERS,
        n_head=4,
        rotary_dim=4,
        n_positions=128,
    ),
}
"""The tiny stand-ins, by model type, for the configs' models."""


def model_family(spec: str) -> str:
    """The tiny model type standing in for the config's model (GPT-J or, by default, Gemma 3)."""
    return "gptj" if "gpt-j" in spec.lower() else "gemma3_text"


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A saved tiny random model directory of each family, ``TINY_LAYERS`` deep."""
    root = tmp_path_factory.mktemp("models")
    folders = {}
    for family in TINY_FAMILIES:
        torch.manual_seed(0)
        config = TINY_FAMILIES[family]()
        config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 0
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        model.save_pretrained(root / family)
        _tokenizer(True).save_pretrained(root / family)
        folders[family] = root / family
    return folders


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny data file for each datamodule in :data:`TINY_DATA`."""
    root = tmp_path_factory.mktemp("data")
    return {name: write(root / name) for name, write in TINY_DATA.items()}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the model loader caches goes to this test's folder."""
    monkeypatch.setenv("REMEDI_CACHE", str(tmp_path / "cache"))


def tiny_run_flags(
    config: dict[str, Any], models: dict[str, Path], data: dict[str, Path]
) -> list[str]:
    """The flags that make ``config``'s run tiny and runnable here."""
    model = config["model"].get("init_args", config["model"])
    flags = ["--model.init_args.model", str(models[model_family(str(model["model"]))])]
    trainer = config.get("trainer") or {}
    if str(trainer.get("accelerator", "cpu")).lower() in ("gpu", "cuda"):
        flags += ["--trainer.accelerator", "cpu"]
    if str(trainer.get("precision", "32-true")) not in ("32", "32-true"):
        flags += ["--trainer.precision", "32-true"]
    return [*flags, *tiny_data_flags(config["data"], data)]


def tiny_data_flags(section: dict[str, Any], data: dict[str, Path]) -> list[str]:
    """A tiny file and split sizes for a datamodule that reads a file; none for CounterFact
    without a ``path`` (the built-in facts, which every machine has)."""
    name = str(section["class_path"]).rsplit(".", 1)[-1]
    init = section.get("init_args") or {}
    if name == "CounterFactDataModule" and init.get("path") is None:
        return []
    assert name in data, f"{name}: add a writer of a tiny data file to TINY_DATA in {__file__}"
    flags = ["--data.init_args.path", str(data[name])]
    for key, value in SMALL_SPLITS.items():
        if key in init:
            flags += [f"--data.init_args.{key}", str(value)]
    if init.get("test_path") is not None:
        flags += ["--data.init_args.test_path", "null"]
    return flags


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_config_trains_a_step_and_validates(
    path: Path, tiny_models: dict[str, Path], tiny_data: dict[str, Path], tmp_path: Path
) -> None:
    config = yaml.safe_load(path.read_text())
    args = ["fit", "--config", str(path), "--trainer.fast_dev_run", "1"]
    args += ["--trainer.default_root_dir", str(tmp_path / "run")]
    cli = run([*args, *tiny_run_flags(config, tiny_models, tiny_data)])
    assert isinstance(cli.model, LearnedEditorModule)
    assert cli.model.lm.arch.num_layers == TINY_LAYERS  # the tiny model, not the real one
    assert cli.trainer.global_step == 1
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])
