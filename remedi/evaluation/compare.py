"""Compare methods on the same cases: the library function behind both ``remedi.compare`` and
``python -m remedi.evaluate`` (which adds files and a command line), so their rows are equal.

    rows = remedi.compare(lm, ["none", "rome"], remedi.load_cases("builtin:test")[:10])
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from remedi.data import EditCase
from remedi.data.locality import disjoint_locality
from remedi.evaluation.runner import MethodResult, run_method
from remedi.evaluation.stream import Schedule, StreamResult, parse_score_at, run_stream
from remedi.evaluation.summary import (
    case_records,
    known_cases,
    metric_family,
    protocol_fields,
    summary_row,
)
from remedi.evaluation.uncertainty import intervals
from remedi.metrics import (
    PLUS_NAMES,
    SCORE_NAMES,
    case_samples,
    generation_metrics,
    harmonic_mean,
    metric_names,
    reference_vectorizer,
    summarize,
    summarize_generation,
)
from remedi.metrics.perplexity import BUILTIN_TEXT, HeldoutText, perplexity, windows
from remedi.metrics.specificity import reference_measures
from remedi.models import LoadedModel
from remedi.protocol import schedule_setting
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
        data: what the cases were read from (``--data``; named in each row).
        model: the model's name in the rows (None: the loaded model's spec).
        tuned_on: the cases the settings were chosen on (named in each row; the command
            refuses it when it shares a subject with the evaluated cases).
        seeds: methods that draw at random (``replace``) run this many times, seeds 0, 1, ...;
            the row is seed 0's, with each mean's standard deviation over the seeds.
        plus: also score the CounterFact+ neighbourhood (each neighbourhood prompt after the
            edit's statement) and its next-token KL against the unedited model.
        reference_corpus: the text file the reference score's tf-idf is fitted on (one document
            a line); None: the built-in facts' statements.
        heldout_text: the held-out text whose perplexity each edit's ``perplexity_ratio`` is
            measured on: ``builtin`` (a short built-in passage) or a text file.
        heldout_tokens: its tokens scored (0: no perplexity).
        unrelated_tokens: tokens sampled after each of a few unrelated prompts under each edit,
            whose generation entropy is ``unrelated_entropy`` (0: not measured).
        seed: seed of methods that draw at random (``replace``'s partners).
        schedule: ``independent`` (each case on its own edit, the model restored after it),
            ``sequential`` or ``batch:N`` (edits accumulate; :mod:`remedi.evaluation.stream`).
        score_at: under an accumulating schedule, ``end`` (every case on the final model) or
            edit counts such as ``10,100,1000`` at which the cases edited so far are also
            scored (the curves).
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
    data: str | None = None
    model: str | None = None
    tuned_on: str | None = None
    seeds: int = 1
    plus: bool = True
    reference_corpus: str | None = None
    heldout_text: str = BUILTIN_TEXT
    heldout_tokens: int = 256
    unrelated_tokens: int = 20
    seed: int = 0
    schedule: str = "independent"
    score_at: str = "end"
    progress: bool = True
    announce_statistics: bool = False
    pool: Sequence[EditCase] = field(default_factory=list)
    locality: str | None = None
    """How zsRE locality prompts were chosen (set by :func:`select_cases`)."""


def options_from(**given: Any) -> Options:
    """:class:`Options` from keyword arguments; an unknown one raises a one-line
    ``TypeError`` naming it and the valid ones."""
    names = [f.name for f in dataclasses.fields(Options)]
    unknown = [key for key in given if key not in names]
    if unknown:
        raise TypeError(f"unknown option {unknown[0]!r}; the options are: {', '.join(names)}")
    return Options(**given)


def select_cases(lm: LoadedModel, cases: Sequence[EditCase], options: Options) -> list[EditCase]:
    """The cases an evaluation scores: the known ones with ``known_only``, the first ``limit``;
    zsRE cases with locality prompts that are no edit question of the data
    (:func:`remedi.data.locality.disjoint_locality`; how, in ``options.locality``)."""
    chosen = list(cases)
    if options.known_only:
        chosen = [chosen[i] for i in known_cases(lm, chosen, options.batch_size)]
    if options.limit is not None:
        chosen = chosen[: options.limit]
    chosen, options.locality = disjoint_locality(chosen, options.pool or cases)
    return chosen


def row_protocol(method: Method, family: str, options: Options, model: str) -> dict[str, Any]:
    """The protocol fields of ``method``'s row under ``options``."""
    schedule = Schedule.parse(options.schedule)
    score_at = parse_score_at(options.score_at) if schedule.accumulates else None
    return protocol_fields(
        family,
        method.uses_statistics,
        (options.no_stats, options.corpus, options.stats_tokens),
        (options.generation, options.generation_tokens, options.generation_length),
        options.dtype,
        model,
        schedule_setting(schedule.name, score_at),
    )


def evaluate(
    lm: LoadedModel,
    methods: Sequence[Method],
    cases: Sequence[EditCase],
    options: Options,
    samples: dict[str, list[list[str]]] | None = None,
    curves: dict[str, StreamResult] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run every method on ``cases`` (already selected); return the summary rows and the
    per-case records. With ``options.generation`` each method's samples per case are also
    stored in ``samples``; under an accumulating schedule each method's stream (its curve
    and per-edit cost) in ``curves``."""
    schedule = Schedule.parse(options.schedule)
    score_at = parse_score_at(options.score_at) if schedule.accumulates else None
    if schedule.accumulates and (options.generation or options.seeds > 1):
        raise ValueError("generation and --seeds are measured under the independent schedule only")
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
    names = list(metric_names("zsre" if family == "zsre" else "counterfact"))
    text = HeldoutText(options.heldout_text, options.heldout_tokens)
    environment.unrelated_tokens = options.unrelated_tokens
    if options.unrelated_tokens > 0:
        names.insert(len(names) - (family == "counterfact"), "unrelated_entropy")
    if options.heldout_tokens > 0:
        environment.heldout = windows(lm, text)
        environment.heldout_perplexity = perplexity(lm, environment.heldout)
        names.insert(len(names) - (family == "counterfact"), "perplexity_ratio")
    if options.plus:
        environment.references = reference_measures(
            lm.model, lm.tokenizer, cases, options.batch_size
        )
        if family == "counterfact":
            names[-1:-1] = [*PLUS_NAMES, "neighborhood_kl"]
        else:
            names.append("locality_agreement")
    model = options.model or lm.spec
    rows: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    for method in methods:
        method.environment = environment
        method.bind(lm, options.dtype)
        texts: list[list[str]] = [[] for _ in cases]
        sampler = _sampler(lm, method.name, cases, options, texts) if options.generation else None
        result: MethodResult
        if schedule.accumulates:
            result = run_stream(lm, method, cases, schedule, score_at)
            if curves is not None:
                curves[method.name] = result
            if not result.supported:
                rows.append(unstreamed_row(method, lm, cases, options, family, names, model))
                continue
        else:
            result = run_method(lm, method, cases, sampler)
        row = summary_row(result, lm.spec, len(cases), summarize(result.per_case), names)
        if family == "counterfact":
            score_from_measured(row, method, result.per_case)
        parts = SCORE_PARTS.get(str(row.get("score_from")))
        means = [n for n in names if n != "score"]
        row.update(intervals(result.per_case, means, parts))
        row.update(data_fields(cases, options))
        row["heldout"] = text.describe() if options.heldout_tokens > 0 else None
        if family == "zsre":
            row["locality"] = options.locality
        row.update(settings_fields(method, lm))
        row.update(row_protocol(method, family, options, model) | {"model": lm.spec})
        if isinstance(result, StreamResult):
            row.update(stream_fields(result))
        if result.skipped:
            row["n_cases"] = len(cases) - len(result.skipped)
            row["n_skipped"] = len(result.skipped)
        if method.random and options.seeds > 1:
            row.update(seed_spread(lm, method, cases, options, row, means))
        if options.generation:
            if samples is not None:
                samples[method.name] = texts
            vectorizer = reference_vectorizer(options.reference_corpus)
            generation = generation_metrics(cases, texts, vectorizer)
            row["reference_corpus"] = options.reference_corpus or "built-in statements"
            row.update(summarize_generation(generation))
            for metrics, extra in zip(result.per_case, generation, strict=True):
                metrics.update(extra)
        rows.append(row)
        records += case_records(method.name, cases, result)
    return rows, records


def stream_fields(result: StreamResult) -> dict[str, Any]:
    """What a row adds under an accumulating schedule: the per-edit seconds at the stream's
    start and end (the first and last tenth of its groups) and their ratio, and the memory."""
    seconds = result.group_seconds
    tenth = max(1, len(seconds) // 10)
    early, late = seconds[:tenth], seconds[-tenth:]
    early_mean = sum(early) / len(early) if early else 0.0
    late_mean = sum(late) / len(late) if late else 0.0
    return {
        "seconds_per_edit_early": early_mean,
        "seconds_per_edit_late": late_mean,
        "late_over_early": late_mean / early_mean if early_mean else None,
        "rss_mib_start": result.group_rss_mib[0] if result.group_rss_mib else None,
        "rss_mib_end": result.group_rss_mib[-1] if result.group_rss_mib else None,
    }


def unstreamed_row(
    method: Method,
    lm: LoadedModel,
    cases: Sequence[EditCase],
    options: Options,
    family: str,
    names: Sequence[str],
    model: str,
) -> dict[str, Any]:
    """The row of a method whose edits do not accumulate in one model (prefix, replace,
    REMEDI) under an accumulating schedule: every metric n/a, and why."""
    row: dict[str, Any] = {"method": method.name, "model": lm.spec, "n_cases": 0}
    row.update({name: None for name in names})
    row.update(seconds_per_edit=None, seconds_per_edit_mean=None)
    row["note"] = "n/a: its edit lives in the input and does not accumulate in one model"
    row.update(data_fields(cases, options))
    row.update(settings_fields(method, lm))
    row.update(row_protocol(method, family, options, model) | {"model": lm.spec})
    return row


def seed_spread(
    lm: LoadedModel,
    method: Method,
    cases: Sequence[EditCase],
    options: Options,
    row: dict[str, Any],
    means: Sequence[str],
) -> dict[str, Any]:
    """The row's means again with seeds ``1 .. seeds-1`` (the row itself is seed 0): ``seeds``
    and, per mean metric, ``<metric>_seed_std``, the standard deviation over the seeds."""
    found: dict[str, list[float]] = {
        name: [row[name]] for name in means if row.get(name) is not None
    }
    first_seed = method.environment.seed
    try:
        for seed in range(1, options.seeds):
            method.environment.seed = first_seed + seed
            summary = summarize(run_method(lm, method, cases).per_case)
            for name, values in found.items():
                values.append(summary.get(name, math.nan))
    finally:
        method.environment.seed = first_seed
    spread: dict[str, Any] = {"seeds": options.seeds}
    for name, values in found.items():
        spread[f"{name}_seed_std"] = statistics.pstdev(values)
    return spread


SCORE_PARTS = {
    "ES, PS, NS": SCORE_NAMES,
    "ES, PS, NS+": (SCORE_NAMES[0], SCORE_NAMES[1], PLUS_NAMES[0]),
}
"""The per-case scores each Score is the harmonic mean of (for its interval)."""


def digest(value: Any) -> str:
    """SHA-256 of ``value`` as canonical JSON (sorted keys)."""
    text = json.dumps(value, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tuning_overlap(tuned: Sequence[EditCase], reported: Sequence[EditCase]) -> str | None:
    """Why settings chosen on ``tuned`` may not be reported on ``reported``: the edited subjects
    they share (a shared case shares its subject too; case ids of different files are not
    comparable); None when they share none."""
    subjects = sorted({c.subject for c in tuned} & {c.subject for c in reported})
    if not subjects:
        return None
    more = f" and {len(subjects) - 3} more" if len(subjects) > 3 else ""
    shown = ", ".join(subjects[:3])
    return f"shares {len(subjects)} subject(s) with the evaluated cases: {shown}{more}"


def data_fields(cases: Sequence[EditCase], options: Options) -> dict[str, Any]:
    """What a row was measured on: the data named, the filters, and a hash of the exact case
    list (every field of every case, in order)."""
    return {
        "data": options.data,
        "limit": options.limit,
        "known_only": options.known_only,
        "tuned_on": options.tuned_on,
        "data_sha256": digest([dataclasses.asdict(case) for case in cases]),
    }


def settings_fields(method: Method, lm: LoadedModel) -> dict[str, Any]:
    """The method's resolved settings (the model's defaults in place of null fields; the dtype
    ROME and MEMIT actually optimise in) and a digest of them with the method's name and, for a
    trained method, its checkpoint's bytes."""
    settings = method.resolve(lm)
    fields: dict[str, Any] = {}
    is_instance = dataclasses.is_dataclass(settings) and not isinstance(settings, type)
    plain = dataclasses.asdict(settings) if is_instance else {}
    if plain.get("optimise_dtype") == "auto":
        plain["optimise_dtype"] = optimised_dtype(lm)
    if plain:
        fields["settings"] = plain
    weights = None
    if method.checkpoint is not None:
        weights = checkpoint_digest(method.checkpoint)
    fields["settings_sha256"] = digest(
        {"method": method.name, "settings": plain, "weights": weights}
    )
    return fields


def optimised_dtype(lm: LoadedModel) -> str:
    """The dtype ``optimise_dtype="auto"`` optimises in on ``lm``'s device (see
    :func:`remedi.methods.rome.optimisation_model`)."""
    import torch

    from remedi.models.cast_copy import fast_dtype

    fast = fast_dtype(lm.device) if lm.dtype == torch.float32 else None
    return str(fast or lm.dtype).removeprefix("torch.")


def checkpoint_digest(path: Path) -> str:
    """SHA-256 of a checkpoint's bytes (a folder: of its files, by name)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    sha = hashlib.sha256()
    for file in files:
        sha.update(file.name.encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                sha.update(block)
    return sha.hexdigest()


def score_from_measured(
    row: dict[str, Any], method: Method, per_case: list[dict[str, float]]
) -> None:
    """Make ``row``'s Score the harmonic mean of what the method's edit is measured on: ES, PS
    and NS, or (an edit that cannot reach the plain neighbourhood prompts) ES, PS and NS+, its
    NS being the unedited model's by construction and so reported as n/a (None), in the row
    and in each case's metrics. ``score_from`` names the three."""
    if method.edits_neighbors:
        row["score_from"] = "ES, PS, NS"
        return
    row["neighborhood_score"] = row["neighborhood_magnitude"] = None
    for metrics in per_case:
        metrics.pop("neighborhood_score", None)
        metrics.pop("neighborhood_magnitude", None)
    parts = [row.get(SCORE_NAMES[0]), row.get(SCORE_NAMES[1]), row.get(PLUS_NAMES[0])]
    measured = [p for p in parts if p is not None]
    row["score"] = harmonic_mean(measured) if len(measured) == 3 else None
    row["score_from"] = "ES, PS, NS+"


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
