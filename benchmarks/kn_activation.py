"""Activation study of the knowledge neurons found by kn_suppress.py: how strongly a fact's
neurons fire on sentences holding its subject and object, its subject only, or neither; and
which corpus sentences activate them most.

    python benchmarks/kn_activation.py /tmp/kn_suppress --threads 1

Reads ``facts.jsonl`` from the directory and writes ``activation.json`` there.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from remedi.atomic import write_json
from remedi.data import load_builtin
from remedi.methods import knowledge_neurons as kn
from remedi.models import load_model

CORPUS = "/work/shared/data/text_corpus/wikipedia_articles_sample.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output", nargs="?", default="/tmp/kn_suppress", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sentences", type=int, default=300)
    parser.add_argument("--ranked-facts", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model()
    cases = {c.case_id: c for c in load_builtin()}
    with open(args.output / "facts.jsonl") as handle:
        records = [json.loads(line) for line in handle]
    facts = [cases[r["case_id"]] for r in records]
    neurons = [[kn.Neuron(*n) for n in r["neurons"]] for r in records]

    per_fact = []
    for case, found in tqdm(list(zip(facts, neurons, strict=True)), desc="facts"):
        others = [c for c in facts if c.relation_id != case.relation_id][:5]
        texts = {
            "subject_and_object": [f"{p} {case.target_true}." for p in kn.case_prompts(case)],
            "subject_only": kn.case_prompts(case),
            "neither": [f"{c.rewrite_prompt} {c.target_true}." for c in others],
        }
        scores = {k: float(kn.activation_scores(lm, found, v).mean()) for k, v in texts.items()}
        per_fact.append({"case_id": case.case_id} | scores)

    with open(CORPUS) as handle:
        text = " ".join(line.strip() for line in handle)
    sentences = [s.strip() + "." for s in text.split(". ") if 30 < len(s) < 300]
    sentences = sentences[:: max(1, len(sentences) // args.sentences)][: args.sentences]
    ranking = [
        {
            "fact": f"{case.rewrite_prompt} {case.target_true}",
            "top": kn.rank_texts(lm, found, sentences, top=5),
        }
        for case, found in list(zip(facts, neurons, strict=True))[: args.ranked_facts]
    ]
    kinds = ("subject_and_object", "subject_only", "neither")
    summary = {
        "facts": len(per_fact),
        "activation_mean": {k: sum(r[k] for r in per_fact) / len(per_fact) for k in kinds},
        "per_fact": per_fact,
        "corpus_sentences": len(sentences),
        "corpus_ranking": ranking,
    }
    write_json(args.output / "activation.json", summary)
    print(json.dumps(summary["activation_mean"], indent=1))


if __name__ == "__main__":
    main()
