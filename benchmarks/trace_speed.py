"""Seconds per full causal trace (hidden, mlp, attn) of one 8-token prompt, against a
reference-style loop (one forward of 1 clean + ``samples`` corrupted rows with full logits per
(kind, layer, token), as in ROME's ``trace_with_patch``) timed on a subset and extrapolated.

    python benchmarks/trace_speed.py /tmp/trace_speed --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from remedi.atomic import write_json
from remedi.hooks import EMBEDDINGS, Site, intervene
from remedi.methods import causal_trace as ct
from remedi.models import load_model

PROMPT, SUBJECT = "Toyota is headquartered in the country of", "Toyota"


def copy_clean_row(token: int):
    """ROME-style patch: rows 1.. take row 0's (clean) state at ``token``."""

    def fn(state: torch.Tensor) -> torch.Tensor:
        state = state.clone()
        state[1:, token] = state[0, token]
        return state

    return fn


def reference_seconds(lm, result: ct.TraceResult, n: int) -> float:
    """Mean seconds of one reference-style restoration (no batching across restorations)."""
    ids = lm.tokenizer([PROMPT], return_tensors="pt")["input_ids"]
    span = ct.TokenSpan(*result.subject_range)
    noise = ct.make_noise(result.samples, span, lm.arch.hidden_size, result.noise_std)
    noise = torch.cat([torch.zeros_like(noise[:1]), noise])  # row 0 stays clean
    layers = lm.arch.num_layers
    jobs = [("mlp", layer, span.end - 1) for layer in range(0, layers, max(1, layers // n))][:n]
    start = time.perf_counter()
    with torch.no_grad():
        for kind, layer, token in jobs:
            sites = [Site("mlp", x) for x in ct.window_layers(kind, layer, layers, result.window)]
            edits = {s: copy_clean_row(token) for s in sites}
            edits[EMBEDDINGS] = ct.corrupt_subject(span, noise)
            with intervene(lm.arch, edit=edits):
                logits = lm.model(input_ids=ids.expand(len(noise), -1)).logits
            torch.softmax(logits[1:, -1], -1)[:, result.target_id].mean()
    return (time.perf_counter() - start) / len(jobs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output", nargs="?", default="/tmp/trace_speed", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--reference-restorations", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        result = ct.trace(lm, PROMPT, SUBJECT)
        times.append(time.perf_counter() - start)
    n_restorations = len(result.tokens) * lm.arch.num_layers * 3
    per = reference_seconds(lm, result, args.reference_restorations)
    summary = {
        "model": lm.spec,
        "threads": args.threads,
        "prompt": PROMPT,
        "tokens": len(result.tokens),
        "seconds_per_full_trace": times,
        "reference_seconds_per_restoration": per,
        "reference_seconds_per_full_trace_extrapolated": per * n_restorations,
        "speedup": per * n_restorations / min(times),
        "load_average_1_5_15min": os.getloadavg(),
        "target": result.target,
        "clean_prob": result.clean_prob,
        "corrupted_prob": result.corrupted_prob,
    }
    args.output.mkdir(parents=True, exist_ok=True)
    write_json(args.output / "summary.json", summary)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
