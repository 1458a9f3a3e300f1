"""Compare methods on the same cases: the library function behind both ``remedi.compare`` and
``python -m remedi.evaluate`` (which adds files and a command line), so their rows are equal.

    rows = remedi.compare(lm, ["none", "rome"], remedi.load_cases("builtin:test")[:10])
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from remedi.data import EditCase
from remedi.evaluation.runner import run_method
from remedi.evaluation.summary import (
    case_records,
    known_cases,
    metric_family,
    protocol_fields,
    summary_row,
)
from remedi.metrics import (
    case_samples,
    generation_metrics,
    metric_names,
    summarize,
    summarize_generation,
)
from remedi.models import LoadedModel
from remedi.registry import Edited, Environment, Method, Statistics, as_method


@dataclass
class Options:
    """How an evaluation runs; the keyword options of ``remedi.compare`` and the flags of
    ``python -m remedi.evaluate`` of the same names.

    Args:
        batch_size: prompts per scoring forward pass.
        known_only: keep only the cases the unedited model knows (P(true) > P(new)).
        limit: score only the first N cases (after ``known_only``); None: all.
        corpus: text of the second-moment statistics (None: the Python documentation).
        stats_tokens: corpus tokens for the statistics.
        no_stats: identity statistics (unwhitened updates).
        generation: also sample each case's generation prompts under its edit.
        generation_tokens: tokens per sample (in all, or new: ``generation_length``).
        generation_length: ``total`` (prompt included, ROME's protocol) or ``new``.
        dtype: the dtype the model was loaded in (named in the protocol).
        model: the model's name in the rows (None: the loaded model's spec).
        seed: seed of methods that draw at random (``replace``'s partners).
        progress: show progress bars.
    """

    batch_size: int = 32
    known_only: bool = False
    limit: int | None = None
    corpus: str | None = None
    stats_tokens: int = 100_000
    no_stats: bool = False
    generation: bool = False
    generation_tokens: int = 100
    generation_length: str = "total"
    dtype: str = "float32"
    model: str | None = None
    seed: int = 0
    progress: bool = True
    announce_statistics: bool = False
    pool: Sequence[EditCase] = field(default_factory=list)


def options_from(**given: Any) -> Options:
    """:class:`Options` from keyword arguments; an unknown one raises a one-line
    ``TypeError`` naming it and the valid ones."""
    names = [f.name for f in dataclasses.fields(Options)]
    unknown = [key for key in given if key not in names]
    if unknown:
        raise TypeError(f"unknown option {unknown[0]!r}; the options are: {', '.join(names)}")
    return Options(**given)


def select_cases(lm: LoadedModel, cases: Sequence[EditCase], options: Options) -> list[EditCase]:
    """The cases an evaluation scores: the known ones with ``known_only``, the first ``limit``."""
    chosen = list(cases)
    if options.known_only:
        chosen = [chosen[i] for i in known_cases(lm, chosen, options.batch_size)]
    if options.limit is not None:
        chosen = chosen[: options.limit]
    return chosen


def row_protocol(method: Method, family: str, options: Options, model: str) -> dict[str, Any]:
    """The protocol fields of ``method``'s row under ``options``."""
    return protocol_fields(
        family,
        method.uses_statistics,
        (options.no_stats, options.corpus, options.stats_tokens),
        (options.generation, options.generation_tokens, options.generation_length),
        options.dtype,
        model,
    )


def evaluate(
    lm: LoadedModel,
    methods: Sequence[Method],
    cases: Sequence[EditCase],
    options: Options,
    samples: dict[str, list[list[str]]] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run every method on ``cases`` (already selected); return the summary rows and the
    per-case records. With ``options.generation`` each method's samples per case are also
    stored in ``samples``."""
    statistics = Statistics(
        corpus=options.corpus,
        n_tokens=options.stats_tokens,
        enabled=not options.no_stats,
        announce=(lambda line: print(line, file=sys.stderr))
        if options.announce_statistics
        else None,
    )
    environment = Environment(
        statistics=statistics,
        pool=options.pool or list(cases),
        seed=options.seed,
        batch_size=options.batch_size,
        progress=options.progress,
    )
    family = metric_family(cases)
    names = metric_names("zsre" if family == "zsre" else "counterfact")
    model = options.model or lm.spec
    rows: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    for method in methods:
        method.environment = environment
        method.bind(lm, options.dtype)
        texts: list[list[str]] = [[] for _ in cases]
        sampler = _sampler(lm, method.name, cases, options, texts) if options.generation else None
        result = run_method(lm, method, cases, sampler)
        row = summary_row(result, lm.spec, len(cases), summarize(result.per_case), names)
        row.update(row_protocol(method, family, options, model) | {"model": lm.spec})
        settings = method.settings
        is_instance = dataclasses.is_dataclass(settings) and not isinstance(settings, type)
        if is_instance and dataclasses.fields(settings):
            row["settings"] = dataclasses.asdict(settings)
        if result.skipped:
            row["n_cases"] = len(cases) - len(result.skipped)
            row["n_skipped"] = len(result.skipped)
        if options.generation:
            if samples is not None:
                samples[method.name] = texts
            generation = generation_metrics(cases, texts)
            row.update(summarize_generation(generation))
            for metrics, extra in zip(result.per_case, generation, strict=True):
                metrics.update(extra)
        rows.append(row)
        records += case_records(method.name, cases, result)
    return rows, records


def _sampler(
    lm: LoadedModel,
    name: str,
    cases: Sequence[EditCase],
    options: Options,
    texts: list[list[str]],
) -> Any:
    """Samples the generation prompts of the cases of each scored group into ``texts``, under
    the group's edit (its prefix, hooks or weights)."""
    progress = tqdm(total=len(cases), desc=f"generate {name}", unit="case")

    def sample(indices: range, edited: Edited) -> None:
        for i in indices:
            index = i - indices.start
            if edited.scored_case(index, cases[i]) is None:
                continue
            context, hook = edited.generation(index)
            texts[i] = case_samples(
                lm,
                edited.sampled_case(index, cases[i]),
                options.generation_tokens,
                seed=i,
                edit=hook,
                context=context,
                length=options.generation_length,  # type: ignore[arg-type]
            )
            progress.update()
        if indices.stop >= len(cases):
            progress.close()

    return sample


def compare(
    lm: LoadedModel,
    methods: Sequence[str | Method],
    cases: Sequence[EditCase],
    **options: Any,
) -> list[dict[str, Any]]:
    """Score each method (a registered name, with its default settings, or an editor from
    :func:`remedi.editor`) on ``cases``: the same summary rows, protocol included, that
    ``python -m remedi.evaluate`` writes to ``summary.json``. ``options`` are :class:`Options`
    fields (``batch_size``, ``known_only``, ``limit``, ``corpus``, ``generation`` ...)."""
    chosen_options = options_from(**options)
    chosen_options.pool = list(chosen_options.pool or cases)
    chosen = select_cases(lm, cases, chosen_options)
    if not chosen:
        raise ValueError("no cases left to evaluate")
    rows, _ = evaluate(lm, [as_method(m) for m in methods], chosen, chosen_options)
    return json.loads(json.dumps(rows))
