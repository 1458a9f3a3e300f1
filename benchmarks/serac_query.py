"""SERAC's cost per query: scoring prompts with a memory of N edits against the unedited LM.

Both sides score the same rows with the product's scorer (:func:`remedi.metrics.row_probabilities`):
once on the LM alone, once routed by a trained SERAC editor against a memory of the first
``--memory`` cases (:meth:`remedi.methods.serac_editor.Serac.stream_edit`). Queries are the
cases' neighbourhood prompts (out of every edit's scope: the LM answers, after the classifier
has looked) and their paraphrase prompts (in scope: the counterfactual model answers). Median of
``--repeats`` timings of each, in one process; prints and writes JSON.

    python benchmarks/serac_query.py --checkpoint checkpoints/pretrained/serac-gemma3-270m \\
        --data runs/edit-heldout.json --memory 1000 --queries 64 --output runs/serac_query.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import remedi
from remedi.metrics import ScoredRow, row_probabilities


def timed(run: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``run`` over ``repeats`` calls (after one warm-up call)."""
    run()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--memory", type=int, default=1000, help="edits in the memory")
    p.add_argument("--queries", type=int, default=64, help="queries of each kind")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", type=Path, required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    lm = remedi.load_model()
    cases = remedi.load_cases(args.data)[: args.memory]
    serac = remedi.editor("serac", checkpoint=args.checkpoint)
    serac.begin_stream(lm)
    start = time.perf_counter()
    serac.remember(lm, cases)
    remember_seconds = time.perf_counter() - start
    routed = serac.stream_edit(lm)
    kinds = {
        "out_of_scope": [
            ScoredRow(i, "neighborhood", c.neighborhood_prompts[0], None, c.target_true)
            for i, c in enumerate(cases[: args.queries])
            if c.neighborhood_prompts
        ],
        "in_scope": [
            ScoredRow(i, "paraphrase", c.paraphrase_prompts[0], None, str(c.target_new))
            for i, c in enumerate(cases[: args.queries])
            if c.paraphrase_prompts
        ],
    }
    report: dict[str, object] = {
        "checkpoint": args.checkpoint,
        "data": args.data,
        "memory": len(cases),
        "remember_seconds": remember_seconds,
        "threads": args.threads,
        "repeats": args.repeats,
    }
    for kind, rows in kinds.items():
        plain = timed(
            lambda r=rows: row_probabilities(lm.model, lm.tokenizer, r, None, args.batch_size),
            args.repeats,
        )
        memory = timed(
            lambda r=rows: row_probabilities(lm.model, lm.tokenizer, r, routed, args.batch_size),
            args.repeats,
        )
        report[kind] = {
            "queries": len(rows),
            "seconds_per_query_lm": plain / len(rows),
            "seconds_per_query_memory": memory / len(rows),
            "ratio": memory / plain,
        }
        print(kind, json.dumps(report[kind]), flush=True)
    serac.end_stream(lm)
    args.output.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
