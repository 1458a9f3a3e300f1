"""Sweep ROME's layer, statistics size and objective on known CounterFact cases.

python benchmarks/rome_sweep.py OUT_DIR --cases 30 --config layer=6 --config layer=8,clamp=2
Each ``--config`` is comma-separated ``name=value`` pairs over RomeHyperParams fields plus
``stats_tokens``; results (summary per config, seconds per edit) go to OUT_DIR/rome_sweep.json,
rewritten after every config.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from remedi.atomic import write_json
from remedi.data import load_cases
from remedi.evaluate import known_cases
from remedi.methods import rome, second_moment
from remedi.metrics import evaluate_cases, summarize
from remedi.models import load_model

DATA = "/work/shared/data/counterfact/counterfact_500_rome_format.json"
CORPUS = "/work/shared/data/text_corpus"


def parse_config(text: str) -> dict[str, float]:
    pairs = [item.split("=") for item in text.split(",") if item]
    return {key: float(value) for key, value in pairs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output", type=Path)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--corpus", default=CORPUS)
    parser.add_argument("--cases", type=int, default=30)
    parser.add_argument("--skip", type=int, default=0, help="skip the first N known cases")
    parser.add_argument("--pool", type=int, default=100, help="look for known cases in the first N")
    parser.add_argument("--config", action="append", required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.output.mkdir(parents=True, exist_ok=True)
    lm = load_model(args.model)
    cases = load_cases(args.data)[: args.pool]
    cases = [cases[i] for i in known_cases(lm, cases)][args.skip : args.skip + args.cases]
    results = []
    for text in args.config:
        config = parse_config(text)
        tokens = int(config.pop("stats_tokens", 100_000))
        fields = {
            k: (int(v) if k in ("layer", "n_context", "steps") else v) for k, v in config.items()
        }
        hp = rome.RomeHyperParams(**fields)  # type: ignore[arg-type]
        layer = hp.layer if hp.layer is not None else rome.default_layer(lm)
        stats = None
        if tokens > 0:
            stats = second_moment.collect(lm, [layer], args.corpus, n_tokens=tokens)[layer]
        per_case, seconds, steps, norms = [], [], [], []
        for case in cases:
            start = time.perf_counter()
            with rome.apply_edit(lm, case, layer=layer, stats=stats, hparams=hp) as handle:
                seconds.append(time.perf_counter() - start)
                per_case += evaluate_cases(lm.model, lm.tokenizer, [case])[1]
            steps.append(handle.info["steps"])
            norms.append(handle.info["delta_norm"] / handle.info["init_norm"])
        results.append(
            {
                "config": text,
                "stats_tokens": tokens,
                "n_cases": len(cases),
                **summarize(per_case),
                "median_seconds_per_edit": statistics.median(seconds),
                "mean_steps": statistics.fmean(steps),
                "mean_delta_over_v0": statistics.fmean(norms),
            }
        )
        print(json.dumps(results[-1]), flush=True)
        write_json(
            args.output / "rome_sweep.json",
            {"model": args.model, "threads": args.threads, "results": results},
        )


if __name__ == "__main__":
    main()
