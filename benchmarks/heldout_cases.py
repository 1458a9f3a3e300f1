"""Write the CounterFact records of one file whose case ids a training file's first cases do not
use, so that a learned editor is never scored on a fact it was trained or validated on.

    data=../shared/data/counterfact
    python benchmarks/heldout_cases.py $data/counterfact_500_rome_format.json \\
        $data/counterfact-train.mend_format.json 1200 runs/heldout.json

The training file's cases are taken as ``remedi.train`` takes them with ``split: ordered``:
sorted by case id, the first N (train + validation).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from remedi.atomic import write_text
from remedi.data import load_cases


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("source", type=Path, help="CounterFact records to keep from")
    p.add_argument("training", type=Path, help="the training data file")
    p.add_argument("n", type=int, help="cases of the training file used (train + validation)")
    p.add_argument("output", type=Path)
    args = p.parse_args()
    used = sorted(int(c.case_id) for c in load_cases(args.training))[: args.n]
    records = json.loads(args.source.read_text())
    kept = [r for r in records if int(r["case_id"]) not in set(used)]
    write_text(args.output, json.dumps(kept) + "\n")
    print(
        f"kept {len(kept)} of {len(records)} records ({len(records) - len(kept)} used in training)"
    )


if __name__ == "__main__":
    main()
