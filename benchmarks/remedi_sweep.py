"""Train REMEDI editors at several layers (``RemediModule`` under a Lightning ``Trainer``) and
score them before and after.

Used for the layer sweep and the comparison with the reference implementation, e.g.

    PYTHONPATH=. python benchmarks/remedi_sweep.py --layers 1 4 8 --epochs 3 \
        --output /tmp/sweep.json                                   # built-in facts
    PYTHONPATH=. python benchmarks/remedi_sweep.py --layers 1 --epochs 3 --scoring first \
        --data ../shared/data/counterfact/counterfact-train.mend_format.json --n-train 1000 \
        --n-val 200 --test ../shared/data/counterfact/counterfact-val.mend_format.json \
        --n-test 200 --output /tmp/bar.json                        # the reference's split

Training uses the module and datamodule of ``python -m remedi.train fit``, with the module's
defaults (AdamW, batch 16, λ_m=1, λ_u=1, λ_kl=10, first-token targets, paraphrase prompts) and
``CounterFactDataModule``'s ``ordered`` split, without early stopping; after each epoch the
validation loss picks the best editor (the module keeps its weights), which is scored on the
test cases with the unedited model's scores beside it. No checkpoint or log is written: the
results go to ``--output``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from datamodules import CounterFactDataModule
from lightning_modules import RemediModule, shared_model
from remedi.allocator import release_freed_memory
from remedi.atomic import write_json
from remedi.data import EditCase
from remedi.metrics import evaluate_cases


class SweepTimings(L.Callback):
    """Seconds spent where the sweep reports them: attribute precomputation (the module's
    ``on_fit_start``), training, each optimizer step, and the validation loss of each epoch."""

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []
        self.step_times: list[float] = []
        self.precompute_s = 0.0
        self.train_s = 0.0
        self._clock = 0.0
        self._step = 0.0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start timing the precomputation (callbacks run before the module's hook)."""
        self._clock = time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """End the precomputation; start timing training."""
        now = time.perf_counter()
        self.precompute_s, self._clock = now - self._clock, now

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Start timing a step."""
        self._step = time.perf_counter()

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Record a step's seconds."""
        self.step_times.append(time.perf_counter() - self._step)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Record the epoch's validation loss."""
        if not trainer.sanity_checking and "val/loss" in trainer.callback_metrics:
            loss = float(trainer.callback_metrics["val/loss"])
            self.history.append({"epoch": trainer.current_epoch, "val_loss": loss})

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """End timing training."""
        self.train_s = time.perf_counter() - self._clock


def run_layer(
    layer: int, data: CounterFactDataModule, test: list[EditCase], args: argparse.Namespace
) -> dict[str, Any]:
    """Train an editor at ``layer`` on ``data``, then score its best weights on ``test``."""
    torch.manual_seed(args.seed)
    module = RemediModule(
        model=args.model,
        layer=layer,
        editor=args.editor,
        lr=args.lr,
        weight_decay=0.01,
        lambda_kl=args.lambda_kl,
        scoring=args.scoring,
    )
    timings = SweepTimings()
    trainer = L.Trainer(
        accelerator="auto",
        devices=1,
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        inference_mode=False,
        callbacks=[timings],
    )
    trainer.fit(module, datamodule=data)
    module.use_best_weights()
    with torch.no_grad():
        summary, _ = evaluate_cases(
            module.lm.model,
            module.lm.tokenizer,
            test,
            edit=module.case_edit(test),
            batch_size=32,
            scoring=args.scoring,
        )
    return {
        "layer": layer,
        "metrics": summary,
        "history": timings.history,
        "precompute_s": timings.precompute_s,
        "train_s": timings.train_s,
        "median_step_s": statistics.median(timings.step_times),
        "n_train_examples": len(data.train_examples),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The sweep's command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--layers", type=int, nargs="+", default=[1])
    parser.add_argument("--data", help="CounterFact file (default: the built-in facts)")
    parser.add_argument("--test", help="file of test cases (default: split from --data)")
    parser.add_argument("--n-train", type=int)
    parser.add_argument("--n-val", type=int)
    parser.add_argument("--n-test", type=int)
    parser.add_argument("--prompts-per-case", type=int)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lambda-kl", type=float, default=10.0)
    parser.add_argument("--editor", default="affine")
    parser.add_argument("--scoring", choices=["mean", "first"], default="mean")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", required=True, type=Path)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the sweep; the results (also written to ``--output`` after each layer)."""
    args = parse_args(argv)
    release_freed_memory()
    torch.set_num_threads(args.threads)
    data = CounterFactDataModule(
        path=args.data,
        test_path=args.test,
        n_train=args.n_train,
        n_val=args.n_val,
        n_test=args.n_test,
        split="ordered",
        batch_size=args.batch_size,
        seed=args.seed,
        prompts_per_case=args.prompts_per_case,
    )
    data.setup("fit")
    test = data.test_cases
    lm = shared_model(args.model)
    with torch.no_grad():
        unedited, _ = evaluate_cases(lm.model, lm.tokenizer, test, scoring=args.scoring)
    result: dict[str, Any] = {
        "args": {k: v for k, v in vars(args).items() if k != "output"},
        "n_train_cases": len(data.train_cases),
        "n_val_cases": len(data.val_cases),
        "n_test_cases": len(test),
        "unedited": unedited,
        "layers": [],
    }
    write_json(args.output, result)
    for layer in args.layers:
        result["layers"].append(run_layer(layer, data, test, args))
        result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        write_json(args.output, result)
        print(json.dumps(result["layers"][-1]["metrics"]), flush=True)
    return result


if __name__ == "__main__":
    main()
