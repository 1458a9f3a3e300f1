"""benchmarks/run_all.py: every method's speed and memory in one command, run --tiny on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import run_all  # noqa: E402

HEADER = "| what | result | reproduce |"


def test_tiny_run_in_process_reports_every_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every step runs through the product's code on the tiny model and lands in the JSON and
    the Markdown table, with the statistics in a cache of the run's own."""
    monkeypatch.setenv("REMEDI_CACHE", str(tmp_path / "untouched"))
    out = tmp_path / "out"
    report = run_all.main([str(out), "--tiny", "--in-process", "--threads", "1"])
    written = json.loads((out / "run_all.json").read_text())
    assert written == json.loads(json.dumps(report))
    steps = written["steps"]
    assert list(steps) == list(run_all.STEPS)
    assert {n: s["status"] for n, s in steps.items()} == dict.fromkeys(run_all.STEPS, "ok")
    assert all(s["peak_rss_gb"] > 0 and s["wall_s"] > 0 for s in steps.values())
    sizes = run_all.TINY
    assert steps["load"]["cold_s"] > 0 and len(steps["load"]["warm_s_all"]) == sizes.repeats
    moment = steps["second_moment"]
    assert moment["n_tokens"] == sizes.stats_tokens and not moment["from_cache"]
    assert moment["tokens_per_s"] > 0 and moment["cached_collect_s"] >= 0
    assert steps["rome"]["stats_from_cache"] and steps["rome"]["cold_first_edit_s"] > 0
    assert len(steps["rome"]["seconds_per_edit"]) == sizes.repeats
    assert steps["memit"]["requests"] == sizes.memit_requests and steps["memit"]["edit_s"] > 0
    assert steps["ft"]["median_s"] > 0 and steps["ft_l"]["median_s"] > 0
    assert len(steps["kn"]["seconds_per_fact"]) == sizes.kn_facts
    assert set(steps["causal_trace"]["per_prompt"][0]) == {"hidden", "mlp", "attn"}
    assert steps["scoring"]["cases"] == sizes.scoring_cases and steps["scoring"]["rows"] > 0
    assert steps["remedi"]["ratio"] > 0 and steps["remedi"]["batch_size"] == 16
    for method in ("mend", "ke"):
        assert len(steps[method]["step_s_all"]) == sizes.train_steps
        assert steps[method]["layers"] == [1, 2, 3]
    machine = written["machine"]
    assert machine["torch_threads"] == 1 and machine["device"] == "cpu" and machine["cpu"]
    assert not written["isolated"]
    table = (out / "run_all.md").read_text()
    assert table.startswith("Measured on ") and "running maximum" in table
    assert f"torch {machine['torch']}, transformers {machine['transformers']}" in table
    assert HEADER in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and line != HEADER]
    assert len(rows) == len(run_all.STEPS)
    for name, row in zip(run_all.STEPS, rows, strict=True):
        assert f"`python benchmarks/run_all.py OUT --only {name} --tiny --threads 1`" in row
        assert "peak RSS" in row
    assert "MEMIT, 4 requests at once" in table and "tokens/s" in table
    assert not (tmp_path / "untouched").exists()


def test_command_runs_each_step_in_its_own_process(tmp_path: Path) -> None:
    """Without --in-process each step is a process of its own that writes steps/STEP.json,
    and the report is merged from them."""
    out = tmp_path / "out"
    command = [sys.executable, str(BENCHMARKS / "run_all.py"), str(out), "--tiny"]
    command += ["--only", "scoring,load", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "REMEDI_CACHE": str(tmp_path / "untouched")}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "run_all.json").read_text())
    assert report["isolated"] and list(report["steps"]) == ["load", "scoring"]
    for name in ("load", "scoring"):
        assert report["steps"][name] == json.loads((out / "steps" / f"{name}.json").read_text())
        assert report["steps"][name]["status"] == "ok"
    assert "each step in its own process" in (out / "run_all.md").read_text()
    assert "| model load, cold (empty cache) / warm | cold " in done.stdout
    assert not (tmp_path / "untouched").exists()


def test_budget_skips_steps_and_unknown_steps_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = run_all.main([str(out), "--tiny", "--in-process", "--budget-s", "0", "--only", "ke"])
    assert report["steps"] == {"ke": {"status": "skipped (no time left)"}}
    assert "| KE training step (quickstart settings) | skipped" in (out / "run_all.md").read_text()
    with pytest.raises(SystemExit):
        run_all.main([str(out), "--only", "rome,nope"])
