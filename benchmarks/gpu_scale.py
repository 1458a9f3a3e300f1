"""Every method at GPT-J-6B scale on one device, with a random model and no download.

    python benchmarks/gpu_scale.py OUT --device cuda          # GPT-J-6B shape, bf16
    python benchmarks/gpu_scale.py OUT --tiny                  # a few layers, seconds on a CPU

The model is ``transformers.GPTJConfig()`` (28 layers, width 4,096, MLP width 16,384, vocabulary
50,400), randomly initialised in ``--dtype`` on ``--device``; the tokenizer is a byte-level BPE
trained here on the Python documentation's paragraphs
(:func:`remedi.methods.second_moment.python_docs`). The timings therefore say nothing about edit
quality, only about cost. Each measurement goes through the product's own code:

- ``second_moment``: :func:`remedi.methods.second_moment.collect` of ROME's layer (5; the middle
  one with ``--tiny``), cold (a fresh cache), tokens per second;
- ``rome``: the inverse C⁻¹ of those statistics (once), then the whole
  :func:`remedi.methods.rome.apply_edit` per edit, median of ``--rome-edits``;
- ``remedi``: ``benchmarks/remedi_step.py``'s measurement (training step over a floor of plain
  forward/backward passes) run on this model;
- ``mend``: :class:`lightning_modules.MendModule` trained by a Lightning ``Trainer`` on the
  built-in CounterFact facts, seconds per optimiser step and peak memory;
- ``causal_trace``: one full :func:`remedi.methods.causal_trace.trace` (hidden, MLP, attention);
- ``memit``: statistics and inverses of MEMIT's layers, then one
  :func:`remedi.methods.memit.apply_edits` of ``--memit-requests`` synthetic facts.

Each step runs under its own time budget (``--<step>-budget`` seconds, and whatever is left of
``--budget``); a step over budget is stopped and reported as such. ``OUT/gpu_scale.json`` is
rewritten after every step, so a run cut short still reports; ``OUT/gpu_scale.md`` (a Markdown
table) is written at the end. Peak memory is ``torch.cuda.max_memory_allocated`` during the step
on a GPU; on a CPU it is the process's peak RSS so far.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch

from remedi.atomic import write_json, write_text
from remedi.methods.requests import EditRequest
from remedi.models import LoadedModel, wrap_model

STEPS = ("second_moment", "rome", "remedi", "mend", "causal_trace", "memit")
TINY: dict[str, Any] = dict(n_embd=64, n_layer=4, n_head=4, rotary_dim=8, vocab_size=512)
TEMPLATES = (
    "{} is located in",
    "{} works in the field of",
    "{} was created by",
    "The language of {} is",
    "{} is a member of",
)
TARGETS = ("Paris", "music", "Python", "German", "the council", "Japan", "chemistry", "Rome")


class OverBudget(Exception):
    """Raised inside a step when its time budget runs out."""


@contextmanager
def time_budget(seconds: float) -> Iterator[None]:
    """Raise :class:`OverBudget` in the main thread once ``seconds`` have passed (SIGALRM)."""

    def expire(_signum: int, _frame: FrameType | None) -> None:
        raise OverBudget(f"over its budget of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(L.Callback):
    """Seconds of each training step (the device synchronised at both ends)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []
        self.began = 0.0

    def on_train_batch_start(self, *_: Any) -> None:
        sync(self.device)
        self.began = time.perf_counter()

    def on_train_batch_end(self, *_: Any) -> None:
        sync(self.device)
        self.times.append(time.perf_counter() - self.began)


def timing_trainer(
    device: torch.device, dtype: str, steps: int, root: str | os.PathLike[str], timer: StepTimer
) -> L.Trainer:
    """A quiet Trainer for timing ``steps`` training steps: no validation, logging or saving."""
    return L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision="bf16-mixed" if dtype == "bfloat16" else "32-true",
        max_steps=steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        callbacks=[timer],
    )


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated since the last reset, or the process's peak RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def byte_level_bpe(texts: Iterable[str], vocab_size: int, special_tokens: list[str]) -> Any:
    """A GPT-2 style byte-level BPE (``tokenizers.Tokenizer``) trained on ``texts``; offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def train_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE trained on the Python documentation's paragraphs (offline, < 1 s)."""
    from transformers import PreTrainedTokenizerFast

    from remedi.methods.second_moment import python_docs

    end = "<|endoftext|>"
    tok = byte_level_bpe(python_docs(), vocab_size, [end])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=end, eos_token=end, pad_token=end
    )


def build_model(tiny: bool, device: str, dtype: torch.dtype, seed: int) -> LoadedModel:
    """A randomly initialised GPT-J (6B shape, or :data:`TINY`) on ``device`` in ``dtype``."""
    from transformers import AutoModelForCausalLM, GPTJConfig

    config = GPTJConfig(**TINY) if tiny else GPTJConfig()
    tokenizer = train_tokenizer(min(config.vocab_size, 50_400))
    config.bos_token_id = config.eos_token_id = config.pad_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    shape = "tiny" if tiny else "6b"
    return wrap_model(model, tokenizer, spec=f"random-gptj-{shape}-seed{seed}")


def synthetic_requests(n: int) -> list[EditRequest]:
    """``n`` distinct made-up facts ("Subject 17 is located in" -> "Paris")."""
    return [
        EditRequest(TEMPLATES[i % len(TEMPLATES)], f"Subject {i}", TARGETS[i % len(TARGETS)])
        for i in range(n)
    ]


class Report:
    """The measurements so far, written to ``OUT/gpu_scale.json`` after each one."""

    def __init__(self, out: Path, header: dict[str, Any]) -> None:
        self.out = out
        self.data: dict[str, Any] = {**header, "steps": {}}
        self.flush()

    def flush(self) -> None:
        write_json(self.out / "gpu_scale.json", self.data)

    def step(self, name: str, result: dict[str, Any]) -> None:
        self.data["steps"][name] = result
        peaks = [s["peak_memory_gb"] for s in self.data["steps"].values() if "peak_memory_gb" in s]
        self.data["peak_memory_gb"] = max(peaks, default=0.0)
        self.flush()

    def markdown(self) -> str:
        """One row per step: its headline number, time, peak memory and status."""
        d = self.data
        lines = [
            f"# {d['model']['spec']} on {d['device_name']} ({d['dtype']})",
            "",
            f"Model: {d['model']['n_layer']} layers, width {d['model']['n_embd']}, MLP width "
            f"{d['model']['mlp_width']}, vocabulary {d['model']['vocab_size']:,}, "
            f"{d['model']['parameters'] / 1e6:,.1f} M parameters; built in {d['build_s']:.1f} s.",
            "",
            "| step | result | seconds | peak memory (GB) | status |",
            "|---|---|---:|---:|---|",
        ]
        for name in STEPS:
            step = d["steps"].get(name)
            if step is None:
                continue
            lines.append(
                f"| {name} | {step.get('headline', '')} | {step.get('seconds', 0.0):.2f} | "
                f"{step.get('peak_memory_gb', 0.0):.2f} | {step['status']} |"
            )
        lines += ["", f"Peak memory over all steps: {d.get('peak_memory_gb', 0.0):.2f} GB.", ""]
        return "\n".join(lines)


def run_step(
    report: Report,
    name: str,
    budget: float,
    deadline: float,
    device: torch.device,
    fn: Callable[[dict[str, Any]], str],
) -> None:
    """Run ``fn(result)`` under the smaller of ``budget`` and what is left before ``deadline``;
    ``fn`` fills ``result`` as it goes and returns the headline. Failures are recorded."""
    left = min(budget, deadline - time.perf_counter())
    result: dict[str, Any] = {"budget_s": budget}
    if left < 1:
        report.step(name, {**result, "status": "skipped (no time left)"})
        return
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    try:
        with time_budget(left):
            result["headline"] = fn(result)
        result["status"] = "ok"
    except OverBudget as err:
        result["status"] = f"stopped: {err}"
    except Exception as err:  # a failed step must not lose the others' numbers
        result["status"] = f"failed: {type(err).__name__}: {err}"[:300]
    sync(device)
    result["seconds"] = time.perf_counter() - start
    result["peak_memory_gb"] = peak_memory_gb(device)
    report.step(name, result)
    print(f"{name}: {result['status']} {result.get('headline', '')}", file=sys.stderr)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="folder for gpu_scale.json and gpu_scale.md")
    parser.add_argument("--tiny", action="store_true", help="a few small layers (CPU, seconds)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    parser.add_argument("--cache", type=Path, help="REMEDI_CACHE for statistics (default: fresh)")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for all steps")
    parser.add_argument("--stats-tokens", type=int, help="default 100,000 (--tiny: 2,000)")
    parser.add_argument("--batch-chunks", type=int, default=8, help="256-token chunks per pass")
    parser.add_argument("--rome-edits", type=int, default=5)
    parser.add_argument("--remedi-repeats", type=int, help="default 7 (--tiny: 2)")
    parser.add_argument("--mend-steps", type=int, help="default 6 (--tiny: 3)")
    parser.add_argument("--mend-rank", type=int, help="default 1,920 (--tiny: 8)")
    parser.add_argument("--trace-samples", type=int, default=10)
    parser.add_argument("--memit-requests", type=int, help="default 1,000 (--tiny: 16)")
    parser.add_argument("--memit-request-batch", type=int, default=64)
    parser.add_argument("--memit-steps", type=int, default=25)
    for step, seconds in (
        ("stats", 60),
        ("rome", 90),
        ("remedi", 60),
        ("mend", 90),
        ("trace", 60),
        ("memit", 240),
    ):
        parser.add_argument(f"--{step}-budget", type=float, default=float(seconds))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    tiny = args.tiny
    stats_tokens = args.stats_tokens or (2_000 if tiny else 100_000)
    n_requests = args.memit_requests or (16 if tiny else 1_000)
    remedi_repeats = args.remedi_repeats or (2 if tiny else 7)
    mend_steps = args.mend_steps or (3 if tiny else 6)
    mend_rank = args.mend_rank or (8 if tiny else 1_920)
    torch.set_num_threads(args.threads)
    args.output.mkdir(parents=True, exist_ok=True)
    before = os.environ.get("REMEDI_CACHE")
    with tempfile.TemporaryDirectory(prefix="gpu_scale_cache") as fresh:
        os.environ["REMEDI_CACHE"] = str(args.cache or fresh)
        try:
            return _measure(args, stats_tokens, n_requests, remedi_repeats, mend_steps, mend_rank)
        finally:
            if before is None:
                del os.environ["REMEDI_CACHE"]
            else:
                os.environ["REMEDI_CACHE"] = before


def _measure(
    args: argparse.Namespace,
    stats_tokens: int,
    n_requests: int,
    remedi_repeats: int,
    mend_steps: int,
    mend_rank: int,
) -> dict[str, Any]:
    from remedi.methods import memit, rome, second_moment

    deadline = time.perf_counter() + args.budget
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    start = time.perf_counter()
    lm = build_model(args.tiny, args.device, dtype, args.seed)
    device = lm.device
    sync(device)
    build_s = time.perf_counter() - start
    config = lm.model.config
    layer = lm.arch.num_layers // 2 if args.tiny else 5
    report = Report(
        args.output,
        {
            "model": {
                "spec": lm.spec,
                "n_layer": lm.arch.num_layers,
                "n_embd": lm.arch.hidden_size,
                "mlp_width": lm.arch.mlp_hidden_size,
                "vocab_size": config.vocab_size,
                "tokenizer_size": len(lm.tokenizer),
                "parameters": sum(p.numel() for p in lm.model.parameters()),
            },
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
            "dtype": args.dtype,
            "threads": torch.get_num_threads(),
            "build_s": build_s,
            "torch": torch.__version__,
            "platform": platform.platform(),
            "argv": sys.argv[1:],
        },
    )
    held: dict[str, Any] = {}

    def stats_step(result: dict[str, Any]) -> str:
        result.update(layer=layer, batch_chunks=args.batch_chunks)
        begun = time.perf_counter()
        stats = second_moment.collect(
            lm, [layer], None, stats_tokens, progress=False, batch_chunks=args.batch_chunks
        )[layer]
        sync(device)
        seconds = time.perf_counter() - begun
        held["stats"] = stats
        result.update(tokens=stats.n_tokens, from_cache=stats.from_cache)
        result["tokens_per_s"] = stats.n_tokens / seconds
        return f"{result['tokens_per_s']:,.0f} tokens/s (layer {layer})"

    def rome_step(result: dict[str, Any]) -> str:
        stats = held.get("stats")
        result.update(layer=layer, whitened=stats is not None)
        if stats is not None:
            begun = time.perf_counter()
            stats.inverse(device)
            sync(device)
            result["inverse_s"] = time.perf_counter() - begun
        times: list[float] = []
        result["seconds_per_edit"] = times
        for request in synthetic_requests(args.rome_edits):
            sync(device)
            begun = time.perf_counter()
            with rome.apply_edit(lm, request, layer=layer, stats=stats):
                sync(device)
                times.append(time.perf_counter() - begun)
        result["median_s"] = statistics.median(times)
        return f"{result['median_s']:.2f} s per edit (median of {len(times)})"

    def remedi_step_(result: dict[str, Any]) -> str:
        import remedi_step

        remedi_step.random_gptj = lambda device, dtype: lm  # measure this model
        measured = remedi_step.main(
            [
                "--random-gptj",
                "--device",
                str(device),
                "--dtype",
                args.dtype,
                "--repeats",
                str(remedi_repeats),
                "--threads",
                str(torch.get_num_threads()),
                "--output",
                str(args.output / "remedi_step.json"),
            ]
        )
        keys = ("ratio", "examples_per_s", "step_s_median", "floor_s_median", "batch_size")
        result.update({k: measured[k] for k in keys})
        return f"ratio {measured['ratio']:.2f}, {measured['examples_per_s']:.1f} examples/s"

    def mend_step(result: dict[str, Any]) -> str:

        from datamodules import CounterFactDataModule
        from lightning_modules import MendModule, register_model

        register_model(lm, args.dtype)
        module = MendModule(model=lm.spec, model_dtype=args.dtype, rank=mend_rank)
        timer = StepTimer(device)
        times = timer.times

        trainer = timing_trainer(device, args.dtype, mend_steps, args.output / "mend", timer)
        trainer.fit(module, datamodule=CounterFactDataModule(batch_size=10))
        warm = times[1:] or times
        result.update(layers=module.layers, rank=mend_rank, batch_size=10, step_s_all=times)
        result["step_s_median"] = statistics.median(warm)
        return f"{result['step_s_median']:.3f} s per step (rank {mend_rank}, batch 10)"

    def trace_step(result: dict[str, Any]) -> str:
        from remedi.methods import causal_trace

        prompt, subject = "The Eiffel Tower is located in the city of", "The Eiffel Tower"
        begun = time.perf_counter()
        with torch.no_grad():
            traced = causal_trace.trace(lm, prompt, subject, samples=args.trace_samples)
        sync(device)
        result["trace_s"] = time.perf_counter() - begun
        result["tokens"] = int(traced.scores["hidden"].shape[0])
        return f"{result['trace_s']:.2f} s per prompt ({result['tokens']} tokens, 3 kinds)"

    def memit_step(result: dict[str, Any]) -> str:
        layers = memit.default_layers(lm)
        result.update(layers=layers, requests=n_requests, request_batch=args.memit_request_batch)
        begun = time.perf_counter()
        stats = second_moment.collect(
            lm, layers, None, stats_tokens, progress=False, batch_chunks=args.batch_chunks
        )
        sync(device)
        result["stats_s"] = time.perf_counter() - begun
        begun = time.perf_counter()
        for layer_stats in stats.values():
            layer_stats.inverse(device)
        sync(device)
        result["inverse_s"] = time.perf_counter() - begun
        hp = memit.MemitHyperParams(request_batch=args.memit_request_batch, steps=args.memit_steps)
        requests = synthetic_requests(n_requests)
        begun = time.perf_counter()
        with memit.apply_edits(lm, requests, stats=stats, hparams=hp, progress=False):
            sync(device)
            result["edit_s"] = time.perf_counter() - begun
        return f"{result['edit_s']:.1f} s for {n_requests:,} requests at once"

    steps: dict[str, tuple[float, Callable[[dict[str, Any]], str]]] = {
        "second_moment": (args.stats_budget, stats_step),
        "rome": (args.rome_budget, rome_step),
        "remedi": (args.remedi_budget, remedi_step_),
        "mend": (args.mend_budget, mend_step),
        "causal_trace": (args.trace_budget, trace_step),
        "memit": (args.memit_budget, memit_step),
    }
    for name in STEPS:
        if name in args.steps:
            budget, fn = steps[name]
            run_step(report, name, budget, deadline, device, fn)
    write_text(args.output / "gpu_scale.md", report.markdown())
    print(report.markdown())
    return report.data


if __name__ == "__main__":
    main()
