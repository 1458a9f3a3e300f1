"""Resident memory over long runs: REMEDI training steps and ROME evaluation of many cases.

Both runs use a tiny randomly initialised GPT-2 (with a byte-level BPE trained on the built-in
facts) and the product's own code paths:

- ``train``: the REMEDI LightningModule fit by a Lightning Trainer on the built-in facts for
  ``--steps`` steps, with a validation pass and a ROME ``EditorBaseline`` callback every
  ``--val-every`` steps (0: no validation; the default 25 puts the first ones, which build
  one-off state such as the bfloat16 copy ROME optimises on, inside the warm-up);
- ``rome``: :func:`remedi.evaluation.runner.run_method` with ``"rome"``, what
  ``remedi.evaluate --method rome`` runs, on ``--cases`` synthetic CounterFact-style cases.

Resident set size (RSS, after a ``gc.collect()``) and the number of hooks registered on the LM
are sampled every ``--every`` steps (cases); growth is measured from the sample after step (case)
``--warmup`` to the end, so that one-off allocations (first batches, caches filled once, the
bfloat16 copy ROME optimises on) do not count. A leak of hooks, autograd graphs or per-step
caches shows as steady growth.

    OMP_NUM_THREADS=1 python benchmarks/memory_growth.py --output /tmp/memory_growth.json
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from gpu_scale import byte_level_bpe
from transformers import AutoModelForCausalLM, GPT2Config, PreTrainedTokenizerFast

from remedi.allocator import release_freed_memory
from remedi.atomic import write_json
from remedi.data import EditCase, load_builtin
from remedi.hooks import count_hooks
from remedi.models import LoadedModel, wrap_model

SUBJECT_FIRST = (
    "Alder Birch Cedar Dune Ember Fjord Garnet Harbor Iris Juniper Kestrel Lumen Marble "
    "Nimbus Onyx Prairie Quartz Raven Sierra Tundra Umber Violet Willow Xenon Yarrow"
)
SUBJECT_LAST = (
    "Works Tower Bridge Labs Motors Records Studios Foods Airlines Bank "
    "Museum Press Valley Station Gardens Hotel Institute Arena Market Harbour"
)
RELATIONS = (
    ("{} is located in", "The headquarters of {} are in"),
    ("{} was founded in", "{} started out in"),
    ("{} is owned by", "The owner of {} is"),
    ("{} is known for", "People know {} for"),
)
TARGETS = (
    "Paris Japan France Berlin Toyota Apple Microsoft Brazil Italy Germany Rome "
    "soccer basketball cars phones Windows Portuguese"
)
"""Words the tiny tokenizer knows (from the built-in facts), used as synthetic targets."""


def rss_mb() -> float:
    """Resident set size of this process in MiB (Linux ``/proc``; else the peak RSS)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class Samples:
    """RSS and LM hook counts taken after given steps; growth from the ``warmup`` sample on."""

    every: int
    warmup: int
    rows: list[dict[str, float]] = field(default_factory=list)

    def due(self, step: int, last: int) -> bool:
        """Whether to sample after ``step`` of a run of ``last`` steps."""
        return step == self.warmup or step == last or (step > 0 and step % self.every == 0)

    def take(self, step: int, lm: LoadedModel) -> None:
        gc.collect()
        self.rows.append(
            {"step": step, "rss_mb": round(rss_mb(), 2), "hooks": count_hooks(lm.model)}
        )

    def summary(self, seconds: float) -> dict[str, Any]:
        """The samples with the RSS after the warm-up, at the end, and the growth between."""
        start = next(r for r in self.rows if r["step"] >= self.warmup)
        end = self.rows[-1]
        growth = 100.0 * (end["rss_mb"] - start["rss_mb"]) / start["rss_mb"]
        return {
            "rss_after_warmup_mb": start["rss_mb"],
            "rss_end_mb": end["rss_mb"],
            "growth_pct": round(growth, 3),
            "max_hooks": max(int(r["hooks"]) for r in self.rows),
            "seconds": round(seconds, 1),
            "samples": self.rows,
        }


def corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: the built-in facts and the synthetic vocabulary."""
    texts = []
    for split in ("train", "validation", "test"):
        for case in load_builtin(split):
            texts += [case.rewrite_prompt, *case.paraphrase_prompts, *case.neighborhood_prompts]
            texts += [f" {case.target_true}", f" {case.target_new}"]
    texts += [SUBJECT_FIRST, SUBJECT_LAST, TARGETS]
    texts += [t for pair in RELATIONS for t in pair]
    return texts


def tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style) trained on :func:`corpus`; offline and quick."""
    tok = byte_level_bpe(corpus(), vocab_size, ["<pad>", "<bos>", "<eos>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )


def tiny_lm(seed: int = 0, hidden: int = 64, layers: int = 4) -> LoadedModel:
    """A frozen, randomly initialised GPT-2 of ``layers`` blocks with :func:`tiny_tokenizer`."""
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=hidden,
        n_layer=layers,
        n_head=4,
        n_positions=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return wrap_model(model, tokenizer, spec=f"tiny-gpt2-memory-{seed}")


def synthetic_cases(n: int) -> list[EditCase]:
    """``n`` distinct CounterFact-style cases (distinct subjects; up to 500, then repeating)."""
    subjects = [f"{a} {b}" for a in SUBJECT_FIRST.split() for b in SUBJECT_LAST.split()]
    targets = TARGETS.split()
    cases = []
    for i in range(n):
        subject = subjects[i % len(subjects)]
        prompt, paraphrase = RELATIONS[i % len(RELATIONS)]
        true, new = targets[i % len(targets)], targets[(i * 7 + 3) % len(targets)]
        if new == true:
            new = targets[(i + 1) % len(targets)]
        others = [subjects[(i + k) % len(subjects)] for k in (1, 2)]
        cases.append(
            EditCase(
                case_id=i,
                subject=subject,
                prompt=prompt,
                target_true=true,
                target_new=new,
                paraphrase_prompts=[paraphrase.replace("{}", subject)],
                neighborhood_prompts=[prompt.replace("{}", o) for o in others],
            )
        )
    return cases


class RssCallback(L.Callback):
    """Samples RSS and LM hooks after training batches (see :class:`Samples`)."""

    def __init__(self, lm: LoadedModel, samples: Samples, steps: int) -> None:
        self.lm = lm
        self.samples = samples
        self.steps = steps

    def on_train_batch_end(self, trainer: L.Trainer, *_args: Any) -> None:
        step = int(trainer.global_step)
        if self.samples.due(step, self.steps) and not any(
            r["step"] == step for r in self.samples.rows
        ):
            self.samples.take(step, self.lm)


def train_run(
    lm: LoadedModel,
    steps: int,
    samples: Samples,
    val_every: int = 25,
    batch_size: int = 8,
    root: str | None = None,
) -> dict[str, Any]:
    """Fit a REMEDI editor on ``lm`` for ``steps`` steps through Lightning; RSS summary."""
    from datamodules import CounterFactDataModule
    from lightning_modules import RemediModule, register_model
    from lightning_modules.callbacks import EditorBaseline

    register_model(lm)
    module = RemediModule(model=lm.spec, layer=1, eval_batch_size=8)
    data = CounterFactDataModule(batch_size=batch_size, n_val=4, n_test=4)
    callbacks: list[L.Callback] = [RssCallback(lm, samples, steps)]
    if val_every:
        callbacks.append(EditorBaseline(method="rome", limit=2, layer=1, on_test=False))
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        max_epochs=-1,
        val_check_interval=val_every or None,
        check_val_every_n_epoch=None,
        limit_val_batches=1 if val_every else 0,
        num_sanity_val_steps=0,
        inference_mode=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root or tempfile.mkdtemp(prefix="memory_growth_"),
        callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    return samples.summary(time.perf_counter() - start)


def rome_run(
    lm: LoadedModel, cases: Sequence[EditCase], samples: Samples, layer: int = 1
) -> dict[str, Any]:
    """Score ROME on every case with the shared registry (one edit, score, restore each)."""
    from remedi import registry
    from remedi.evaluation.runner import run_method

    def under_edit(indices: range, edited: registry.Edited) -> None:
        done = indices[-1] + 1
        if samples.due(done, len(cases)):
            samples.take(done, lm)

    start = time.perf_counter()
    rome = registry.editor("rome", layer=layer)
    rome.environment = registry.Environment(
        statistics=registry.Statistics(enabled=False), progress=False
    )
    result = run_method(lm, rome, cases, under_edit)
    summary = samples.summary(time.perf_counter() - start)
    summary["n_cases"] = len(result.per_case)
    summary["seconds_per_edit"] = sum(result.edit_seconds) / max(1, len(result.edit_seconds))
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--runs", nargs="+", choices=("train", "rome"), default=["train", "rome"])
    parser.add_argument("--steps", type=int, default=500, help="training steps")
    parser.add_argument("--cases", type=int, default=500, help="ROME cases to evaluate")
    parser.add_argument("--every", type=int, default=50, help="sample RSS every N steps/cases")
    parser.add_argument("--warmup", type=int, default=50, help="growth is measured from here")
    parser.add_argument("--val-every", type=int, default=25, help="validation interval (0: off)")
    parser.add_argument("--batch-size", type=int, default=8, help="training batch size")
    parser.add_argument("--limit-pct", type=float, default=5.0, help="allowed growth in %%")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return parser


def run(args: argparse.Namespace, report: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the chosen measurements and write the JSON; returns what was written."""
    if min(args.steps, args.cases) <= args.warmup:
        raise SystemExit("--steps and --cases must exceed --warmup")
    release_freed_memory()
    torch.set_num_threads(args.threads)
    lm = tiny_lm()
    result: dict[str, Any] = {
        "model": lm.spec,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "torch": torch.__version__,
    }
    if "train" in args.runs:
        result["train"] = train_run(
            lm, args.steps, Samples(args.every, args.warmup), args.val_every, args.batch_size
        )
    if "rome" in args.runs:
        cases = synthetic_cases(args.cases)
        result["rome"] = rome_run(lm, cases, Samples(args.every, args.warmup))
    result["passed"] = all(
        result[r]["growth_pct"] < args.limit_pct and result[r]["max_hooks"] == 0 for r in args.runs
    )
    write_json(args.output, result)
    for name in args.runs:
        r = result[name]
        report(
            f"{name}: RSS {r['rss_after_warmup_mb']:.1f} MiB after {args.warmup} -> "
            f"{r['rss_end_mb']:.1f} MiB at the end ({r['growth_pct']:+.2f}%), "
            f"hooks at most {r['max_hooks']}, {r['seconds']} s"
        )
    return result


def main(argv: list[str] | None = None) -> int:
    result = run(build_parser().parse_args(argv))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
