"""Knowledge neurons on built-in facts: identification statistics, suppress / amplify effects on
the fact and on unrelated facts, and value-slot updates (see kn_activation.py for the
activation study and corpus ranking of the neurons found here).

    python benchmarks/kn_suppress.py /tmp/kn_suppress --facts 20 --threads 1

Writes ``summary.json``, ``facts.jsonl`` and figures (``kn_layers.png``, ``kn_interventions.png``)
into the directory.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from remedi.atomic import write_json
from remedi.data import EditCase, load_builtin
from remedi.methods import figures
from remedi.methods import knowledge_neurons as kn
from remedi.models import load_model
from remedi.tokens import encode_continuations, next_token_logits


def pick_facts(lm, cases: list[EditCase], n: int) -> list[EditCase]:
    """Up to ``n`` facts, round-robin over relations, whose answer is the top-1 first token on
    at least three of their prompts."""
    by_relation: dict[str, list[EditCase]] = {}
    for case in cases:
        by_relation.setdefault(case.relation_id, []).append(case)
    chosen: list[EditCase] = []
    queues = {r: iter(c) for r, c in sorted(by_relation.items())}
    while len(chosen) < n and queues:
        for relation in list(queues):
            case = next(queues[relation], None)
            if case is None:
                del queues[relation]
                continue
            prompts = kn.case_prompts(case)
            batch = encode_continuations(lm.tokenizer, prompts, [case.target_true] * len(prompts))
            with torch.no_grad():
                logits = next_token_logits(
                    lm.model, batch.input_ids, batch.attention_mask, batch.last_prompt_index
                )
            hits = int((logits.argmax(-1) == batch.target_ids[:, 0]).sum())
            if hits >= 3:
                chosen.append(case)
            if len(chosen) == n:
                break
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output", nargs="?", default="/tmp/kn_suppress", type=Path)
    parser.add_argument("--facts", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model()
    facts = pick_facts(lm, load_builtin(), args.facts)
    args.output.mkdir(parents=True, exist_ok=True)

    found: dict[object, list[kn.Neuron]] = {}
    records: list[dict[str, object]] = []
    seconds: list[float] = []
    for case in tqdm(facts, desc="facts"):
        start = time.perf_counter()
        result = kn.identify(lm, kn.case_prompts(case), case.target_true)
        seconds.append(time.perf_counter() - start)
        found[case.case_id] = result.neurons
        records.append(study_fact(lm, case, result, facts))
        with open(args.output / "facts.jsonl", "a" if len(records) > 1 else "w") as out:
            out.write(json.dumps(records[-1]) + "\n")
        summarize(lm, args, facts, found, records, seconds)


def study_fact(
    lm, case: EditCase, result: kn.KnowledgeNeurons, facts: list[EditCase]
) -> dict[str, object]:
    """Suppress / amplify effects and the value-slot update of one fact."""
    prompts = kn.case_prompts(case)
    others = [c for c in facts if c.relation_id != case.relation_id]
    o_prompts = [c.rewrite_prompt for c in others]
    o_targets = [c.target_true for c in others]
    record: dict[str, object] = {
        "case_id": case.case_id,
        "relation": case.relation_id,
        "target": case.target_true,
    } | result.to_json()
    for name, factor in (("suppress", 0.0), ("amplify", 2.0)):
        fact = kn.relative_change(
            lm, result.neurons, prompts, [case.target_true] * len(prompts), factor
        )
        unrelated = kn.relative_change(lm, result.neurons, o_prompts, o_targets, factor)
        record[name] = {"fact": fact, "unrelated": unrelated}
    assert case.target_new is not None
    before_new = kn.answer_probs(lm, prompts, [case.target_new] * len(prompts))
    with kn.update_fact(lm, result.neurons, case.target_true, case.target_new):
        new = kn.answer_probs(lm, prompts, [case.target_new] * len(prompts))
        true = kn.answer_probs(lm, prompts, [case.target_true] * len(prompts))
        o_after = kn.answer_probs(lm, o_prompts, o_targets)
    o_before = kn.answer_probs(lm, o_prompts, o_targets)
    record["update"] = {
        "success": float((new > true).float().mean()),
        "p_new_before": before_new.tolist(),
        "p_new_after": new.tolist(),
        "unrelated_relative_change": float(((o_after - o_before) / o_before).mean()),
    }
    return record


def summarize(lm, args, facts, found, records, seconds) -> None:
    """Write ``summary.json`` and the figures for the facts done so far."""
    n = len(records)

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    stats = kn.statistics(found, {c.case_id: c.relation_id for c in facts})
    interventions = {
        name: {part: mean([r[name][part] for r in records]) for part in ("fact", "unrelated")}
        for name in ("suppress", "amplify")
    }
    summary = {
        "model": lm.spec,
        "threads": args.threads,
        "facts": n,
        "load_average_1_5_15min": os.getloadavg(),
        "seconds_identify_per_fact": mean(seconds),
        "interventions_mean_relative_change": interventions,
        "update_success_mean": mean([r["update"]["success"] for r in records]),
        "update_unrelated_relative_change_mean": mean(
            [r["update"]["unrelated_relative_change"] for r in records]
        ),
        "statistics": stats,
    }
    figures.save_figure(
        figures.layer_histogram(stats["layer_histogram"], lm.arch.num_layers),
        args.output / "kn_layers.png",
    )
    figures.save_figure(
        figures.intervention_bars(interventions), args.output / "kn_interventions.png"
    )
    write_json(args.output / "summary.json", summary)


if __name__ == "__main__":
    main()
