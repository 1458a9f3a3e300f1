"""Where causal-trace peaks sit on known facts the model predicts correctly, and how long a full
trace takes.

    python benchmarks/trace_known_facts.py /tmp/trace_known --facts 20 --threads 1

Writes ``summary.json`` (peak positions and layers per kind, mean indirect effect per token
category, seconds per full trace) and ``facts.jsonl`` (one trace per fact) into the directory.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from pathlib import Path

import torch

from remedi.atomic import write_json
from remedi.data import load_cases
from remedi.methods import causal_trace
from remedi.methods.causal_trace import TraceResult
from remedi.models import load_model
from remedi.tokens import top_token

CATEGORIES = ("first subject", "middle subject", "last subject", "first after", "later", "last")
DATA = "/work/shared/data/known_1000/known_1000.json"


def category(result: TraceResult, token: int) -> str:
    """ROME's token categories for averaging traces across prompts."""
    start, end = result.subject_range
    last = len(result.tokens) - 1
    if token == last:
        return "last"
    if token == end - 1:
        return "last subject"
    if token == start:
        return "first subject"
    if start < token < end:
        return "middle subject"
    if token == end:
        return "first after"
    return "later" if token > end else "before"


def predicts(lm, prompt: str, answer: str) -> bool:
    text = top_token(lm.model, lm.tokenizer, prompt)
    return bool(text.strip()) and (" " + answer).startswith(text)


def summarize(lm, args, std: float, results: list[TraceResult], seconds: list[float]) -> None:
    """Write ``summary.json`` for the facts traced so far."""
    summary: dict[str, object] = {
        "model": lm.spec,
        "threads": args.threads,
        "facts": len(results),
        "noise_std": std,
        "seconds_per_trace_mean": sum(seconds) / len(seconds),
        "seconds_per_trace": seconds,
        "load_average_1_5_15min": os.getloadavg(),
        "tokens_per_prompt_mean": sum(len(r.tokens) for r in results) / len(results),
        "clean_prob_mean": sum(r.clean_prob for r in results) / len(results),
        "corrupted_prob_mean": sum(r.corrupted_prob for r in results) / len(results),
    }
    for kind in causal_trace.KINDS:
        peaks = [r.peak(kind) for r in results]
        cats = Counter(category(r, t) for r, (t, _) in zip(results, peaks, strict=True))
        effect: dict[str, float] = {}
        for name in CATEGORIES:
            rows = [
                r.indirect_effect(kind)[t].max().item()
                for r in results
                for t in range(len(r.tokens))
                if category(r, t) == name
            ]
            effect[name] = sum(rows) / len(rows) if rows else float("nan")
        summary[kind] = {
            "peak_token_category": dict(cats),
            "peak_at_last_subject": cats["last subject"] / len(results),
            "peak_at_last_token": cats["last"] / len(results),
            "peak_layers": sorted(layer for _, layer in peaks),
            "mean_max_indirect_effect_by_category": effect,
        }
    write_json(args.output / "summary.json", summary)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output", nargs="?", default="/tmp/trace_known", type=Path)
    parser.add_argument("--facts", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", default=DATA)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model()
    cases = load_cases(args.data)
    std = 3 * causal_trace.embedding_std(lm, [c.subject for c in cases])
    chosen = []
    for case in cases:
        if predicts(lm, case.rewrite_prompt, case.target_true):
            chosen.append(case)
        if len(chosen) == args.facts:
            break
    args.output.mkdir(parents=True, exist_ok=True)
    results, seconds = [], []
    for i, case in enumerate(chosen):
        start = time.perf_counter()
        result = causal_trace.trace(lm, case.rewrite_prompt, case.subject, noise_std=std)
        seconds.append(time.perf_counter() - start)
        results.append(result)
        print(
            f"{i + 1}/{len(chosen)} {case.rewrite_prompt!r} -> {result.target!r} "
            f"{seconds[-1]:.1f} s",
            flush=True,
        )
        with open(args.output / "facts.jsonl", "a" if i else "w") as handle:
            row = result.to_json() | {"case_id": case.case_id, "seconds": seconds[-1]}
            handle.write(json.dumps(row) + "\n")
        summarize(lm, args, std, results, seconds)


if __name__ == "__main__":
    main()
