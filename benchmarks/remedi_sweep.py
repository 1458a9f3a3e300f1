"""Train REMEDI editors at several layers with plain PyTorch and score them before and after.

Used for the layer sweep and the comparison with the reference implementation, e.g.

    PYTHONPATH=. python benchmarks/remedi_sweep.py --layers 1 4 8 --epochs 3 \
        --output /tmp/sweep.json                                   # built-in facts
    PYTHONPATH=. python benchmarks/remedi_sweep.py --layers 1 --epochs 3 --scoring first \
        --data ../shared/data/counterfact/counterfact-train.mend_format.json --n-train 1000 \
        --n-val 200 --test ../shared/data/counterfact/counterfact-val.mend_format.json \
        --n-test 200 --output /tmp/bar.json                        # the reference's split

Training follows the module's defaults (AdamW, batch 16, λ_m=1, λ_u=1, λ_kl=10, first-token
targets, paraphrase prompts); after each epoch the validation loss picks the best editor, which
is scored on the test cases (with the unedited model's scores beside it).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from datamodules import CounterFactDataModule
from remedi.allocator import release_freed_memory
from remedi.atomic import write_json
from remedi.data import EditCase
from remedi.editors import (
    LossWeights,
    attribute_states,
    build_editor,
    examples_from_case,
    metrics_context,
    remedi_loss,
)
from remedi.metrics import evaluate_cases
from remedi.models import LoadedModel, load_model


def _contexts(cases: list[EditCase]) -> tuple[list[str], list[str]]:
    return [c.subject for c in cases], [f"{c.rewrite_prompt} {c.target_new}" for c in cases]


def run_layer(
    lm: LoadedModel,
    layer: int,
    train: list[EditCase],
    val: list[EditCase],
    test: list[EditCase],
    args: argparse.Namespace,
) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    examples = [e for c in train for e in examples_from_case(c)[: args.prompts_per_case]]
    val_examples = [e for c in val for e in examples_from_case(c)[:1]]
    start = time.perf_counter()
    attr = attribute_states(lm, layer, [e.context for e in examples], [e.entity for e in examples])
    val_attr = attribute_states(
        lm, layer, [e.context for e in val_examples], [e.entity for e in val_examples]
    )
    precompute_s = time.perf_counter() - start
    editor = build_editor(args.editor, lm.arch.hidden_size)
    optimizer = torch.optim.AdamW(editor.parameters(), lr=args.lr, weight_decay=0.01)
    weights = LossWeights(kl=args.lambda_kl)
    best: tuple[float, dict[str, torch.Tensor]] = (float("inf"), copy.deepcopy(editor.state_dict()))
    history = []
    step_times: list[float] = []
    train_start = time.perf_counter()
    for epoch in range(args.epochs):
        order = list(range(len(examples)))
        random.Random(args.seed + epoch).shuffle(order)
        batches = [order[i : i + args.batch_size] for i in range(0, len(order), args.batch_size)]
        for idx in tqdm(batches, desc=f"layer {layer} epoch {epoch}"):
            t0 = time.perf_counter()
            terms = remedi_loss(lm, layer, editor, [examples[i] for i in idx], attr[idx], weights)
            optimizer.zero_grad()
            terms["loss"].backward()
            optimizer.step()
            step_times.append(time.perf_counter() - t0)
        with torch.no_grad():
            losses = []
            for i in range(0, len(val_examples), args.batch_size):
                chunk = val_examples[i : i + args.batch_size]
                loss = remedi_loss(lm, layer, editor, chunk, val_attr[i : i + len(chunk)], weights)
                losses.append(float(loss["loss"]) * len(chunk))
        val_loss = sum(losses) / len(val_examples)
        history.append({"epoch": epoch, "val_loss": val_loss})
        if val_loss < best[0]:
            best = (val_loss, copy.deepcopy(editor.state_dict()))
    train_s = time.perf_counter() - train_start
    editor.load_state_dict(best[1])
    entities, contexts = _contexts(test)
    test_attr = attribute_states(lm, layer, contexts, entities)
    edit = metrics_context(lm, layer, editor, test_attr)
    with torch.no_grad():
        summary, _ = evaluate_cases(
            lm.model, lm.tokenizer, test, edit=edit, batch_size=32, scoring=args.scoring
        )
    return {
        "layer": layer,
        "metrics": summary,
        "history": history,
        "precompute_s": precompute_s,
        "train_s": train_s,
        "median_step_s": statistics.median(step_times),
        "n_train_examples": len(examples),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
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
    args = parser.parse_args(argv)
    release_freed_memory()
    torch.set_num_threads(args.threads)
    data = CounterFactDataModule(
        path=args.data,
        test_path=args.test,
        n_train=args.n_train,
        n_val=args.n_val,
        n_test=args.n_test,
        split="ordered",
    )
    data.setup("fit")
    test = data.test_cases
    lm = load_model(args.model)
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
        result["layers"].append(run_layer(lm, layer, data.train_cases, data.val_cases, test, args))
        result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        write_json(args.output, result)
        print(json.dumps(result["layers"][-1]["metrics"]), flush=True)
    return result


if __name__ == "__main__":
    main()
