"""``python -m remedi.evaluate --task probe|mcrae|biosbias``: run one of REMEDI's own evaluations
from the command's arguments and write its table (``summary.json``, ``summary.md`` with the
protocol line under it, ``cases.jsonl``), all three at once."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from remedi.cli import UsageError, fail, file_error, load_data, load_lm
from remedi.data.attributes import (
    co_probabilities,
    mcrae_examples,
    read_bios,
    read_mcrae_features,
    read_mcrae_frequencies,
    split_three,
)
from remedi.evaluation import biosbias, mcrae, outputs, probe
from remedi.evaluation.settings import Split
from remedi.models import LoadedModel

TASKS = ("counterfact", "probe", "mcrae", "biosbias")
TASK_METHODS: dict[str, tuple[str, ...]] = {
    "probe": ("remedi",),
    "mcrae": mcrae.MCRAE_METHODS,
    "biosbias": biosbias.BIOS_METHODS,
}
COLUMNS: dict[str, tuple[str, ...]] = {
    "probe": ("method", "task", "labels", "n_cases", *probe.PROBE_METRIC_NAMES, "entity_layer"),
    "mcrae": ("method", "n_cases", *mcrae.MCRAE_METRIC_NAMES, "n_skipped"),
    "biosbias": ("method", "setting", "n_cases", *biosbias.BIOS_METRIC_NAMES),
}
SCORING = {"probe": "first", "mcrae": "sum", "biosbias": "first"}
"""How each task scores targets: first token that carries text, or summed target tokens."""


def default_methods(task: str, checkpoints: Sequence[str]) -> list[str]:
    """The methods a task scores when no ``--method`` is given (remedi when a checkpoint is)."""
    if task == "probe":
        return ["remedi"]
    base = ["none", "prefix", "replace"] if task == "mcrae" else ["none"]
    return base + (["remedi"] if checkpoints else [])


def task_protocol(args: argparse.Namespace, task: str) -> dict[str, Any]:
    """The protocol fields of every row of ``task`` in this run (see :mod:`remedi.protocol`)."""
    generation = "off"
    if task == "biosbias":
        generation = f"{args.settings['biosbias'].max_new_tokens} new tokens"
    return {
        "metric_family": task,
        "scoring": SCORING[task],
        "generation": generation,
        "statistics": None,
        "dtype": args.dtype,
        "model": args.model,
    }


def split_of(
    examples: list[Any], split: Split, n_val: int | None, n_test: int | None, seed: int
) -> list[Any]:
    """One split of ``examples`` as the training data module splits them (``all``: every
    example, unsplit; see :func:`remedi.data.attributes.split_three`)."""
    if split == "all":
        return list(examples)
    train, val, test = split_three(examples, n_val, n_test, seed)
    return {"train": train, "validation": val, "test": test}[split]


def load_task_data(args: argparse.Namespace) -> Any:
    """The task's data from ``--data`` (before the model loads): CounterFact cases for the
    probe, ``(examples, features)`` for McRae, examples for Bias in Bios."""
    task = args.task
    if task == "probe":
        cases = load_data(args.data)
        missing = [c.case_id for c in cases if c.target_new is None]
        if missing:
            raise UsageError(f"--data {args.data}: case {missing[0]} has no target_new")
        return cases[: args.limit]
    if not Path(args.data).is_file():
        raise UsageError(f"--data {args.data}: no such file")
    try:
        if task == "mcrae":
            s = args.settings["mcrae"]
            features = read_mcrae_features(args.data)
            examples = mcrae_examples(
                features, s.examples_per_concept, s.min_co_prob, s.min_co_concepts, s.seed
            )
            chosen = split_of(examples, s.split, s.n_val, s.n_test, s.seed)
            return chosen[: args.limit], features, read_mcrae_frequencies(args.data)
        b = args.settings["biosbias"]
        every = read_bios(args.data, b.limit)
        return split_of(every, b.split, b.n_val, b.n_test, b.seed)[: args.limit], every
    except (OSError, ValueError, KeyError) as err:
        raise UsageError(file_error("--data", args.data, err)) from err


def run_probe(lm: LoadedModel, args: argparse.Namespace, data: Any, trained: Any) -> tuple:
    s = args.settings["probe"]
    layer = s.entity_layer
    layer = probe.default_entity_layer(lm.arch.num_layers) if layer is None else layer
    inputs = probe.probe_inputs(lm, data, trained.layer, layer, args.batch_size)
    rows, records = probe.run_probe(trained.loaded, inputs, s.seed)
    for row in rows:
        row.update(editor_layer=trained.layer, entity_layer=layer)
    return rows, records


def run_mcrae(lm: LoadedModel, args: argparse.Namespace, data: Any, trained: Any) -> tuple:
    from remedi.editors import attribute_states, metrics_context

    s = args.settings["mcrae"]
    examples, features, frequencies = data
    co_prob = co_probabilities(features, s.min_co_concepts)
    samples = mcrae.build_samples(
        examples, features, co_prob, s.max_co_features, s.seed, frequencies
    )
    base_rows, _ = mcrae.method_rows(samples, "none")
    before = mcrae.sample_correlations(
        samples, base_rows, mcrae.feature_log_probs(lm, base_rows, None, args.batch_size, "before")
    )
    own_rows, _ = mcrae.method_rows(samples, "none", original=True)
    own_before = mcrae.sample_correlations(
        samples,
        own_rows,
        mcrae.feature_log_probs(lm, own_rows, None, args.batch_size, "before (original)"),
        original=True,
    )
    rows, records = [], []
    for method in args.method:
        scored, replaced = mcrae.method_rows(samples, method, features, s.seed)
        edit = None
        if method == "remedi":
            contexts = [x.context for x in samples]
            with torch.no_grad():
                attributes = attribute_states(
                    lm, trained.layer, contexts, [x.entity for x in samples]
                )
            alpha = args.settings["remedi"].alpha
            edit = metrics_context(lm, trained.layer, trained.loaded, attributes, alpha)
        after, own_after = before, own_before
        if method != "none":
            values = mcrae.feature_log_probs(lm, scored, edit, args.batch_size, method)
            after = mcrae.sample_correlations(samples, scored, values)
            own, _ = mcrae.method_rows(samples, method, features, s.seed, original=True)
            own_values = mcrae.feature_log_probs(
                lm, own, edit, args.batch_size, f"{method} (original)"
            )
            own_after = mcrae.sample_correlations(samples, own, own_values, original=True)
        original = (own_before, own_after) if frequencies else None
        row = mcrae.summary_row(method, before, after, original)
        if method == "replace":
            row["n_skipped"] = sum(r is None for r in replaced)
        rows.append(row)
        for sample, b, a, ob, oa, other in zip(
            samples, before, after, own_before, own_after, replaced, strict=True
        ):
            records.append(
                {
                    "method": method,
                    "case_id": sample.sample_id,
                    "concept": sample.concept,
                    "context_feature": sample.context_feature,
                    "n_features": len(sample.features),
                    "correlation_before": b,
                    "correlation": a,
                    "orig_correlation_before": ob,
                    "orig_correlation": oa,
                    **({"replacement": other} if method == "replace" else {}),
                }
            )
    return rows, records


def run_biosbias(lm: LoadedModel, args: argparse.Namespace, data: Any, trained: Any) -> tuple:
    b = args.settings["biosbias"]
    examples, every = data
    labels = sorted({str(e.target_mediated) for e in every})
    consistency = biosbias.Consistency(every)
    rows, records = [], []
    for method in args.method:
        editor = trained.loaded if method == "remedi" else None
        layer = trained.layer if method == "remedi" else None
        for setting in biosbias.SETTINGS:
            found = biosbias.evaluate_setting(
                lm,
                examples,
                setting,
                labels,
                consistency,
                editor,
                layer,
                top_k=b.top_k,
                max_new_tokens=b.max_new_tokens,
                batch_size=args.batch_size,
                seed=b.seed,
                alpha=args.settings["remedi"].alpha,
            )
            summary = biosbias.summarize(found)
            rows.append({"method": method, "setting": setting, "n_cases": len(found), **summary})
            records += [{"method": method, **r} for r in found]
    return rows, records


RUNNERS = {"probe": run_probe, "mcrae": run_mcrae, "biosbias": run_biosbias}


def markdown_table(task: str, rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a Markdown table of the task's columns, with the protocol line under it."""
    return outputs.markdown_table(rows, [c for c in COLUMNS[task] if any(c in r for r in rows)])


def write_outputs(output: Path, task: str, rows: Sequence[dict[str, Any]], records: list) -> None:
    """``summary.json``, ``summary.md`` and ``cases.jsonl`` of a task, written atomically."""
    columns = [c for c in COLUMNS[task] if any(c in r for r in rows)]
    outputs.write_outputs(output, rows, records, columns=columns, chart=False)


def check(
    args: argparse.Namespace, check_common: Callable[[argparse.Namespace], str | None]
) -> str | None:
    """The first problem with a task's arguments, found before anything loads (fills in the
    default methods)."""
    task = args.task
    if args.append:
        return "--append: only --task counterfact tables can be extended"
    args.method = list(dict.fromkeys(args.method or default_methods(task, args.checkpoint)))
    allowed = TASK_METHODS[task]
    bad = [m for m in args.method if m not in allowed]
    if bad:
        return f"--method {bad[0]}: --task {task} scores {', '.join(allowed)}"
    if args.known_only or args.generation:
        flag = "--known-only" if args.known_only else "--generation"
        return f"{flag} applies to --task counterfact only"
    return check_common(args)


def main(args: argparse.Namespace, check_common: Callable[[argparse.Namespace], str | None]) -> int:
    """Run ``args.task`` (not counterfact) and write its table; the exit code."""
    problem = check(args, check_common)
    if problem:
        return fail(problem)
    task = args.task
    if task == "biosbias" and args.settings["biosbias"].top_k < 1:
        return fail(f"--biosbias.top_k must be positive, got {args.settings['biosbias'].top_k}")
    try:
        data = load_task_data(args)
    except UsageError as err:
        return fail(err)
    if not (data if task == "probe" else data[0]):
        return fail(f"--data: no cases left to evaluate in {args.data}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        lm = load_lm(args)
    except UsageError as err:
        return fail(err)
    entity_layer = args.settings["probe"].entity_layer
    top = lm.arch.num_layers - 1
    if task == "probe" and entity_layer is not None and not 0 <= entity_layer <= top:
        return fail(f"--probe.entity_layer {entity_layer} is out of range (0..{top})")
    trained = None
    if "remedi" in args.method:
        from remedi import registry

        path = args.checkpoints["remedi"]
        try:
            trained = registry.editor("remedi", checkpoint=path)
            trained.bind(lm, args.dtype)
        except (OSError, ValueError) as err:
            return fail(file_error("--checkpoint", path, err))
    rows, records = RUNNERS[task](lm, args, data, trained)
    fields = task_protocol(args, task) | {"model": lm.spec}
    rows = [row | fields for row in rows]
    write_outputs(args.output, task, rows, records)
    print(markdown_table(task, rows), end="")
    print(f"wrote {args.output / 'summary.json'}, summary.md, cases.jsonl")
    return 0
