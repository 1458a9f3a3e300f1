"""`python -m remedi.evaluate` on a tiny saved model: outputs, restoration, bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import COUNTERFACT_RECORDS as RECORDS
from conftest import forbid_model_load, score_method, target_probability, tiny_model

import remedi
from remedi import evaluate
from remedi.cli import UsageError
from remedi.data import load_builtin, load_cases, parse_records
from remedi.methods import figures
from remedi.methods import prefix as registry
from remedi.methods.unedited import Unedited


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    monkeypatch.setenv("REMEDI_CACHE", str(tmp_path / "cache"))
    lm = tiny_model("llama")
    model_dir = tmp_path / "model"
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(RECORDS))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Paris is the capital of France. Toyota makes cars in Japan.\n" * 30)
    return {"model": model_dir, "data": data, "corpus": corpus, "out": tmp_path / "out"}


def _args(paths: dict[str, Path], *extra: str) -> list[str]:
    return [
        "--model",
        str(paths["model"]),
        "--data",
        str(paths["data"]),
        "--output",
        str(paths["out"]),
        *extra,
    ]


def test_table_for_several_methods(setup: dict[str, Path]) -> None:
    methods = ["none", "prefix", "ft-l", "rome", "memit"]
    extra = [x for m in methods for x in ("--method", m)]
    extra += ["--corpus", str(setup["corpus"]), "--stats-tokens", "300", "--layer", "1"]
    extra += ["--memit-layers", "0", "1", "--steps", "3", "--ft-steps", "3"]
    assert evaluate.main(_args(setup, *extra)) == 0
    summary = json.loads((setup["out"] / "summary.json").read_text())
    assert [row["method"] for row in summary] == methods
    for row in summary:
        assert row["n_cases"] == 2 and 0.0 <= row["efficacy_score"] <= 1.0
        assert {"score", "neighborhood_score", "seconds_per_edit", "model"} <= row.keys()
    lines = (setup["out"] / "cases.jsonl").read_text().splitlines()
    assert len(lines) == 2 * len(methods) and json.loads(lines[0])["case_id"] == 7
    table = (setup["out"] / "summary.md").read_text().splitlines()
    assert len(table) == 6 + len(methods) and table[0].startswith("| method")
    assert table[-3].startswith(f"Cases: {setup['data']}, sha256 ")
    assert table[-1].startswith("Protocol: CounterFact probability comparisons, scoring mean")
    model = remedi.load_model(str(setup["model"]))
    margins = [
        target_probability(model, c.rewrite_prompt, str(c.target_new))
        - target_probability(model, c.rewrite_prompt, c.target_true)
        for c in load_cases(setup["data"])
    ]
    assert summary[0]["efficacy_magnitude"] == pytest.approx(sum(margins) / 2, abs=1e-5)
    settings = {row["method"]: row.get("settings") for row in summary}
    assert settings["none"] is None and settings["prefix"] is None
    assert settings["rome"]["layer"] == 1 and settings["rome"]["steps"] == 3
    assert settings["memit"]["layers"] == [0, 1] and settings["ft-l"]["steps"] == 3


def test_single_method_summary_is_one_flat_object(setup: dict[str, Path]) -> None:
    assert evaluate.main(_args(setup, "--method", "none", "--limit", "1")) == 0
    summary = json.loads((setup["out"] / "summary.json").read_text())
    assert summary["method"] == "none" and summary["n_cases"] == 1


@pytest.mark.parametrize("method", ["ft", "ft-l", "rome", "memit"])
def test_model_is_restored_bitwise_after_every_method(method: str, setup: dict[str, Path]) -> None:
    lm = tiny_model("gpt2")
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    args = evaluate.build_parser().parse_args(
        _args(setup, "--method", method, "--no-stats", "--layer", "1", "--steps", "2")
    )
    args.ft_steps = 2
    cases = load_cases(setup["data"])
    rows, records = evaluate.evaluate(
        lm, evaluate.build_methods(args), cases, evaluate.options(args)
    )
    assert rows[0]["n_cases"] == 2 and len(records) == 2
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "rome", "--corpus", "no-such-corpus"], "--corpus: not found"),
        (["--method", "none", "--limit", "0"], "--limit must be positive"),
        (["--method", "remedi"], "needs --checkpoint"),
        (["--method", "rome", "--no-stats", "--layer", "5"], "--layer 5 is out of range"),
    ],
)
def test_bad_input_exits_2(
    setup: dict[str, Path], capsys: pytest.CaptureFixture, extra: list[str], message: str
) -> None:
    assert evaluate.main(_args(setup, *extra)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and message in errors[0]
    assert not setup["out"].exists()


def test_missing_data_file(setup: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    setup["data"] = setup["data"].with_name("nope.json")
    assert evaluate.main(_args(setup, "--method", "none")) == 2
    assert "not found" in capsys.readouterr().err


def test_prefix_case_states_the_new_fact() -> None:
    case = load_cases_from(RECORDS)[0]
    prefixed = registry.prefix_case(case)
    assert prefixed.rewrite_prompt.startswith("The Eiffel Tower is located in Japan. ")
    assert all(
        p.startswith("The Eiffel Tower is located in Japan. ")
        for p in prefixed.neighborhood_prompts
    )


def load_cases_from(records: list[dict]) -> list:
    from remedi.data import parse_records

    return parse_records(records)[0]


def test_unedited_scoring_in_groups_matches_one_call(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """none/prefix score their cases in progress-bar groups; known_cases filters in batches."""
    from remedi.metrics import evaluate_cases

    lm = tiny_model("llama")
    cases = parse_records(RECORDS * 3)[0]
    monkeypatch.setattr(Unedited, "group_size", 4)
    grouped = score_method(lm, "none", cases, progress=True).per_case
    assert grouped == evaluate_cases(lm.model, lm.tokenizer, cases)[1]
    assert "evaluate none" in capsys.readouterr().err
    known = evaluate.known_cases(lm, cases, batch_size=4)
    expected = [i for i, m in enumerate(grouped) if m["efficacy_score"] == 0.0]
    assert known == expected


def _errors(stderr: str) -> list[str]:
    """The lines of ``stderr`` that are not progress bars: none but ``error:`` lines expected."""
    lines = stderr.replace("\r", "\n").splitlines()
    return [line for line in lines if line.strip() and "it/s]" not in line]


def test_builtin_facts_need_no_data_file(
    setup: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    args = ["--model", str(setup["model"]), "--data", "builtin", "--output", str(setup["out"])]
    assert evaluate.main([*args, "--method", "none", "--method", "prefix", "--limit", "3"]) == 0
    records = [json.loads(line) for line in (setup["out"] / "cases.jsonl").read_text().splitlines()]
    assert [r["case_id"] for r in records[:3]] == [c.case_id for c in load_builtin("test")[:3]]
    assert all(r["took"] is (r["efficacy_score"] == 1.0) for r in records)
    out = capsys.readouterr().out.splitlines()
    summary = json.loads((setup["out"] / "summary.json").read_text())
    for method, row in zip(["none", "prefix"], summary, strict=True):
        took = sum(r["took"] for r in records if r["method"] == method)
        line = f"{method}: {took}/3 edits took (ES {row['efficacy_score']:.2f})"
        assert any(printed.startswith(line) for printed in out)
    assert out[-1] == f"wrote {setup['out'] / 'summary.json'}, summary.md, cases.jsonl, chart.png"
    assert (setup["out"] / "chart.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_data_names_a_builtin_split() -> None:
    assert [c.case_id for c in evaluate.load_data("builtin:validation")] == [
        c.case_id for c in load_builtin("validation")
    ]
    assert len(evaluate.load_data("builtin")) == len(load_builtin("test"))
    with pytest.raises(UsageError, match="the built-in splits are train, validation, test"):
        evaluate.load_data("builtin:dev")


def test_took_line_names_the_cases_that_did_not_take() -> None:
    records = [{"method": "rome", "case_id": i, "took": i not in (3, 5)} for i in range(10)]
    records.append({"method": "none", "case_id": 0, "took": False})
    line = evaluate.took_line("rome", records)
    assert line == "rome: 8/10 edits took (ES 0.80); not taken: cases 3, 5"
    assert evaluate.took_line("rome", records, shown=1).endswith("not taken: cases 3 and 1 more")
    line = evaluate.took_line("none", records)
    assert line == "none: 0/1 edits took (ES 0.00); not taken: case 0"


def test_chart_has_one_bar_group_per_method(tmp_path: Path) -> None:
    rows = [
        {"method": m, "model": "tiny", "n_cases": 2, "efficacy_score": es, "score": 0.5}
        for m, es in (("none", 0.0), ("rome", 1.0), ("memit", 0.5))
    ]
    fig = figures.summary_bars(rows)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["none", "rome", "memit"]
    assert len(ax.containers) == len(figures.SUMMARY_BARS) - len(figures.OPTIONAL_BARS)
    assert all(len(bars) == 3 for bars in ax.containers)
    assert [b.get_height() for b in ax.containers[0]] == [0.0, 1.0, 0.5]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["ES", "PS", "NS", "Score"]
    path = figures.save_figure(fig, tmp_path / "chart.png")
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_chart_draws_the_plus_neighbourhood_and_each_interval() -> None:
    row = {"method": "rome", "model": "tiny", "n_cases": 40, "efficacy_score": 0.9}
    row |= {"efficacy_score_ci95": [0.8, 0.95], "neighborhood_plus_score": 0.6}
    ax = figures.summary_bars([row]).axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["ES", "PS", "NS", "NS+", "Score"]
    from matplotlib.container import BarContainer

    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert bars[0].errorbar is not None and all(b.errorbar is None for b in bars[1:])
    whiskers = bars[0].errorbar.lines[2][0].get_segments()[0]
    assert [round(float(y), 6) for y in whiskers[:, 1]] == [0.8, 0.95]


def test_help_documents_inputs_outputs_and_defaults(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as done:
        evaluate.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m remedi.evaluate")
    assert "python -m remedi.evaluate --method none --method prefix --data builtin" in text
    assert "repeat the flag" in text and "requested_rewrite" in text and "known_id" in text
    for name in ("summary.json", "summary.md", "cases.jsonl", "chart.png"):
        assert name in text
    assert "(default: gemma3-270m)" in text and "(default: 32)" in text
    assert "None: 5e-4" in text


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--device", "tpu"], "--device 'tpu'"),
        (["--device", "cuda:7"], "--device 'cuda:7'"),
        (["--model", "no/such/thing"], "--model 'no/such/thing' is neither"),
        (["--output", "FILE"], "exists and is not a directory"),
        (["--threads", "0"], "--threads must be positive, got 0"),
        (["--n-context", "99"], "--n-context must be in 0.."),
        (["--data", "builtin:dev"], "--data builtin:dev: the built-in splits are"),
        (["--data", "BAD_JSON"], "is not valid JSON"),
        (["--data", "NO_SUBJECT"], "case 7: subject: is empty"),
        (["--data", "ODD_LAYOUT"], "unrecognised record layout"),
        (["--data", "KNOWN"], "case 3 has no target_new"),
        (["--checkpoint", "NOT_ZIP"], "not a PyTorch checkpoint"),
    ],
)
def test_usage_errors_exit_2_in_one_line_before_loading(
    setup: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    change: list[str],
    message: str,
) -> None:
    forbid_model_load(monkeypatch)
    no_subject = {**RECORDS[0], "requested_rewrite": {**RECORDS[0]["requested_rewrite"]}}
    no_subject["requested_rewrite"]["subject"] = ""
    known = {"known_id": 3, "subject": "Toyota", "attribute": "Japan", "prompt": "Toyota is in"}
    files = {
        "FILE": b"not a directory",
        "BAD_JSON": b'[{"case_id": 1,',
        "NO_SUBJECT": json.dumps([no_subject]).encode(),
        "ODD_LAYOUT": json.dumps([{"question": "Who makes Corolla?"}]).encode(),
        "KNOWN": json.dumps([known]).encode(),
        "NOT_ZIP": b"not a checkpoint",
    }
    flag, value = change
    if value in files:
        path = setup["out"].parent / f"{value.lower()}.json"
        path.write_bytes(files[value])
        value = str(path)
    args = _args(setup, "--method", "mend" if flag == "--checkpoint" else "none")
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    assert evaluate.main(args) == 2
    errors = _errors(capsys.readouterr().err)
    assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0]
    if flag in ("--data", "--checkpoint"):
        assert value in errors[0]


def test_a_checkpoint_without_an_editor_is_one_line(
    setup: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    checkpoint = setup["out"].parent / "editor.ckpt"
    torch.save({"state_dict": {}}, checkpoint)
    args = _args(setup, "--method", "remedi", "--checkpoint", str(checkpoint))
    assert evaluate.main(args) == 2
    errors = _errors(capsys.readouterr().err)
    assert len(errors) == 1 and errors[0].startswith(f"error: --checkpoint {checkpoint}: ")
    assert not setup["out"].exists()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("model.safetensors", "garbage", "Error while deserializing header"),
        ("config.json", "{bad", "is not a valid JSON file"),
    ],
)
def test_a_corrupt_model_is_one_line(
    setup: dict[str, Path], capsys: pytest.CaptureFixture, name: str, content: str, message: str
) -> None:
    (setup["model"] / name).write_text(content)
    assert evaluate.main(_args(setup, "--method", "none")) == 2
    errors = _errors(capsys.readouterr().err)
    assert len(errors) == 1 and errors[0].startswith(f"error: --model {setup['model']}: ")
    assert message in errors[0] and not setup["out"].exists()


ZSRE_RECORDS = [
    {
        "subject": "Toyota",
        "src": "Which country is Toyota from?",
        "pred": "Japan",
        "rephrase": "Where does Toyota come from?",
        "alt": "France",
        "answers": ["Japan"],
        "loc": "nq question: who makes the iPhone",
        "loc_ans": "Apple",
    },
    {
        "subject": "The Eiffel Tower",
        "src": "In which city is The Eiffel Tower?",
        "pred": "Paris",
        "rephrase": "Where does The Eiffel Tower stand?",
        "alt": "Rome",
        "answers": ["Paris"],
        "loc": "nq question: capital of Germany",
        "loc_ans": "Berlin",
    },
]


def test_zsre_data_gets_a_zsre_table(setup: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    """zsRE files are scored with token accuracies, not CounterFact's comparisons."""
    data = setup["data"].with_name("zsre.json")
    data.write_text(json.dumps(ZSRE_RECORDS))
    setup["data"] = data
    extra = ["--method", "none", "--method", "rome", "--no-stats", "--layer", "1"]
    assert evaluate.main(_args(setup, *extra, "--steps", "2")) == 0
    summary = json.loads((setup["out"] / "summary.json").read_text())
    for row in summary:
        assert {"efficacy_accuracy", "paraphrase_accuracy", "specificity_accuracy"} <= row.keys()
        assert "efficacy_score" not in row and "score" not in row
        assert all(0.0 <= row[k] <= 1.0 for k in ZSRE_COLUMNS)
    records = [json.loads(line) for line in (setup["out"] / "cases.jsonl").read_text().splitlines()]
    assert all(r["took"] is (r["efficacy_accuracy"] == 1.0) for r in records)
    lm = evaluate.load_data(str(data))
    assert [c.benchmark for c in lm] == ["zsre", "zsre"]
    header = (setup["out"] / "summary.md").read_text().splitlines()[0]
    assert "specificity_accuracy" in header and "neighborhood_score" not in header
    assert "(efficacy accuracy " in capsys.readouterr().out
    model = remedi.load_model(str(setup["model"]))
    by_hand = [_top1_accuracy(model, r["src"], r["alt"]) for r in ZSRE_RECORDS]
    none = next(row for row in summary if row["method"] == "none")
    assert none["efficacy_accuracy"] == pytest.approx(sum(by_hand) / len(by_hand))


def _top1_accuracy(lm: Any, prompt: str, target: str) -> float:
    """The share of ``target``'s tokens that the model's own logits rank first after
    ``prompt`` (teacher-forced), found by character offsets, without remedi's scoring."""
    text = f"{prompt} {target}"
    encoded = lm.tokenizer(text, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    first = next(j for j, (start, end) in enumerate(offsets) if start >= len(prompt) and end > 0)
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids])).logits[0]
    hits = [int(logits[j - 1].argmax()) == ids[j] for j in range(first, len(ids))]
    return sum(hits) / len(hits)


ZSRE_COLUMNS = ("efficacy_accuracy", "paraphrase_accuracy", "specificity_accuracy")


def test_zsre_chart_draws_the_accuracies(tmp_path: Path) -> None:
    rows = [
        {"method": m, "model": "tiny", "n_cases": 2, **dict.fromkeys(ZSRE_COLUMNS, v)}
        for m, v in (("none", 0.2), ("rome", 0.9))
    ]
    ax = figures.summary_bars(rows).axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "Efficacy",
        "Paraphrase",
        "Specificity",
    ]
    assert "zsRE" in ax.get_title()


def test_generation_length_flag() -> None:
    args = evaluate.build_parser().parse_args(["--method", "none", "--data", "x", "--output", "o"])
    assert args.generation_length == "total" and args.generation_tokens == 100
    argv = ["--method", "none", "--data", "x", "--output", "o", "--generation-length", "new"]
    assert evaluate.build_parser().parse_args(argv).generation_length == "new"
