"""benchmarks/gpu_scale.py: the one-command flagship-scale measurement, run --tiny on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import gpu_scale  # noqa: E402


def test_tiny_run_reports_every_step(tmp_path: Path) -> None:
    """Every step runs through the product's code on a tiny random GPT-J and lands in the JSON
    and the Markdown table, with the statistics in a cache of its own."""
    out = tmp_path / "out"
    command = f"{BENCHMARKS / 'gpu_scale.py'} {out} --tiny --device cpu --threads 1"
    command += " --stats-tokens 600 --rome-edits 2 --remedi-repeats 1 --mend-steps 2"
    command += " --trace-samples 2 --memit-requests 4 --memit-steps 2"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "REMEDI_CACHE": str(tmp_path / "untouched")}
    done = subprocess.run(
        [sys.executable, *command.split()],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "gpu_scale.json").read_text())
    assert report["model"]["n_layer"] == 4 and report["model"]["mlp_width"] == 256
    assert report["device"] == "cpu" and report["dtype"] == "bfloat16"
    steps = report["steps"]
    assert list(steps) == list(gpu_scale.STEPS)
    assert {name: s["status"] for name, s in steps.items()} == dict.fromkeys(steps, "ok")
    assert steps["second_moment"]["tokens"] == 600 and steps["second_moment"]["tokens_per_s"] > 0
    assert steps["second_moment"]["layer"] == 2 and not steps["second_moment"]["from_cache"]
    assert len(steps["rome"]["seconds_per_edit"]) == 2 and steps["rome"]["whitened"] is True
    assert steps["rome"]["inverse_s"] >= 0 and steps["rome"]["median_s"] > 0
    assert steps["remedi"]["ratio"] > 0 and steps["remedi"]["examples_per_s"] > 0
    assert steps["mend"]["step_s_median"] > 0 and len(steps["mend"]["step_s_all"]) == 2
    assert steps["causal_trace"]["trace_s"] > 0
    assert steps["memit"]["requests"] == 4 and steps["memit"]["edit_s"] > 0
    assert steps["memit"]["layers"] == [0, 1]
    assert all(s["peak_memory_gb"] > 0 for s in steps.values())
    assert report["peak_memory_gb"] == max(s["peak_memory_gb"] for s in steps.values())
    table = (out / "gpu_scale.md").read_text()
    assert "| step | result | seconds | peak memory (GB) | status |" in table
    for name in gpu_scale.STEPS:
        assert f"| {name} | " in table
    assert "tokens/s" in table and "s per edit" in table and "4 requests at once" in table
    assert not (tmp_path / "untouched").exists()  # statistics went to a fresh cache


def test_budget_stops_a_step_and_the_report_is_written_after_each(tmp_path: Path) -> None:
    with pytest.raises(gpu_scale.OverBudget), gpu_scale.time_budget(0.05):
        time.sleep(2)
    report = gpu_scale.Report(tmp_path, {"model": {}})
    assert json.loads((tmp_path / "gpu_scale.json").read_text())["steps"] == {}
    device = gpu_scale.torch.device("cpu")

    def slow(result: dict[str, object]) -> str:
        result["partial"] = 1
        time.sleep(5)
        return "never"

    gpu_scale.run_step(report, "rome", 1.2, time.perf_counter() + 60, device, slow)
    written = json.loads((tmp_path / "gpu_scale.json").read_text())["steps"]["rome"]
    assert written["status"].startswith("stopped") and written["partial"] == 1
    assert written["seconds"] < 4
    gpu_scale.run_step(report, "memit", 100, time.perf_counter() + 0.5, device, slow)
    skipped = json.loads((tmp_path / "gpu_scale.json").read_text())["steps"]["memit"]
    assert skipped["status"] == "skipped (no time left)"
