"""Choose SERAC's classifier layer (and its head's learning rate) on a tuning split.

The LM is frozen, so each text's features at every candidate block come from one forward pass
and are cached; the head (:class:`remedi.editors.serac.ScopeClassifier`) then trains on them
with the product's own loss (:func:`remedi.editors.serac.scope_loss`), batches of training
cases as the memory, as :class:`lightning_modules.serac_module.SeracModule` trains it. On the
tuning cases it reports, for routing against each case's own edit (the independent schedule):
the share of rewrite and paraphrase prompts routed in (recall) and of neighbourhood prompts,
plain and after the statement (CounterFact+), routed in (false positives); and, against a
memory of every tuning case at once, the share of paraphrases routed to their own edit and of
neighbourhood prompts routed to any edit.

    python benchmarks/serac_scope.py --train DATA/counterfact-train.mend_format.json:400 \\
        --tune runs/mend-tune.json:120 --layers 3 5 8 11 --output runs/serac-scope.json
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from remedi.data import EditCase, load_cases
from remedi.data.neighbourhoods import pool_neighbourhoods
from remedi.editors.serac import (
    ScopeClassifier,
    TokenStates,
    key_states,
    query_mask,
    scope_loss,
    scope_queries,
)
from remedi.hooks import Site, intervene
from remedi.models import LoadedModel, load_model
from remedi.tokens import encode_texts


def read(spec: str) -> list[EditCase]:
    """``FILE[:N]``: the first N cases of FILE (all without N)."""
    path, _, count = spec.partition(":")
    cases = load_cases(path)
    return cases[: int(count)] if count else cases


def features(
    lm: LoadedModel,
    texts: Sequence[str],
    cases: Sequence[EditCase],
    layers: Sequence[int],
    batch_size: int = 32,
) -> tuple[dict[int, dict[str, torch.Tensor]], dict[int, dict[int, torch.Tensor]]]:
    """Per layer, each query text's token states (``[tokens, hidden]``, as :class:`TokenStates`
    masks them) and each case's key state, from one pass per batch up to the highest layer."""
    sites = [Site("block", layer) for layer in layers]
    top = Site("block", max(layers))
    queries: dict[int, dict[str, torch.Tensor]] = {layer: {} for layer in layers}
    unique = list(dict.fromkeys(texts))
    for start in tqdm(range(0, len(unique), batch_size), desc="query states"):
        chunk = unique[start : start + batch_size]
        ids, mask, lengths = encode_texts(lm.tokenizer, chunk)
        with torch.no_grad(), intervene(lm.arch, record=sites, stop_after=top) as states:
            lm.model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
        keep = query_mask(lengths, ids.shape[1])
        for layer, site in zip(layers, sites, strict=True):
            for text, row, m in zip(chunk, states[site].float(), keep, strict=True):
                queries[layer][text] = row[m].clone()
    keys = {layer: {} for layer in layers}
    for layer in layers:
        for start in range(0, len(cases), batch_size):
            chunk = list(cases[start : start + batch_size])
            for case, state in zip(chunk, key_states(lm, layer, chunk), strict=True):
                keys[layer][id(case)] = state
    return queries, keys


def stack(table: dict[str, torch.Tensor], texts: Sequence[str]) -> TokenStates:
    """The stored token states of ``texts`` as one padded batch."""
    rows = [table[t] for t in texts]
    width = max(len(r) for r in rows)
    states = torch.zeros(len(rows), width, rows[0].shape[-1])
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        states[i, : len(row)] = row
        mask[i, : len(row)] = True
    return TokenStates(states, mask)


def key_stack(table: dict[int, torch.Tensor], cases: Sequence[EditCase]) -> torch.Tensor:
    return torch.stack([table[id(c)] for c in cases])


def train_head(
    queries: dict[str, torch.Tensor],
    keys: dict[int, torch.Tensor],
    cases: Sequence[EditCase],
    hidden: int,
    steps: int,
    lr: float,
    batch: int,
    seed: int = 0,
) -> ScopeClassifier:
    torch.manual_seed(seed)
    head = ScopeClassifier(hidden)
    optimiser = torch.optim.Adam(head.parameters(), lr=lr)
    order = random.Random(seed)
    for _ in range(steps):
        chosen = order.sample(list(cases), batch)
        texts, labels = scope_queries(chosen)
        terms = scope_loss(head, key_stack(keys, chosen), stack(queries, texts), labels)
        optimiser.zero_grad()
        terms["scope"].backward()
        optimiser.step()
    return head


def measure(
    head: ScopeClassifier,
    queries: dict[str, torch.Tensor],
    keys_table: dict[int, torch.Tensor],
    cases: Sequence[EditCase],
) -> dict[str, float]:
    """Routing shares on ``cases`` (see the module docstring)."""
    with torch.no_grad():
        keys = head.embed(key_stack(keys_table, cases))

        def own(texts: list[str], index: list[int]) -> float:
            if not texts:
                return float("nan")
            logits = head.logits(stack(queries, texts), keys)
            chosen = logits[torch.arange(len(texts)), torch.tensor(index)]
            return float((torch.sigmoid(chosen) > 0.5).float().mean())

        groups: dict[str, tuple[list[str], list[int]]] = {
            "rewrite": ([], []),
            "paraphrase": ([], []),
            "neighbour": ([], []),
            "neighbour_plus": ([], []),
        }
        for i, case in enumerate(cases):
            groups["rewrite"][0].append(case.rewrite_prompt)
            groups["rewrite"][1].append(i)
            for p in case.paraphrase_prompts:
                groups["paraphrase"][0].append(p)
                groups["paraphrase"][1].append(i)
            for p in case.neighborhood_prompts:
                groups["neighbour"][0].append(p)
                groups["neighbour"][1].append(i)
                groups["neighbour_plus"][0].append(f"{case.edit_statement}. {p}")
                groups["neighbour_plus"][1].append(i)
        result = {f"{name}_in": own(*pair) for name, pair in groups.items()}
        texts, owners = groups["paraphrase"]
        best = head.logits(stack(queries, texts), keys).max(dim=1)
        hit = (best.indices == torch.tensor(owners)) & (torch.sigmoid(best.values) > 0.5)
        result["paraphrase_retrieved_all"] = float(hit.float().mean())
        texts, _ = groups["neighbour"]
        best = head.logits(stack(queries, texts), keys).max(dim=1)
        result["neighbour_in_all"] = float((torch.sigmoid(best.values) > 0.5).float().mean())
    return result


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", required=True, help="FILE[:N] training cases")
    p.add_argument("--tune", required=True, help="FILE[:N] tuning cases")
    p.add_argument("--layers", type=int, nargs="+", default=[3, 5, 8, 11])
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 1e-2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--neighbours", type=int, default=10, help="pooled per training case")
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--output", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    train = pool_neighbourhoods(read(args.train), args.neighbours)
    tune = read(args.tune)
    lm = load_model(args.model)
    texts = scope_queries(train)[0] + scope_queries(tune)[0]
    start = time.perf_counter()
    queries, keys = features(lm, texts, [*train, *tune], args.layers)
    seconds = time.perf_counter() - start
    rows = []
    for layer in args.layers:
        for lr in args.lrs:
            head = train_head(
                queries[layer], keys[layer], train, lm.arch.hidden_size, args.steps, lr, args.batch
            )
            row = {"layer": layer, "lr": lr, **measure(head, queries[layer], keys[layer], tune)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = {
        "train": args.train,
        "tune": args.tune,
        "n_train": len(train),
        "n_tune": len(tune),
        "steps": args.steps,
        "batch": args.batch,
        "feature_seconds": seconds,
        "n_texts": len(set(texts)),
        "rows": rows,
    }
    args.output.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
