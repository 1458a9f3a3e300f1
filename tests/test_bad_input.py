"""Bad input, command by command: every (command, mistake) pair exits with code 2 and one
``error:`` line naming the flag or field and its value, with no traceback, no output directory,
and (for mistakes that need no model) before any model weights are read.

Each command runs in-process through its ``main(argv)``; the model is a tiny saved Llama."""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import COUNTERFACT_RECORDS, forbid_model_load, tiny_model
from test_datamodules import write_rome

from remedi import edit, evaluate, locate, train
from remedi.models import loading

PROMPT = "The Eiffel Tower is located in"
SUBJECT = "The Eiffel Tower"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny model directory, good inputs for every command and the bad files the table uses."""
    root = tmp_path_factory.mktemp("bad-input")
    lm = tiny_model("llama")
    model = root / "model"
    lm.model.save_pretrained(model)
    lm.tokenizer.save_pretrained(model)
    bert = root / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "num_hidden_layers": 2}))
    paths = {"model": model, "bert": bert, "data": write_rome(root / "cf.json")}
    paths["config"] = root / "tiny.yaml"
    paths["config"].write_text(
        f"seed_everything: 0\nmodel:\n  model: {model}\n  layer: 1\n"
        f"data:\n  class_path: datamodules.CounterFactDataModule\n  init_args:\n"
        f"    path: {paths['data']}\n    n_train: 4\n    n_val: 2\n    n_test: 2\n"
        "trainer:\n  accelerator: cpu\n  max_steps: 1\n  enable_progress_bar: false\n"
    )
    requests = [{"prompt": "{} is located in", "subject": SUBJECT, "target_new": "Japan"}]
    paths["requests"] = root / "requests.json"
    paths["requests"].write_text(json.dumps(requests))
    paths["file"] = root / "a-file"
    paths["file"].write_text("not a directory")
    paths["bad_json"] = root / "bad.json"
    paths["bad_json"].write_text('[{"case_id": 1,')
    paths["bad_jsonl"] = root / "bad.jsonl"
    paths["bad_jsonl"].write_text(json.dumps(requests[0]) + "\n{oops\n")
    rewrite = COUNTERFACT_RECORDS[0]["requested_rewrite"]
    variants = {
        "missing": {k: v for k, v in rewrite.items() if k != "subject"},
        "absent": {**rewrite, "prompt": "Toyota is located in"},
        "empty": {**rewrite, "target_new": {"str": " "}},
        "identical": {**rewrite, "target_new": {"str": "France"}},
    }
    for name, changed in variants.items():
        paths[f"cf_{name}"] = root / f"cf-{name}.json"
        paths[f"cf_{name}"].write_text(
            json.dumps([{**COUNTERFACT_RECORDS[0], "requested_rewrite": changed}])
        )
    plain = {
        "missing": {"prompt": "{} is located in", "subject": SUBJECT},
        "absent": {"prompt": "Toyota is located in", "subject": SUBJECT, "target_new": "Japan"},
        "empty": {"prompt": "{} is located in", "subject": SUBJECT, "target_new": ""},
        "identical": {**requests[0], "target_true": "Japan"},
    }
    for name, request in plain.items():
        paths[f"req_{name}"] = root / f"req-{name}.json"
        paths[f"req_{name}"].write_text(json.dumps([request]))
    paths["corrupt_ckpt"] = root / "corrupt.ckpt"
    paths["corrupt_ckpt"].write_bytes(os.urandom(3000))
    paths["zip_ckpt"] = root / "zip.ckpt"
    with zipfile.ZipFile(paths["zip_ckpt"], "w") as archive:
        archive.writestr("archive/data.pkl", b"garbage")
    meta = {"method": "remedi", "model": "some/other-model", "layers": [1], "hidden_size": 32}
    paths["other_model_ckpt"] = root / "other-model.ckpt"
    torch.save({"remedi": meta, "state_dict": {}}, paths["other_model_ckpt"])
    paths["other_model_ke_ckpt"] = root / "other-model-ke.ckpt"
    torch.save({"remedi": {**meta, "method": "ke"}}, paths["other_model_ke_ckpt"])
    paths["other_layer_ckpt"] = root / "other-layer.ckpt"
    hparams = {"_class_path": "lightning_modules.RemediModule", "model": str(model), "layer": 2}
    layer_meta = {**meta, "model": str(model), "layers": [2]}
    torch.save({"remedi": layer_meta, "hyper_parameters": hparams}, paths["other_layer_ckpt"])
    paths["other_method_ckpt"] = root / "other-method.ckpt"
    torch.save(
        {"remedi": {**meta, "model": str(model)}, "state_dict": {}}, paths["other_method_ckpt"]
    )
    paths["eval_config"] = root / "evaluate.yaml"
    paths["eval_config"].write_text("method: [none]\nlimt: 3\n")
    return paths


@dataclass(frozen=True)
class Command:
    """A command line: its ``main`` and base arguments (``{name}`` names a fixture file, ``{out}``
    the output directory)."""

    main: Callable[[list[str]], int]
    base: tuple[str, ...]


LOCATE = ("--model", "{model}", "--prompt", PROMPT, "--subject", SUBJECT, "--output", "{out}")
COMMANDS: dict[str, Command] = {
    "evaluate": Command(
        evaluate.main,
        ("--method", "none", "--model", "{model}", "--data", "{data}", "--output", "{out}"),
    ),
    "edit": Command(
        edit.main,
        (
            "rome",
            "--model",
            "{model}",
            "--requests",
            "{requests}",
            "--output",
            "{out}",
            "--no-stats",
        ),
    ),
    "locate trace": Command(locate.main, ("trace", *LOCATE)),
    "locate kn": Command(locate.main, ("kn", *LOCATE, "--target", "Paris")),
    **{
        f"train {sub}": Command(
            train.main, (sub, "--config", "{config}", "--trainer.default_root_dir", "{out}")
        )
        for sub in ("fit", "validate", "test")
    },
}
OUTPUT_FLAG = {name: "--output" for name in COMMANDS} | {
    f"train {sub}": "--trainer.default_root_dir" for sub in ("fit", "validate", "test")
}
MODEL_FLAG = {name: "--model" for name in COMMANDS} | {
    f"train {sub}": "--model.model" for sub in ("fit", "validate", "test")
}
DATA_FLAG = {"evaluate": "--data", "edit": "--requests"} | {
    f"train {sub}": "--data.init_args.path" for sub in ("fit", "validate", "test")
}
TRAIN = [f"train {sub}" for sub in ("fit", "validate", "test")]


@dataclass(frozen=True)
class Mistake:
    """One bad input: the flags to change (values may name a file of the fixture by key), the
    words the error line must hold, and whether it must stop before the model loads."""

    kind: str
    flags: tuple[tuple[str, str], ...]
    words: tuple[str, ...]
    before_load: bool = True


def _row(command: str, kind: str, flags: str, words: str) -> tuple[str, Mistake]:
    """A table row: ``flags`` as ``FLAG=VALUE`` (or a bare switch) separated by spaces, the
    expected ``words`` separated by ``;``."""
    pairs = tuple((flag, value) for flag, _, value in (f.partition("=") for f in flags.split()))
    return command, Mistake(kind, pairs, tuple(words.split(";")))


COMMON = [
    ("unknown model spec", "{model}=not-a-model!", "{model};not-a-model!"),
    ("unknown model type", "{model}=bert", "{model};'bert' is not supported"),
    ("output is a file", "{out}=file", "{out};a-file"),
    ("output not writable", "{out}=file/sub", "{out};a-file/sub;not writable"),
]
"""Mistakes every command can make, with its own model and output flags."""
PER_FAMILY = {
    "plain": [
        ("unavailable device", "--device=cuda", "--device 'cuda';CUDA is not available"),
        ("unknown flag", "--nope=1", "--nope"),
    ],
    "train": [
        ("unavailable device", "--trainer.accelerator=gpu", "--trainer.accelerator;'cuda'"),
        ("unknown config key", "--model.nope=1", "--model.nope;no argument 'nope'"),
        ("corrupt checkpoint", "--ckpt_path=corrupt_ckpt", "--ckpt_path;corrupt.ckpt"),
        ("garbled checkpoint", "--ckpt_path=zip_ckpt", "--ckpt_path;zip.ckpt"),
        (
            "checkpoint of another model",
            "--ckpt_path=other_model_ckpt",
            "--ckpt_path;some/other-model",
        ),
        ("checkpoint of another layer", "--ckpt_path=other_layer_ckpt", "--model.layer;layer 2"),
        ("layer out of range", "--model.layer=99", "--model.layer 99"),
    ],
}
DATA = [
    ("malformed JSON", "bad_json", "bad.json;not valid JSON"),
    ("malformed JSONL", "bad_jsonl", "bad.jsonl;not valid JSON"),
    ("data file not found", "missing.json", "missing.json"),
    ("missing field", "{prefix}_missing", "{missing}"),
    ("subject not in prompt", "{prefix}_absent", "subject;Toyota is located in"),
    ("empty target", "{prefix}_empty", "target_new;empty"),
    ("identical targets", "{prefix}_identical", "target_new;equals target_true"),
]
"""Mistakes in the records of ``--data`` / ``--requests`` / ``--data.init_args.path``."""
SPECIFIC = [
    _row("locate trace", "subject not in prompt", "--subject=Toyota", "--subject 'Toyota'"),
    _row("locate kn", "subject not in prompt", "--subject=Toyota", "--subject 'Toyota'"),
    _row("locate trace", "empty subject", "--subject=", "--subject is empty"),
    _row("locate kn", "empty subject", "--subject=", "--subject is empty"),
    _row("locate kn", "empty target", "--target=", "--target is empty"),
    _row("evaluate", "layer out of range", "--method=rome --no-stats --layer=99", "--layer 99"),
    _row("evaluate", "layer out of range", "--method=memit --memit-layers=9", "--memit-layers 9"),
    _row("evaluate", "layer out of range", "--method=ft --layer=-9", "--layer -9"),
    _row("evaluate", "layer out of range", "--method=ft-l --layer=3", "--layer 3"),
    _row("edit", "layer out of range", "--layer=99", "--layer 99"),
    _row("edit", "layer out of range", "METHOD=memit --layers=99", "--layers 99"),
    _row("edit", "layer out of range", "METHOD=ft --layer=3", "--layer 3"),
    _row("edit", "layer out of range", "METHOD=kn --layers=5", "--layers 5"),
    _row(
        "train fit",
        "layer out of range",
        "--model.class_path=lightning_modules.MendModule --model.init_args.layers=[1,7]",
        "--model.layers 7",
    ),
    _row(
        "evaluate",
        "corrupt checkpoint",
        "--method=remedi --checkpoint=corrupt_ckpt",
        "--checkpoint;corrupt.ckpt",
    ),
    _row(
        "evaluate",
        "garbled checkpoint",
        "--method=remedi --checkpoint=zip_ckpt",
        "--checkpoint;zip.ckpt",
    ),
    _row(
        "evaluate",
        "checkpoint of another model",
        "--method=remedi --checkpoint=other_model_ckpt",
        "--checkpoint;some/other-model",
    ),
    _row(
        "evaluate",
        "checkpoint of another method",
        "--method=mend --checkpoint=other_method_ckpt",
        "--checkpoint;'remedi' editor",
    ),
    _row(
        "edit",
        "corrupt checkpoint",
        "METHOD=mend --checkpoint=corrupt_ckpt",
        "--checkpoint;corrupt.ckpt",
    ),
    _row(
        "edit", "garbled checkpoint", "METHOD=mend --checkpoint=zip_ckpt", "--checkpoint;zip.ckpt"
    ),
    _row(
        "edit",
        "checkpoint of another model",
        "METHOD=ke --checkpoint=other_model_ke_ckpt",
        "--checkpoint;some/other-model",
    ),
    _row(
        "edit",
        "checkpoint of another method",
        "METHOD=mend --checkpoint=other_method_ckpt",
        "--checkpoint;'remedi' editor",
    ),
    _row("evaluate", "unknown config key", "--config=eval_config", "--config;evaluate.yaml;'limt'"),
]
"""Mistakes that belong to one command's own flags."""


def _cases() -> list[tuple[str, Mistake]]:
    """The table: (command, mistake) pairs."""
    table: list[tuple[str, Mistake]] = []
    for command in COMMANDS:
        names = {"model": MODEL_FLAG[command], "out": OUTPUT_FLAG[command]}
        family = "train" if command in TRAIN else "plain"
        for kind, flags, words in [*COMMON, *PER_FAMILY[family]]:
            table.append(_row(command, kind, flags.format(**names), words.format(**names)))
    for command, flag in DATA_FLAG.items():
        prefix = "req" if command == "edit" else "cf"
        missing = "target_new" if command == "edit" else "subject"
        for kind, value, words in DATA:
            value = value.format(prefix=prefix)
            table.append(_row(command, kind, f"{flag}={value}", words.format(missing=missing)))
    return table + SPECIFIC


CASES = _cases()


def _argv(command: str, mistake: Mistake, files: dict[str, Path], out: Path) -> list[str]:
    names = {name: str(path) for name, path in files.items()}
    argv = [token.format(out=out, **names) for token in COMMANDS[command].base]
    for flag, given in mistake.flags:
        name, _, rest = given.partition("/")
        value = str(files[name] / rest if rest else files[name]) if name in files else given
        if flag == "METHOD":
            argv[0] = value
        elif flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value] if given or flag in ("--subject", "--target") else [flag]
    return argv


def _exit_code(main: Callable[[list[str]], int], argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as done:  # argparse's own errors
        return int(done.code or 0)


@pytest.mark.parametrize(("command", "mistake"), CASES, ids=[f"{c}: {m.kind}" for c, m in CASES])
def test_bad_input_is_one_line_and_exit_code_2(
    command: str,
    mistake: Mistake,
    files: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("REMEDI_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if mistake.before_load:
        forbid_model_load(monkeypatch)
        monkeypatch.setattr(
            loading.AutoModelForCausalLM,
            "from_pretrained",
            lambda *a, **k: pytest.fail("the model was loaded"),
        )
    out = tmp_path / "out"
    argv = _argv(command, mistake, files, out)
    code = _exit_code(COMMANDS[command].main, argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "Traceback" not in err
    for word in mistake.words:
        assert word in lines[0], (word, lines[0])
    assert not out.exists()


def test_the_table_covers_every_kind_for_every_command() -> None:
    """Counts the kinds of bad input tried per command (quoted in the closing note)."""
    kinds: dict[str, set[str]] = {}
    for command, mistake in CASES:
        kinds.setdefault(command, set()).add(mistake.kind)
    assert all(len(found) >= 6 for found in kinds.values()), kinds
    print({command: len(found) for command, found in kinds.items()})
