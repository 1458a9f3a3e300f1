"""Time the second-moment collection and its inverse on a model: tokens used, tokens per second,
seconds for C⁻¹, and the cache files.

python benchmarks/rome_second_moment.py OUT_DIR --layers 4 6 8 --tokens 20000 100000
python benchmarks/rome_second_moment.py OUT_DIR --corpus python-docs --layers 1 --cache /tmp/cold

``--cache`` points ``REMEDI_CACHE`` at another folder for the statistics (a cold run); the model
itself is still read from the usual cache.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from remedi.atomic import write_json
from remedi.methods import second_moment
from remedi.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output", type=Path)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--corpus", default="/work/shared/data/text_corpus")
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 6, 8])
    parser.add_argument("--tokens", type=int, nargs="+", default=[100_000])
    parser.add_argument("--batch-chunks", type=int, default=second_moment.DEFAULT_BATCH_CHUNKS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, help="REMEDI_CACHE for the statistics only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    if args.cache is not None:
        os.environ["REMEDI_CACHE"] = str(args.cache)
    results = []
    for n_tokens in args.tokens:
        start = time.perf_counter()
        stats = second_moment.collect(
            lm, args.layers, args.corpus, n_tokens=n_tokens, batch_chunks=args.batch_chunks
        )
        wall = time.perf_counter() - start
        first = stats[args.layers[0]]
        start = time.perf_counter()
        for layer_stats in stats.values():
            layer_stats.inverse(lm.device)
        inverse_s = time.perf_counter() - start
        results.append(
            {
                "n_tokens": first.n_tokens,
                "layers": args.layers,
                "seconds": first.seconds,
                "wall_s": wall,
                "tokens_per_s": first.n_tokens / wall,
                "inverse_s": inverse_s,
                "from_cache": first.from_cache,
                "cache_files": [str(s.path) for s in stats.values()],
            }
        )
        print(json.dumps(results[-1]))
    out = {
        "model": args.model,
        "corpus": args.corpus,
        "threads": args.threads,
        "device": str(lm.device),
        "dtype": args.dtype,
        "batch_chunks": args.batch_chunks,
        "runs": results,
    }
    write_json(args.output / "second_moment.json", out)


if __name__ == "__main__":
    main()
