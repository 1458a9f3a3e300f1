"""Keep the famous-neighbour candidate cases the unedited model knows, and split them into two
sets that share no subject.

    OMP_NUM_THREADS=1 python benchmarks/famous_neighbours.py benchmarks/famous_candidates.json \\
        --output runs/famous/kept.json --report runs/famous/report.md \\
        --split remedi/data/builtin/famous_tune.json remedi/data/builtin/famous_test.json

Candidates (``benchmarks/famous_candidates.json``: 157, written by hand) are CounterFact records
whose neighbourhood prompts state the same relation about other famous subjects with the same
true object. Each is scored by the product's own metric
code (:func:`remedi.metrics.case_rows` and :func:`remedi.metrics.row_probabilities`, ``mean``
scoring, as ``remedi.evaluate --method none`` scores them): a case is kept when the unedited
model gives P(target_true) > P(target_new) after its rewrite prompt; each neighbourhood prompt
is kept when P(target_true) > P(target_new) after it; a case left with fewer than
``--min-neighbours`` neighbours is dropped.

``--split`` writes the kept cases to two files whose subjects (edited, neighbour and attribute
subjects; a neighbour's subject is its prompt with the case template's text around ``{}``
removed) are disjoint: cases that share a subject are grouped, and each group goes to the file
that holds fewer cases of its relation so far (the larger groups first), so that relations are
balanced. The report states the counts per relation and split and the cases dropped.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from remedi.atomic import write_text
from remedi.data import EditCase, load_builtin, parse_records
from remedi.metrics import case_rows, row_probabilities


def subject_key(text: str) -> str:
    """A subject as compared across cases: lower case, without a leading article."""
    text = text.strip().lower()
    return text[4:] if text.startswith("the ") else text


def prompt_subject(template: str, prompt: str) -> str:
    """The subject of ``prompt`` written with ``template``'s wording around ``{}`` (the
    template's words before ``{}`` may be missing: "{} is in" vs "The {} is in"); the whole
    prompt when it does not end like the template."""
    before, _, after = template.partition("{}")
    if not prompt.endswith(after):
        return prompt
    head = prompt[: len(prompt) - len(after)]
    for prefix in (before, before.removesuffix("The ").removesuffix("the ")):
        if prefix and head.startswith(prefix):
            return head[len(prefix) :]
    return head


def case_subjects(case: EditCase) -> set[str]:
    prompts = [*case.neighborhood_prompts, *case.attribute_prompts]
    return {subject_key(case.subject)} | {
        subject_key(prompt_subject(case.prompt, p)) for p in prompts
    }


def score(
    cases: Sequence[EditCase], model: str, batch_size: int
) -> list[tuple[bool, list[bool], list[tuple[float, float]]]]:
    """Per case: rewrite known, each neighbour known, and (P(new), P(true)) of each neighbour."""
    from remedi.models import load_model

    lm = load_model(model)
    rows = [row for i, case in enumerate(cases) for row in case_rows(case, i)]
    probs = row_probabilities(lm.model, lm.tokenizer, rows, batch_size=batch_size)
    pairs: dict[int, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for i in range(0, len(rows), 2):
        pair = (float(probs[i]), float(probs[i + 1]))
        pairs[rows[i].case_index][rows[i].kind].append(pair)
    out = []
    for i in range(len(cases)):
        rewrite_new, rewrite_true = pairs[i]["rewrite"][0]
        neighbours = pairs[i]["neighborhood"]
        out.append((rewrite_true > rewrite_new, [t > n for n, t in neighbours], neighbours))
    return out


def repeats_a_training_fact(case: EditCase) -> bool:
    """Whether ``case`` asks about a subject and prompt of the built-in train or validation
    facts: editors are trained and selected on those, so a reported split leaves it out."""
    seen = {(c.subject, c.prompt) for c in load_builtin("train") + load_builtin("validation")}
    return (case.subject, case.prompt) in seen


def split_groups(cases: Sequence[EditCase]) -> tuple[list[int], list[int]]:
    """Indices of the two splits: cases that share a subject stay together, relations balanced."""
    parent = list(range(len(cases)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, case in enumerate(cases):
        for key in case_subjects(case):
            if key in owner:
                parent[find(i)] = find(owner[key])
            else:
                owner[key] = i
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(len(cases)):
        groups[find(i)].append(i)
    splits: tuple[list[int], list[int]] = ([], [])
    per_relation: tuple[Counter[str], Counter[str]] = (Counter(), Counter())
    for members in sorted(groups.values(), key=lambda m: (-len(m), m[0])):
        relations = Counter(cases[i].relation_id for i in members)
        relation = relations.most_common(1)[0][0]
        side = min((0, 1), key=lambda s: (per_relation[s][relation], len(splits[s]), s))
        splits[side].extend(members)
        per_relation[side].update(relations)
    return sorted(splits[0]), sorted(splits[1])


def relation_table(named: Sequence[tuple[str, Sequence[EditCase]]]) -> list[str]:
    relations = sorted({c.relation_id for _, cases in named for c in cases})
    lines = ["| relation | " + " | ".join(n for n, _ in named) + " |"]
    lines.append("|---" * (len(named) + 1) + "|")
    for rel in relations:
        counts = [str(sum(c.relation_id == rel for c in cases)) for _, cases in named]
        lines.append(f"| {rel} | " + " | ".join(counts) + " |")
    lines.append("| all | " + " | ".join(str(len(cases)) for _, cases in named) + " |")
    return lines


def dump(records: Sequence[dict[str, Any]]) -> str:
    return json.dumps(list(records), indent=1, ensure_ascii=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("candidates", type=Path, help="candidate CounterFact records (a JSON list)")
    p.add_argument("--output", type=Path, required=True, help="the kept records (JSON)")
    p.add_argument("--report", type=Path, required=True, help="a short Markdown report")
    p.add_argument(
        "--split", nargs=2, type=Path, metavar=("FIRST", "SECOND"), help="write two splits"
    )
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--min-neighbours", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch threads (OMP_NUM_THREADS=1)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    records = json.loads(args.candidates.read_text(encoding="utf-8"))
    cases = parse_records(records, source=str(args.candidates))[0]
    scored = score(cases, args.model, args.batch_size)
    kept: list[dict[str, Any]] = []
    unknown: list[str] = []
    few: list[str] = []
    n_neighbours = kept_neighbours = 0
    for record, case, (known, neighbours_known, _) in zip(records, cases, scored, strict=True):
        n_neighbours += len(neighbours_known)
        if not known:
            unknown.append(f"{case.case_id} ({case.subject})")
            continue
        pairs = zip(case.neighborhood_prompts, neighbours_known, strict=True)
        prompts = [p for p, ok in pairs if ok]
        if len(prompts) < args.min_neighbours:
            few.append(f"{case.case_id} ({case.subject}: {len(prompts)})")
            continue
        kept_neighbours += len(prompts)
        kept.append({**record, "neighborhood_prompts": prompts})
    write_text(args.output, dump(kept))
    kept_cases = parse_records(kept, source=str(args.output))[0] if kept else []
    lines = [
        f"# Famous-neighbour cases kept by {args.model} (unedited)",
        "",
        f"{len(kept)} of {len(records)} candidate cases kept; {len(unknown)} dropped as not "
        f"known (P(true) <= P(new) on the rewrite prompt), {len(few)} with fewer than "
        f"{args.min_neighbours} known neighbours. Neighbourhood prompts: {n_neighbours} in the "
        f"candidates, {kept_neighbours} kept in the kept cases.",
        "",
    ]
    named: list[tuple[str, Sequence[EditCase]]] = [
        ("candidates", cases),
        ("kept", kept_cases),
    ]
    if args.split:
        first, second = split_groups(kept_cases)
        repeated = [i for i in second if repeats_a_training_fact(kept_cases[i])]
        second = [i for i in second if i not in repeated]
        reported = {c.subject for c in load_builtin("test")}
        reported |= {kept_cases[i].subject for i in second}
        overlapping = [i for i in first if kept_cases[i].subject in reported]
        first = [i for i in first if i not in overlapping]
        lines += [
            f"Dropped from the second split, as facts of the built-in train or validation split "
            f"(same subject and prompt): {len(repeated)}. Dropped from the first (tuning) split, "
            f"as subjects of a reported split (the built-in test split): {len(overlapping)}.",
            "",
        ]
        for path, indices in zip(args.split, (first, second), strict=True):
            write_text(path, dump([kept[i] for i in indices]))
            named.append((path.stem, [kept_cases[i] for i in indices]))
        shared = set.union(set(), *(case_subjects(kept_cases[i]) for i in first)) & set.union(
            set(), *(case_subjects(kept_cases[i]) for i in second)
        )
        lines += [f"Splits: {len(first)} and {len(second)} cases; shared subjects: {len(shared)}."]
        lines.append("")
    lines += relation_table(named)
    lines += ["", f"Not known: {', '.join(unknown) or 'none'}.", ""]
    lines += [f"Too few known neighbours: {', '.join(few) or 'none'}."]
    write_text(args.report, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
