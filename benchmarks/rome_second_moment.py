"""Time the second-moment collection on a model: tokens used, seconds, and the cache files.

python benchmarks/rome_second_moment.py OUT_DIR --layers 4 6 8 --tokens 20000 100000
"""

from __future__ import annotations

import argparse
import json
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
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    results = []
    for n_tokens in args.tokens:
        stats = second_moment.collect(lm, args.layers, args.corpus, n_tokens=n_tokens)
        first = stats[args.layers[0]]
        results.append(
            {
                "n_tokens": first.n_tokens,
                "layers": args.layers,
                "seconds": first.seconds,
                "from_cache": first.from_cache,
                "cache_files": [
                    str(second_moment.cache_path(lm, layer, args.corpus, n_tokens))
                    for layer in args.layers
                ],
            }
        )
        print(json.dumps(results[-1]))
    out = {"model": args.model, "corpus": args.corpus, "threads": args.threads, "runs": results}
    write_json(args.output / "second_moment.json", out)


if __name__ == "__main__":
    main()
