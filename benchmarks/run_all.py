"""Every method's speed and memory on one model, in one command, through the product's own code.

    python benchmarks/run_all.py OUT                      # the default model (Gemma-3-270M), CPU
    python benchmarks/run_all.py OUT --tiny               # a tiny random GPT-J, seconds
    python benchmarks/run_all.py OUT --only rome,memit --threads 2 --budget-s 1200

Steps (``--only`` picks some, in this order):

- ``load``: :func:`remedi.models.load_model` cold (an empty ``REMEDI_CACHE``: the default model's
  GGUF is assembled and dequantised) and warm (the cache filled; median of the repeats);
- ``second_moment``: :func:`remedi.methods.second_moment.collect` of ROME's layer into the run's
  empty statistics cache (tokens per second), then C⁻¹, then both again from the cache;
- ``rome``: the registered ``"rome"`` method's ``write`` per built-in fact, seconds per
  edit with the statistics cached, and the first edit's cost with them cold;
- ``memit``: :func:`remedi.methods.memit.apply_edits` of K built-in facts at once;
- ``ft`` / ``ft_l``: :func:`remedi.methods.finetune.apply_edit` (the registered ``"ft"`` and
  ``"ft-l"``), seconds per edit;
- ``kn``: :func:`remedi.methods.knowledge_neurons.identify` (integrated gradients over every
  layer, for each of the fact's prompts), seconds per fact;
- ``causal_trace``: :func:`remedi.methods.causal_trace.trace` of each kind (hidden, MLP,
  attention), seconds per prompt;
- ``scoring``: :func:`remedi.metrics.evaluate_cases` of the unedited model, seconds per case;
- ``remedi``: ``benchmarks/remedi_step.py``'s training step and its ratio to the
  forward/backward floor;
- ``mend`` / ``ke``: :class:`lightning_modules.MendModule` / :class:`~lightning_modules.KeModule`
  (the quickstart settings) trained by a Lightning ``Trainer``, seconds per optimiser step.

Requests and cases are the built-in facts (:func:`remedi.data.load_builtin`), so no file is needed.
Each step runs in its own Python process (the model loaded there), so its peak RSS is its own,
model and imports included; ``--in-process`` runs them all in this process instead, and the peak
RSS reported is then the running maximum. On a GPU the peak memory allocated is per step in both
modes. Steps share ``--budget-s``: a step that runs out is stopped and the rest are skipped.
``OUT/run_all.json`` and ``OUT/run_all.md`` (the README's table: what | result | reproduce) are
rewritten after every step, so a run cut short still reports.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import gpu_scale
import torch

from remedi.atomic import write_json, write_text
from remedi.data import EditCase, load_builtin
from remedi.models import DEFAULT_MODEL, LoadedModel, load_model

STEPS = (
    "load",
    "second_moment",
    "rome",
    "memit",
    "ft",
    "ft_l",
    "kn",
    "causal_trace",
    "scoring",
    "remedi",
    "mend",
    "ke",
)
WHAT = {
    "load": "model load, cold (empty cache) / warm",
    "second_moment": "second-moment statistics, ROME's layer, cold then cached",
    "rome": "ROME, seconds per edit (statistics cached vs cold)",
    "memit": "MEMIT, K requests at once",
    "ft": "FT (fine-tune one MLP projection), seconds per edit",
    "ft_l": "FT-L (L∞ 5e-4), seconds per edit",
    "kn": "knowledge neurons, attribution per fact",
    "causal_trace": "causal trace, three kinds, seconds per prompt",
    "scoring": "CounterFact scoring (`evaluate_cases`), seconds per case",
    "remedi": "REMEDI training step ÷ (no-grad forward + forward/backward)",
    "mend": "MEND training step (quickstart settings)",
    "ke": "KE training step (quickstart settings)",
}
TRAIN_LAYERS = (1, 2, 3)
"""The blocks configs/{mend,ke}/quickstart.yaml edit."""


@dataclass(frozen=True)
class Sizes:
    """How much each step measures."""

    repeats: int
    """Loads, ROME / FT / FT-L edits timed (the median is reported)."""
    stats_tokens: int
    memit_requests: int
    kn_facts: int
    trace_prompts: int
    scoring_cases: int
    remedi_repeats: int
    train_steps: int
    """MEND / KE optimiser steps; the first is left out of the median."""
    mend_rank: int
    ke_hidden: int
    budget_s: float


FULL = Sizes(
    repeats=5,
    stats_tokens=100_000,
    memit_requests=100,
    kn_facts=3,
    trace_prompts=2,
    scoring_cases=20,
    remedi_repeats=7,
    train_steps=6,
    mend_rank=256,
    ke_hidden=128,
    budget_s=3600.0,
)
TINY = Sizes(
    repeats=2,
    stats_tokens=600,
    memit_requests=4,
    kn_facts=2,
    trace_prompts=1,
    scoring_cases=4,
    remedi_repeats=2,
    train_steps=3,
    mend_rank=8,
    ke_hidden=16,
    budget_s=600.0,
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds ``fn()`` took (the device synchronised before and after) and its result."""
    _sync(device)
    start = time.perf_counter()
    value = fn()
    _sync(device)
    return time.perf_counter() - start, value


@contextmanager
def remedi_cache(path: Path) -> Iterator[None]:
    """Point ``REMEDI_CACHE`` at ``path`` for the block."""
    before = os.environ.get("REMEDI_CACHE")
    os.environ["REMEDI_CACHE"] = str(path)
    try:
        yield
    finally:
        if before is None:
            del os.environ["REMEDI_CACHE"]
        else:
            os.environ["REMEDI_CACHE"] = before


def secs(seconds: float) -> str:
    """Seconds to three significant figures (whole seconds from 100 s)."""
    return f"{seconds:.0f} s" if seconds >= 100 else f"{seconds:.3g} s"


def peak_rss_gb() -> float:
    """This process's peak resident set size so far (Linux reports kB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e9 if sys.platform == "darwin" else peak / 1e6


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str, threads: int) -> dict[str, Any]:
    """What the numbers were measured on."""
    import transformers

    info: dict[str, Any] = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average_1min": os.getloadavg()[0],
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def save_tiny_model(folder: Path) -> str:
    """Save :func:`gpu_scale.build_model`'s tiny random GPT-J (float32) to ``folder``, once, so
    every step loads it with :func:`remedi.models.load_model` like any other model."""
    if not (folder / "config.json").is_file():
        lm = gpu_scale.build_model(True, "cpu", torch.float32, seed=0)
        lm.model.save_pretrained(folder)
        lm.tokenizer.save_pretrained(folder)
    return str(folder)


class Context:
    """What a step measures with: the options, the sizes, the model (loaded on first use) and
    the report so far."""

    def __init__(self, args: argparse.Namespace, sizes: Sizes, report: dict[str, Any]) -> None:
        self.args = args
        self.sizes = sizes
        self.report = report

    @cached_property
    def lm(self) -> LoadedModel:
        return load_model(self.args.model, dtype=self.args.dtype, device=self.args.device)

    @cached_property
    def cases(self) -> list[EditCase]:
        return load_builtin()

    @property
    def device(self) -> torch.device:
        return self.lm.device

    def collect(self, layers: list[int]) -> tuple[float, dict[int, Any]]:
        """Seconds and result of collecting ``layers``' statistics in the run's cache."""
        from remedi.methods import second_moment

        with remedi_cache(self.args.cache):
            return timed(
                self.device,
                lambda: second_moment.collect(
                    self.lm, layers, self.args.corpus, self.sizes.stats_tokens, progress=False
                ),
            )

    def invert(self, stats: dict[int, Any]) -> float:
        """Seconds to get every layer's C⁻¹ (from the cache when it holds one)."""
        from remedi.methods import second_moment

        width = self.lm.arch.mlp_hidden_size
        seconds, _ = timed(
            self.device,
            lambda: [second_moment.inverse(s, self.device, width) for s in stats.values()],
        )
        return seconds

    def edit_seconds(self, edit: Callable[[EditCase], Any], n: int) -> list[float]:
        """Seconds each of the first ``n`` built-in facts took to write with ``edit`` (each
        restored before the next)."""
        times = []
        for case in self.cases[:n]:
            seconds, handle = timed(self.device, partial(edit, case))
            handle.restore()
            times.append(seconds)
        return times

    def previous(self, step: str) -> dict[str, Any] | None:
        """An earlier step's result in this run, when it finished."""
        result = self.report["steps"].get(step)
        return result if result is not None and result.get("status") == "ok" else None


def load_step(ctx: Context, r: dict[str, Any]) -> str:
    args, n = ctx.args, ctx.sizes.repeats

    def load() -> None:
        lm = load_model(args.model, dtype=args.dtype, device=args.device)
        _sync(lm.device)

    with tempfile.TemporaryDirectory(prefix="run_all_load") as empty, remedi_cache(Path(empty)):
        r["cold_s"], _ = timed(torch.device("cpu"), load)
        gc.collect()
        warm = []
        for _ in range(n):
            seconds, _ = timed(torch.device("cpu"), load)
            warm.append(seconds)
            gc.collect()
    r.update(warm_s_all=warm, warm_s_median=statistics.median(warm))
    how = "assembles and dequantises the GGUF" if args.model == DEFAULT_MODEL else "first load"
    return f"cold {secs(r['cold_s'])} ({how}), warm {secs(r['warm_s_median'])} (median of {n})"


def second_moment_step(ctx: Context, r: dict[str, Any]) -> str:
    from remedi.methods import rome, second_moment

    layer = rome.default_layer(ctx.lm)
    seconds, stats = ctx.collect([layer])
    first = stats[layer]
    r.update(layer=layer, corpus=second_moment.describe(ctx.args.corpus), collect_s=seconds)
    r.update(n_tokens=first.n_tokens, from_cache=first.from_cache)
    r["tokens_per_s"] = first.n_tokens / seconds
    r["inverse_s"] = ctx.invert(stats)
    second_moment.release_inverses()
    r["cached_collect_s"], cached = ctx.collect([layer])
    r["cached_inverse_s"] = ctx.invert(cached)
    cold = "from an existing cache" if first.from_cache else "cold"
    return (
        f"{r['tokens_per_s']:,.0f} tokens/s ({first.n_tokens:,} tokens, layer {layer}, {cold}: "
        f"{secs(seconds)}), C⁻¹ {secs(r['inverse_s'])}; from the cache "
        f"{secs(r['cached_collect_s'])} + {secs(r['cached_inverse_s'])}"
    )


def case_editor(lm: Any, name: str, layer: int, stats: Any = None) -> Any:
    """A function that writes one case with the registered method ``name`` at ``layer`` (ROME:
    with the layer's second moment ``stats``; None: identity) and returns its restoring handle."""
    from remedi import registry

    method = registry.editor(name, layer=layer)
    method.environment.statistics = registry.Statistics(
        enabled=stats is not None, cache={} if stats is None else {layer: stats}
    )
    return lambda case: method.write(lm, [case])[0]


def rome_step(ctx: Context, r: dict[str, Any]) -> str:
    from remedi.methods import rome

    layer = rome.default_layer(ctx.lm)
    stats_s, stats = ctx.collect([layer])
    inverse_s = ctx.invert(stats)
    from_cache = bool(stats[layer].from_cache)
    r.update(layer=layer, stats_s=stats_s, inverse_s=inverse_s, stats_from_cache=from_cache)
    times = ctx.edit_seconds(case_editor(ctx.lm, "rome", layer, stats[layer]), ctx.sizes.repeats)
    median = statistics.median(times)
    r.update(seconds_per_edit=times, median_s=median)
    if not from_cache:
        r["cold_first_edit_s"] = stats_s + inverse_s + times[0]
    elif (sm := ctx.previous("second_moment")) is not None and not sm["from_cache"]:
        r["cold_first_edit_s"] = sm["collect_s"] + sm["inverse_s"] + median
    line = f"{secs(median)} per edit (median of {len(times)}, layer {layer})"
    if from_cache:
        line += f" with statistics cached (+{secs(stats_s + inverse_s)} to load them and C⁻¹)"
    if "cold_first_edit_s" in r:
        line += f"; {secs(r['cold_first_edit_s'])} for a first edit with cold statistics"
    return line


def memit_step(ctx: Context, r: dict[str, Any]) -> str:
    from remedi.methods import memit

    layers = memit.default_layers(ctx.lm)
    stats_s, stats = ctx.collect(layers)
    cached = sum(bool(s.from_cache) for s in stats.values())
    inverse_s = ctx.invert(stats)
    requests = ctx.cases[: ctx.sizes.memit_requests]
    r.update(layers=layers, requests=len(requests), stats_s=stats_s, inverse_s=inverse_s)
    r["edit_s"], handle = timed(
        ctx.device, lambda: memit.apply_edits(ctx.lm, requests, stats=stats, progress=False)
    )
    handle.restore()
    return (
        f"{secs(r['edit_s'])} for {len(requests)} requests (layers {layers[0]}–{layers[-1]}), "
        f"after {secs(stats_s)} of statistics ({cached} of "
        f"{len(layers)} layers cached) and {secs(inverse_s)} of C⁻¹"
    )


def finetune_step(method: str) -> Callable[[Context, dict[str, Any]], str]:
    """The step timing ``method`` (``ft`` or ``ft-l``) per edit."""

    def step(ctx: Context, r: dict[str, Any]) -> str:
        from remedi.methods import rome

        layer = rome.default_layer(ctx.lm)
        times = ctx.edit_seconds(case_editor(ctx.lm, method, layer), ctx.sizes.repeats)
        r.update(layer=layer, seconds_per_edit=times, median_s=statistics.median(times))
        return f"{secs(r['median_s'])} per edit (median of {len(times)}, layer {layer})"

    return step


def kn_step(ctx: Context, r: dict[str, Any]) -> str:
    from remedi.methods import knowledge_neurons as kn

    times, prompts, found = [], [], []
    for case in ctx.cases[: ctx.sizes.kn_facts]:
        texts = kn.case_prompts(case)
        identify = partial(kn.identify, ctx.lm, texts, case.target_true)
        seconds, neurons = timed(ctx.device, identify)
        times.append(seconds)
        prompts.append(len(texts))
        found.append(len(neurons.neurons))
    r.update(seconds_per_fact=times, prompts=prompts, neurons=found)
    r["median_s"] = statistics.median(times)
    layers = ctx.lm.arch.num_layers
    return (
        f"{secs(r['median_s'])} per fact (median of {len(times)}; {max(prompts)} prompts × "
        f"{layers} layers × 20 integration steps)"
    )


def causal_trace_step(ctx: Context, r: dict[str, Any]) -> str:
    from remedi.methods import causal_trace as ct

    r["noise_std_s"], _ = timed(ctx.device, lambda: ct.default_noise_std(ctx.lm))
    per_prompt, tokens = [], []
    for case in ctx.cases[: ctx.sizes.trace_prompts]:
        kinds = {}
        for kind in ct.KINDS:
            trace = partial(
                ct.trace,
                ctx.lm,
                case.rewrite_prompt,
                case.subject,
                subject_start=case.subject_start,
                kinds=[kind],
            )
            kinds[kind], traced = timed(ctx.device, trace)
        tokens.append(len(traced.tokens))
        per_prompt.append(kinds)
    totals = [sum(k.values()) for k in per_prompt]
    r.update(per_prompt=per_prompt, tokens=tokens, median_s=statistics.median(totals))
    first = ", ".join(f"{k} {secs(s)}" for k, s in per_prompt[0].items())
    return (
        f"{secs(r['median_s'])} per prompt (median of {len(totals)}, {tokens[0]} tokens; "
        f"first prompt: {first})"
    )


def scoring_step(ctx: Context, r: dict[str, Any]) -> str:
    from remedi.metrics import case_rows, evaluate_cases

    cases = ctx.cases[: ctx.sizes.scoring_cases]
    rows = sum(len(case_rows(c, i)) for i, c in enumerate(cases))
    seconds, _ = timed(ctx.device, lambda: evaluate_cases(ctx.lm.model, ctx.lm.tokenizer, cases))
    r.update(cases=len(cases), rows=rows, seconds=seconds, per_case_s=seconds / len(cases))
    return f"{secs(r['per_case_s'])} per case ({len(cases)} cases, {rows} prompts, unedited)"


def remedi_step(ctx: Context, r: dict[str, Any]) -> str:
    import remedi_step as benchmark

    layer = min(1, ctx.lm.arch.num_layers - 1)
    dtype = ctx.lm.dtype
    measured = benchmark.measure(ctx.lm, layer, 16, ctx.sizes.remedi_repeats, dtype)
    keys = ("layer", "batch_size", "ratio", "step_s_median", "floor_s_median", "examples_per_s")
    r.update({k: measured[k] for k in keys})
    return (
        f"{measured['ratio']:.2f} (step {secs(measured['step_s_median'])}, floor "
        f"{secs(measured['floor_s_median'])}; batch {measured['batch_size']}, layer {layer})"
    )


def trainer_step(method: str) -> Callable[[Context, dict[str, Any]], str]:
    """The step timing optimiser steps of ``method`` (``mend`` or ``ke``) under Lightning."""

    def step(ctx: Context, r: dict[str, Any]) -> str:
        import lightning as L

        from datamodules import CounterFactDataModule
        from lightning_modules import KeModule, MendModule, register_model

        lm, device, sizes = ctx.lm, ctx.device, ctx.sizes
        register_model(lm, ctx.args.dtype)
        layers = [x for x in TRAIN_LAYERS if x < lm.arch.num_layers] or None
        common: dict[str, Any] = dict(
            model=lm.spec, model_dtype=ctx.args.dtype, layers=layers, c_edit=1.0, lr=1e-3
        )
        common["lr_step"] = 1e-3
        module: L.LightningModule
        if method == "mend":
            module = MendModule(rank=sizes.mend_rank, **common)
            size = f"rank {sizes.mend_rank}"
        else:
            module = KeModule(hidden=sizes.ke_hidden, **common)
            size = f"hidden {sizes.ke_hidden}"
        timer = gpu_scale.StepTimer(device)
        times = timer.times

        with tempfile.TemporaryDirectory(prefix=f"run_all_{method}") as root:
            trainer = gpu_scale.timing_trainer(
                device, ctx.args.dtype, sizes.train_steps, root, timer
            )
            trainer.fit(module, datamodule=CounterFactDataModule(batch_size=8))
        warm = times[1:] or times
        r.update(layers=module.layers, batch_size=8, step_s_all=times)
        r["step_s_median"] = statistics.median(warm)
        blocks = f"blocks {module.layers[0]}–{module.layers[-1]}"
        return (
            f"{secs(r['step_s_median'])} per step of 8 cases (median of {len(warm)} after the "
            f"first; {blocks}, {size})"
        )

    return step


STEP_FUNCTIONS: dict[str, Callable[[Context, dict[str, Any]], str]] = {
    "load": load_step,
    "second_moment": second_moment_step,
    "rome": rome_step,
    "memit": memit_step,
    "ft": finetune_step("ft"),
    "ft_l": finetune_step("ft-l"),
    "kn": kn_step,
    "causal_trace": causal_trace_step,
    "scoring": scoring_step,
    "remedi": remedi_step,
    "mend": trainer_step("mend"),
    "ke": trainer_step("ke"),
}


def run_here(ctx: Context, name: str, seconds: float) -> dict[str, Any]:
    """Run step ``name`` in this process within ``seconds``; failures become its status."""
    result: dict[str, Any] = {}
    gc.collect()
    cuda = ctx.args.device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        with gpu_scale.time_budget(seconds):
            result["headline"] = STEP_FUNCTIONS[name](ctx, result)
        result["status"] = "ok"
    except gpu_scale.OverBudget as err:
        result["status"] = f"stopped: {err}"
    except Exception as err:  # one failed step must not lose the others' numbers
        result["status"] = f"failed: {type(err).__name__}: {err}"[:300]
    result["wall_s"] = time.perf_counter() - start
    result["peak_rss_gb"] = peak_rss_gb()
    if cuda:
        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return result


def child_command(args: argparse.Namespace, name: str, seconds: float) -> list[str]:
    """The command that runs step ``name`` alone in a fresh process."""
    command = [sys.executable, str(Path(__file__).resolve()), str(args.output), "--step", name]
    command += ["--model", args.model, "--device", args.device, "--dtype", args.dtype]
    command += ["--threads", str(args.threads), "--cache", str(args.cache)]
    command += ["--budget-s", f"{seconds:.1f}"]
    if args.tiny:
        command.append("--tiny")
    if args.corpus is not None:
        command += ["--corpus", args.corpus]
    return command


def run_isolated(args: argparse.Namespace, name: str, seconds: float) -> dict[str, Any]:
    """Run step ``name`` in its own process (its own peak RSS); killed a minute past its time."""
    steps = args.output / "steps"
    steps.mkdir(parents=True, exist_ok=True)
    result_path, log_path = steps / f"{name}.json", steps / f"{name}.log"
    result_path.unlink(missing_ok=True)
    start = time.perf_counter()
    with log_path.open("w") as log:
        try:
            done = subprocess.run(
                child_command(args, name, seconds),
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=seconds + 60,
                check=False,
            )
            code: int | None = done.returncode
        except subprocess.TimeoutExpired:
            code = None
    if result_path.is_file():
        return json.loads(result_path.read_text())
    tail = log_path.read_text().strip().splitlines()[-1:] or [""]
    status = "stopped: killed past its budget" if code is None else f"failed: exit code {code}"
    return {"status": f"{status} ({tail[0][:200]})", "wall_s": time.perf_counter() - start}


def reproduce(args: argparse.Namespace, name: str) -> str:
    """The command that measures step ``name`` again."""
    command = f"python benchmarks/run_all.py OUT --only {name}"
    if args.tiny:
        command += " --tiny"
    elif args.model != DEFAULT_MODEL:
        command += f" --model {args.model}"
    if args.device != "cpu":
        command += f" --device {args.device}"
    if args.dtype != "float32":
        command += f" --dtype {args.dtype}"
    if args.threads_given:
        command += f" --threads {args.threads}"
    if args.corpus is not None:
        command += f" --corpus {args.corpus}"
    return f"`{command}`"


def markdown(report: dict[str, Any]) -> str:
    """The README's table of ``report``: a header naming the machine, one row per step."""
    m = report["machine"]
    where = m.get("gpu", m["device"])
    peaks = (
        "each step in its own process, model load included"
        if report["isolated"]
        else "the running maximum of one process"
    )
    lines = [
        f"Measured on {m['cpu']} ({m['cores']} cores, load average {m['load_average_1min']:.1f} "
        f"at the start; torch threads: {m['torch_threads']}), {where}, {report['dtype']}; "
        f"torch {m['torch']}, transformers {m['transformers']}; {m['date']}. "
        f"Model: {report['model']}. Peak RSS: {peaks}.",
        "",
        "| what | result | reproduce |",
        "|---|---|---|",
    ]
    for name, step in report["steps"].items():
        if step["status"] == "ok":
            result = step["headline"]
        else:
            result = f"{step['status']} {step.get('headline', '')}".strip()
        if "peak_rss_gb" in step:
            result += f"; peak RSS {step['peak_rss_gb']:.2f} GB"
        if "peak_gpu_gb" in step:
            result += f", GPU {step['peak_gpu_gb']:.2f} GB"
        what = WHAT[name].replace("K requests", f"{step.get('requests', 'K')} requests")
        lines.append(f"| {what} | {result.replace('|', '/')} | {reproduce(report['args'], name)} |")
    return "\n".join([*lines, ""])


def write_report(out: Path, report: dict[str, Any]) -> None:
    """``run_all.json`` (everything) and ``run_all.md`` (the table)."""
    data = {k: v for k, v in report.items() if k != "args"}
    write_json(out / "run_all.json", data)
    write_text(out / "run_all.md", markdown(report))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="folder for run_all.json and run_all.md")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="any remedi.models.load_model spec")
    parser.add_argument("--tiny", action="store_true", help="a tiny random GPT-J (seconds)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--only", help=f"comma-separated steps of: {','.join(STEPS)}")
    parser.add_argument("--budget-s", type=float, help="seconds for all steps (3,600; tiny 600)")
    parser.add_argument("--corpus", help="second-moment source (default: python-docs)")
    parser.add_argument("--cache", type=Path, help="statistics cache (default: a fresh one)")
    parser.add_argument("--in-process", action="store_true", help="no process per step")
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.threads_given = args.threads is not None
    if args.threads is None:
        args.threads = torch.get_num_threads()
    names = args.only.split(",") if args.only else list(STEPS)
    unknown = [n for n in names if n not in STEPS]
    if unknown:
        parser.error(f"--only: unknown step(s) {', '.join(unknown)}; choose from {STEPS}")
    args.steps = [n for n in STEPS if n in names]
    return args


def run_child(args: argparse.Namespace, sizes: Sizes) -> None:
    """Measure ``args.step`` alone and write ``OUT/steps/STEP.json``."""
    report_path = args.output / "run_all.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {"steps": {}}
    ctx = Context(args, sizes, report)
    result = run_here(ctx, args.step, args.budget_s)
    write_json(args.output / "steps" / f"{args.step}.json", result)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    sizes = TINY if args.tiny else FULL
    if args.budget_s is None:
        args.budget_s = sizes.budget_s
    torch.set_num_threads(args.threads)
    if args.step is not None:
        run_child(args, sizes)
        return {}
    args.output.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        args.model = save_tiny_model(args.output / "tiny-model")
    fresh = args.cache is None
    if fresh:
        args.cache = Path(tempfile.mkdtemp(prefix="run_all_stats"))
    report: dict[str, Any] = {
        "machine": machine(args.device, args.threads),
        "model": "tiny random GPT-J (gpu_scale.TINY)" if args.tiny else args.model,
        "dtype": args.dtype,
        "isolated": not args.in_process,
        "sizes": asdict(sizes),
        "budget_s": args.budget_s,
        "argv": sys.argv[1:] if argv is None else argv,
        "steps": {},
        "args": args,
    }
    write_report(args.output, report)
    deadline = time.perf_counter() + args.budget_s
    ctx = Context(args, sizes, report)
    try:
        for name in args.steps:
            left = deadline - time.perf_counter()
            if left < 1:
                result: dict[str, Any] = {"status": "skipped (no time left)"}
            elif args.in_process:
                result = run_here(ctx, name, left)
            else:
                result = run_isolated(args, name, left)
            report["steps"][name] = result
            write_report(args.output, report)
            print(f"{name}: {result['status']} {result.get('headline', '')}", file=sys.stderr)
    finally:
        if fresh:
            shutil.rmtree(args.cache, ignore_errors=True)
    table = markdown(report)
    print(table)
    return {k: v for k, v in report.items() if k != "args"}


if __name__ == "__main__":
    main()
