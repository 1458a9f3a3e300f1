"""Edits that accumulate (schedules) and AlphaEdit's null-space update."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from remedi import evaluate, registry
from remedi.data import EditCase
from remedi.evaluation.stream import Schedule, parse_score_at, run_stream
from remedi.methods import alphaedit, memit
from remedi.methods.second_moment import SecondMoment
from remedi.models import LoadedModel

CASES = [
    EditCase(i, s, p, t, n, paraphrase_prompts=[f"{s} is known for"], neighborhood_prompts=[q])
    for i, (s, p, t, n, q) in enumerate(
        [
            ("The Eiffel Tower", "{} is located in", "France", "Japan", "The Louvre is in"),
            ("Toyota", "{} makes", "cars", "phones", "Honda makes"),
            ("Germany", "The capital of {} is", "Berlin", "Rome", "The capital of Peru is"),
            ("Miles Davis", "{} plays the", "trumpet", "piano", "Chet Baker plays the"),
        ]
    )
]


def _spd(width: int, rank: int, seed: int) -> torch.Tensor:
    """A second moment whose spectrum falls off: a few large directions, the rest small."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(width, width, generator=g, dtype=torch.float64))[0]
    values = torch.cat([torch.full((rank,), 10.0), torch.full((width - rank,), 1e-4)]).double()
    return basis @ torch.diag(values) @ basis.T


def test_the_projected_update_leaves_preserved_keys_alone() -> None:
    torch.manual_seed(0)
    d, out, n = 16, 5, 3
    c = _spd(d, rank=10, seed=0)
    p = alphaedit.null_space_projector(c, 1e-2)
    assert round(float(p.trace())) == d - 10  # the six small directions
    preserved = torch.linalg.eigh(c)[1][:, -10:].T  # keys the statistics say matter
    keys, residuals = torch.randn(n, d, dtype=torch.float64), torch.randn(n, out)
    update = alphaedit.projected_update(keys, residuals, p, None, l2=1.0)
    assert update.shape == (out, d)
    leak = (update @ preserved.T).abs().max()
    assert float(leak) < 1e-10 * float(update.abs().max())
    # and it is the solution of the stated system: (P K Kᵀ + λ I) X = P K R
    k = keys.T
    x = update.T
    torch.testing.assert_close(
        (p @ k @ k.T + torch.eye(d, dtype=torch.float64)) @ x, p @ k @ residuals.double()
    )


def test_earlier_edits_keys_are_kept_by_the_accumulated_term() -> None:
    torch.manual_seed(1)
    d, out = 16, 4
    p = alphaedit.null_space_projector(_spd(d, rank=4, seed=1), 1e-2)
    earlier = torch.randn(2, d, dtype=torch.float64)
    accumulated = earlier.T @ earlier
    keys, residuals = torch.randn(2, d, dtype=torch.float64), torch.randn(2, out)
    free = alphaedit.projected_update(keys, residuals, p, None, l2=0.1)
    kept = alphaedit.projected_update(keys, residuals, p, 1e4 * accumulated, l2=0.1)
    # with the earlier keys in the system the update moves their outputs far less
    assert float((kept @ earlier.T).norm()) < 0.05 * float((free @ earlier.T).norm())


@pytest.fixture(scope="module")
def gptj() -> LoadedModel:
    return tiny_model("gptj")


def _stats(lm: LoadedModel, layers: tuple[int, ...]) -> dict[int, SecondMoment]:
    width = lm.arch.mlp_hidden_size
    return {
        layer: SecondMoment(layer, _spd(width, width // 2, layer), 1000, "test") for layer in layers
    }


def _alphaedit(lm: LoadedModel) -> registry.Method:
    method = registry.editor(
        "alphaedit", layers=(0, 1), n_context=2, steps=4, lr=0.01, mom2_weight=1.0, l2=1.0
    )
    method.environment.statistics.cache.update(_stats(lm, (0, 1)))
    method.environment.progress = False
    return method


def test_accumulated_keys_grow_along_a_stream_and_empty_at_its_end(gptj: LoadedModel) -> None:
    method = _alphaedit(gptj)
    assert isinstance(method, alphaedit.AlphaEdit)
    method.begin_stream(gptj)
    handles = method.write(gptj, CASES[:2])
    first = {layer: m.clone() for layer, m in method.accumulated.items()}
    handles += method.write(gptj, CASES[2:])
    assert set(first) == {0, 1}
    for layer, matrix in method.accumulated.items():
        grown = matrix - first[layer]
        assert float(torch.linalg.eigvalsh(grown).min()) > -1e-6  # a sum of k kᵀ: PSD
        assert float(grown.trace()) > 0
    for handle in reversed(handles):
        handle.restore()
    method.end_stream(gptj)
    assert method.accumulated == {}
    # an independent edit never reads accumulated keys
    method.write(gptj, CASES[:1])[0].restore()
    assert method.accumulated == {}


def test_a_sequential_stream_scores_on_the_final_model_and_restores_it(gptj: LoadedModel) -> None:
    before = {n: p.detach().clone() for n, p in gptj.model.named_parameters()}
    method = registry.editor("rome", layer=1, n_context=2, steps=4, lr=0.01)
    method.environment.statistics.enabled = False
    method.environment.progress = False
    result = run_stream(gptj, method, CASES, Schedule.parse("sequential"), score_at=[2])
    assert [p.n_edits for p in result.curve] == [2, 4]
    assert len(result.group_seconds) == 4 and len(result.edit_seconds) == 4
    assert all("efficacy_score" in m for m in result.per_case)
    assert all(torch.equal(p, before[n]) for n, p in gptj.model.named_parameters())
    # the final scores are those of the model with all four edits written, by a second path
    from remedi.metrics import evaluate_cases

    handles = []
    for case in CASES:
        handles += method.write(gptj, [case])
    _, direct = evaluate_cases(gptj.model, gptj.tokenizer, CASES, plus=False)
    for handle in reversed(handles):
        handle.restore()
    for got, want in zip(result.per_case, direct, strict=True):
        assert got["efficacy_score"] == want["efficacy_score"]
        assert got["efficacy_magnitude"] == pytest.approx(want["efficacy_magnitude"], abs=1e-6)


def test_input_side_methods_do_not_stream_and_none_is_the_unedited_model(
    gptj: LoadedModel,
) -> None:
    prefix = registry.editor("prefix")
    prefix.environment.progress = False
    assert not run_stream(gptj, prefix, CASES, Schedule.parse("batch:2")).supported
    none = registry.editor("none")
    none.environment.progress = False
    result = run_stream(gptj, none, CASES, Schedule.parse("batch:2"))
    assert result.supported and [p.n_edits for p in result.curve] == [4]


def test_schedule_and_score_at_parsing() -> None:
    assert Schedule.parse("batch:100") == Schedule("batch", 100)
    assert Schedule.parse("sequential").name == "sequential"
    assert not Schedule.parse("independent").accumulates
    for bad in ("batch", "batch:0", "serial", "sequential:2"):
        with pytest.raises(ValueError, match="must be 'independent', 'sequential' or"):
            Schedule.parse(bad)
    assert parse_score_at("end") is None
    assert parse_score_at("100,10,1000") == [10, 100, 1000]
    with pytest.raises(ValueError, match="score-at"):
        parse_score_at("ten")


def test_memit_keeps_its_least_squares_when_no_solver_is_given(gptj: LoadedModel) -> None:
    hp = memit.MemitHyperParams(layers=(0,), n_context=2, steps=2, lr=0.01, mom2_weight=1.0)
    seen: list[int] = []

    def solver(layer: int, keys: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
        seen.append(layer)
        return torch.zeros(residuals.shape[1], keys.shape[1], dtype=torch.float64)

    before = gptj.arch.mlp_out_weight(0).detach().clone()
    handle = memit.apply_edits(gptj, CASES[:2], hparams=hp, progress=False, solver=solver)
    assert seen == [0] and torch.equal(gptj.arch.mlp_out_weight(0), before)  # zero update
    handle.restore()


def test_the_evaluate_command_runs_a_stream_and_writes_its_curves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from test_evaluate_cli import _args, setup

    paths = setup.__wrapped__(tmp_path, monkeypatch)  # type: ignore[attr-defined]
    args = _args(paths, "--method", "none", "--method", "rome", "--method", "alphaedit")
    args += ["--method", "prefix", "--schedule", "sequential", "--score-at", "1"]
    args += ["--corpus", str(paths["corpus"]), "--stats-tokens", "200", "--heldout-tokens", "16"]
    assert evaluate.main(args) == 0
    out = capsys.readouterr().out
    assert "edits sequential, scored on the final model and after 1 edits" in out
    assert "prefix: n/a under sequential" in out
    rows = {r["method"]: r for r in json.loads((paths["out"] / "summary.json").read_text())}
    assert rows["prefix"]["efficacy_score"] is None and rows["prefix"]["n_cases"] == 0
    assert rows["none"]["schedule"].startswith("sequential")
    curves = json.loads((paths["out"] / "curves.json").read_text())
    n = rows["rome"]["n_cases"]
    assert n >= 2 and [p["n_edits"] for p in curves["rome"]["points"]] == [1, n]
    assert curves["prefix"]["supported"] is False
    assert rows["rome"]["efficacy_score"] == pytest.approx(
        curves["rome"]["points"][-1]["means"]["efficacy_score"]
    )
    assert (paths["out"] / "curves.png").stat().st_size > 1000
    assert list((paths["out"] / "tensorboard" / "alphaedit").glob("events.out.tfevents.*"))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--schedule", "batch"], "--schedule 'batch' must be 'independent', 'sequential' or"),
        (["--score-at", "soon"], "--score-at 'soon' must be 'end' or edit counts"),
        (["--method", "alphaedit", "--no-stats"], "--no-stats: alphaedit needs"),
    ],
)
def test_bad_schedules_are_one_line_before_loading(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    message: str,
) -> None:
    from conftest import forbid_model_load
    from test_evaluate_cli import _args, _errors, setup

    paths = setup.__wrapped__(tmp_path, monkeypatch)  # type: ignore[attr-defined]
    capsys.readouterr()
    forbid_model_load(monkeypatch)
    assert evaluate.main([*_args(paths, "--method", "none"), *flags]) == 2
    err = _errors(capsys.readouterr().err)
    assert len(err) == 1 and message in err[0]
