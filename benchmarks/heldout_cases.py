"""Write the CounterFact records of one file that share no case id and no subject with the
cases a learned editor was trained, validated or tuned on, so that it is never scored on a fact
(or a subject) it has seen.

    data=../shared/data/counterfact
    python benchmarks/heldout_cases.py $data/counterfact_500_rome_format.json runs/heldout.json \\
        --used $data/counterfact-train.mend_format.json:10000 \\
        --used $data/counterfact-val.mend_format.json:1000

Each ``--used FILE:N`` names the first N cases of FILE by case id (``remedi.train`` takes them
so with ``split: ordered``; ``FILE`` alone: all of them).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from remedi.atomic import write_text
from remedi.data import load_cases


def used_cases(spec: str) -> tuple[set[int], set[str]]:
    """Case ids and subjects of ``FILE[:N]``."""
    path, _, count = spec.partition(":")
    cases = sorted(load_cases(path), key=lambda c: int(c.case_id))
    if count:
        cases = cases[: int(count)]
    return {int(c.case_id) for c in cases}, {c.subject for c in cases}


def subject(record: dict) -> str:
    """The edited subject of a ROME-layout or MEND-layout record."""
    rewrite = record.get("requested_rewrite")
    return str(rewrite["subject"] if rewrite else record["subject"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("source", type=Path, help="CounterFact records to keep from")
    p.add_argument("output", type=Path)
    p.add_argument(
        "--used",
        action="append",
        default=[],
        metavar="FILE[:N]",
        help="cases trained, validated or tuned on: the first N of FILE by case id",
    )
    args = p.parse_args()
    ids: set[int] = set()
    subjects: set[str] = set()
    for spec in args.used:
        more_ids, more_subjects = used_cases(spec)
        ids |= more_ids
        subjects |= more_subjects
    records = json.loads(args.source.read_text())
    kept = [r for r in records if int(r["case_id"]) not in ids and subject(r) not in subjects]
    write_text(args.output, json.dumps(kept) + "\n")
    print(f"kept {len(kept)} of {len(records)} records (the others share a case or a subject)")


if __name__ == "__main__":
    main()
