"""Score editing methods on CounterFact-format cases with the shared metrics; one table row each.

    python -m remedi.evaluate --method none --method rome --data builtin --limit 10 \\
        --output runs/eval

``--data builtin[:split]`` scores the built-in facts (:func:`remedi.data.load_builtin`; the test
split when no split is named), so a fresh clone needs no data file. Methods are the registered
ones (:mod:`remedi.registry`; ``--help`` lists them); trained ones take a ``--checkpoint`` and use
its best-validation weights. Each case is scored on its own edit and the model restored after it
(see :mod:`remedi.evaluation.runner`). This module is the command line only: the evaluation is
:mod:`remedi.evaluation` (``remedi.compare`` from Python gives the same rows).

Writes ``summary.json`` (one flat object; a list of them for several methods), ``cases.jsonl``
(each case's metrics and ``took``: P(target_new) > P(target_true) on the rewrite prompt under the
edit), ``summary.md`` and ``chart.png`` (ES, PS, NS and Score per method), atomically, and prints
``METHOD: K/N edits took`` per method. With ``--generation`` each case's generation prompts are
also sampled under the method's edit of that case, adding generation entropy and reference score
(see :mod:`remedi.metrics.generation`) to the rows and the samples to ``generations.jsonl``; each
sample is 100 tokens long in all, prompt included (ROME's protocol; ``--generation-length new``
samples 100 new tokens instead).

Every row names its protocol (metric family, scoring, generation settings, ROME/MEMIT's
statistics source, dtype and model; see :mod:`remedi.protocol`) and ``summary.md`` states it
under the table. ``--append`` adds this run's rows to the table already in ``--output``, and
refuses (before loading the model) when their protocols differ, unless ``--mixed-protocols``.

zsRE data (MEND's zsRE layout, or a flattened file whose locality prompts are Natural Questions
with their own answers) is scored with zsRE's metrics instead (:mod:`remedi.metrics.zsre`): the
table's columns are efficacy_accuracy, paraphrase_accuracy and specificity_accuracy (teacher-forced
top-1 token accuracy; specificity on the edited model, as ROME and MEMIT report it), and an edit
"took" when every token of target_new is the top-1 prediction after the rewrite prompt.

``--task probe|mcrae|biosbias`` runs one of REMEDI's own evaluations instead of the CounterFact
table (:mod:`remedi.evaluation`): the Fact-Med / Fact-Prior probe of a trained REMEDI editor
with its shuffled-label and identity-editor controls, McRae entailment, Bias in Bios generation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from remedi import registry
from remedi.allocator import release_freed_memory
from remedi.cli import (
    ArgumentParser,
    UsageError,
    add_statistics_arguments,
    check_checkpoint_file,
    check_device,
    check_layers,
    check_model_layers,
    check_model_spec,
    check_output_dir,
    check_positive,
    fail,
    file_error,
    load_data,
    load_lm,
    quiet_warnings,
)
from remedi.data import EditCase
from remedi.evaluation import config as evaluate_config
from remedi.evaluation.compare import (
    Options,
    data_fields,
    evaluate,
    row_protocol,
    select_cases,
    tuning_overlap,
)
from remedi.evaluation.outputs import (
    case_set_problem,
    earlier_rows,
    markdown_table,
    protocol_problem,
    write_curves,
    write_outputs,
)
from remedi.evaluation.stream import Schedule, StreamResult, parse_score_at
from remedi.evaluation.summary import known_cases, metric_family, took_line
from remedi.metrics import GENERATION_LENGTHS
from remedi.models import DEFAULT_MODEL
from remedi.models.loading import DTYPES
from remedi.signals import interruptible

__all__ = ["build_parser", "evaluate", "known_cases", "load_data", "main", "took_line"]

POSITIVE_FLAGS = (
    "--limit",
    "--threads",
    "--batch-size",
    "--steps",
    "--memit-batch",
    "--ft-steps",
    "--ft-eps",
    "--generation-tokens",
    "--seeds",
)
"""Flags whose value, when given, must be positive."""


EPILOG = """\
examples:
  python -m remedi.evaluate --method none --method prefix --data builtin --output runs/eval
  python -m remedi.evaluate --method none --method rome --method ft-l --data builtin:validation \\
      --limit 10 --output runs/eval-rome
  python -m remedi.evaluate --method none --method mend --method ke --data builtin \\
      --checkpoint mend=checkpoints/mend/quickstart/last.ckpt \\
      --checkpoint ke=checkpoints/ke/quickstart/last.ckpt --output runs/eval-learned
  python -m remedi.evaluate --method memit --data builtin --output runs/eval --append
  python -m remedi.evaluate --config configs/evaluate/quick.yaml --rome.clamp 4 --print_config
  python -m remedi.evaluate --task probe --data builtin:validation \\
      --checkpoint checkpoints/quickstart/last.ckpt --output runs/probe
  python -m remedi.evaluate --task mcrae --data CONCS_FEATS_concstats_brm.txt \\
      --method none --method prefix --method replace --output runs/mcrae

--task: counterfact (the table above; the default), probe (REMEDI as a probe: Fact-Med and
Fact-Prior accuracy, F1 and MCC of the --checkpoint's editor, with shuffled labels and the
identity editor as controls; CounterFact data), mcrae (correlation of the LM's log-probabilities
of co-occurring features with McRae's co-probabilities before and after none, prefix, replace
or remedi; --data is CONCS_FEATS_concstats_brm.txt) or biosbias (top-1 / top-3 occupation
accuracy, fluency and consistency, contextual and decontextual, for none or remedi; --data is
the Bias in Bios pickle). Their settings are the probe, mcrae and biosbias sections below; they
write summary.json, summary.md and cases.jsonl.

--data: builtin[:train|validation|test|famous-tune|famous-test] (the built-in facts; builtin alone
is the test split; famous-tune and famous-test: harder cases whose neighbours are famous subjects
of the same relation and object, sharing no subject with each other) or
a .json file (a list of objects, or {"records": [...]}) or .jsonl file (one object a line) in one
of these layouts, told apart by the first record's keys:
  CounterFact as published by ROME:
    {"case_id": 0, "requested_rewrite": {"prompt": "{} is headquartered in",
     "subject": "Toyota", "target_new": {"str": "Paris"}, "target_true": {"str": "Japan"}},
     "paraphrase_prompts": [...], "neighborhood_prompts": [...], "generation_prompts": [...]}
  CounterFact/zsRE flattened as in MEND and EasyEdit:
    {"prompt": ..., "subject": ..., "target_new": ..., "ground_truth": ...,
     "rephrase_prompt": ..., "locality_prompt": ..., "locality_ground_truth": ...}
  zsRE as in MEND: {"src": ..., "subject": ..., "alt": ..., "answers": [...], "rephrase": ...,
     "loc": ..., "loc_ans": ...}
  ROME's known facts: {"known_id": ..., "subject": ..., "attribute": ..., "prompt": ...}
    (no target_new: nothing to edit, so evaluate rejects them)
A prompt holds "{}" where the subject goes, or the subject itself. zsRE files (MEND's zsRE
layout; a flattened file whose locality prompts have answers of their own) get zsRE's metrics.

outputs in --output (each written atomically; earlier files of the same name are replaced, or
extended with --append):
  summary.json  one object per method (a flat object for one method): method, model, n_cases,
                efficacy/paraphrase/neighborhood score and magnitude, score, seconds_per_edit
                (zsRE: efficacy_accuracy, paraphrase_accuracy, specificity_accuracy instead of
                the scores and magnitudes) and the row's protocol: metric_family (counterfact,
                zsre), scoring (mean, top-1), generation (off, "N tokens in all", "N new
                tokens"), statistics (ROME/MEMIT: "CORPUS (N tokens)" or "identity
                (--no-stats)"; null for other methods), dtype
  summary.md    the same as a Markdown table (also printed), with a "Protocol: ..." line under
                it; rows of different protocols share a table only with --mixed-protocols
  cases.jsonl   one object per method and case: its metrics and "took" (P(target_new) >
                P(target_true) on the rewrite prompt under the edit; zsRE: every token of
                target_new is the top-1 prediction there)
  chart.png     grouped bars of ES, PS, NS and Score per method (zsRE: the three accuracies)
  generations.jsonl  with --generation: the sampled texts per method and case
"""


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m remedi.evaluate`` (also documents inputs and outputs)."""
    p = ArgumentParser(
        prog="python -m remedi.evaluate",
        description=__doc__.split("\n")[0],
        epilog=EPILOG + "\n" + methods_help() + "\n" + evaluate_config.sections_help(),
    )
    _add_run_arguments(p)
    _add_method_arguments(p)
    _add_output_arguments(p)
    return p


def methods_help() -> str:
    """The epilog paragraph that lists the registered methods."""
    return "\n".join(["--method (registered methods, remedi.registry):", *registry.help_lines()])


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    """What to run on what: config, task, methods, model, data, cases, checkpoints, device."""
    p.add_argument(
        "--config",
        metavar="FILE",
        help="a YAML file of these options by name and rome/memit/ft sections (see below); "
        "flags on the command line win",
    )
    p.add_argument(
        "--print_config",
        action="store_true",
        help="print the complete configuration as YAML (readable by --config) and exit",
    )
    p.add_argument(
        "--task",
        default="counterfact",
        choices=("counterfact", "probe", "mcrae", "biosbias"),
        help="counterfact: the editing table; probe, mcrae, biosbias: REMEDI's own evaluations "
        "(see --task below)",
    )
    p.add_argument(
        "--method",
        action="append",
        default=None,
        choices=registry.names(),
        help="a method to score; repeat the flag to score several, one table row each "
        "(required for --task counterfact)",
    )
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="the LM: gemma3-270m, a hub id org/name, a model directory or a .gguf file",
    )
    p.add_argument(
        "--data",
        required=True,
        metavar="FILE|builtin[:SPLIT]",
        help="edit cases: a JSON/JSONL file (layouts below) or the built-in facts "
        "(builtin = builtin:test)",
    )
    p.add_argument(
        "--output",
        required=True,
        type=Path,
        help="directory for summary.json, summary.md, cases.jsonl and chart.png (created)",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="score only the first N cases, after --known-only; None: all",
    )
    p.add_argument(
        "--known-only",
        action="store_true",
        help="keep only the cases the unedited LM knows (P(target_true) > P(target_new))",
    )
    p.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="[METHOD=]PATH",
        help="a trained editor's checkpoint (a .ckpt file or a shipped editor folder); repeat as "
        "METHOD=PATH to score several trained editors in one table",
    )
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="the LM's dtype")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N or mps")
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads; None: torch's default"
    )
    p.add_argument("--batch-size", type=int, default=32, help="prompts per scoring forward pass")
    p.add_argument(
        "--schedule",
        default="independent",
        metavar="independent|sequential|batch:N",
        help="independent: each case on its own edit, the model restored after it; sequential "
        "or batch:N: edits accumulate in one model, one or N at a time (restored at the end)",
    )
    p.add_argument(
        "--score-at",
        default="end",
        metavar="end|N,N,...",
        help="under an accumulating schedule: end (every case on the final model), or edit "
        "counts (e.g. 10,100,1000) at which the cases edited so far are also scored; writes "
        "curves.json, curves.png and TensorBoard scalars",
    )
    add_statistics_arguments(p)


def _add_method_arguments(p: argparse.ArgumentParser) -> None:
    """The flat method flags, aliases of the config sections' fields."""
    method_default = "None: the method's own default"
    p.add_argument(
        "--layer",
        type=int,
        default=None,
        help="the layer ROME, FT and FT-L edit; None: ROME's default layer for the model",
    )
    p.add_argument(
        "--n-context",
        type=int,
        default=None,
        help=f"ROME/MEMIT: text prefixes the target is also optimised under; {method_default}",
    )
    p.add_argument(
        "--clamp",
        type=float,
        default=None,
        help=f"ROME/MEMIT: bound on ‖δ‖ as a multiple of the edited state's norm; {method_default}",
    )
    p.add_argument(
        "--kl-weight",
        type=float,
        default=None,
        help=f"ROME/MEMIT: weight of the essence (KL) term; {method_default}",
    )
    p.add_argument(
        "--weight-decay",
        type=float,
        default=None,
        help=f"ROME/MEMIT: weight decay of the optimised state; {method_default}",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"ROME/MEMIT: optimisation steps; {method_default}",
    )
    p.add_argument(
        "--memit-layers",
        type=int,
        nargs="+",
        default=None,
        help="the layers MEMIT spreads its update over; None: its default layers for the model",
    )
    p.add_argument(
        "--memit-lambda",
        type=float,
        default=None,
        help="MEMIT's weight λ of the statistics; None: GPT-J's 15,000 scaled by the MLP width",
    )
    p.add_argument(
        "--memit-batch",
        type=int,
        default=None,
        help="edits per MEMIT batch; None: all cases in one batch",
    )
    p.add_argument(
        "--ft-lr", type=float, default=None, help=f"FT/FT-L learning rate; {method_default}"
    )
    p.add_argument(
        "--ft-steps", type=int, default=None, help=f"FT/FT-L optimisation steps; {method_default}"
    )
    p.add_argument("--ft-eps", type=float, default=None, help="FT-L's L-infinity bound; None: 5e-4")


def _add_output_arguments(p: argparse.ArgumentParser) -> None:
    """Generation sampling and how the table is written."""
    p.add_argument(
        "--generation",
        action="store_true",
        help="also sample the generation prompts under each edit and score them (generation "
        "entropy, reference score); writes generations.jsonl",
    )
    p.add_argument(
        "--generation-tokens",
        type=int,
        default=100,
        help="tokens per sample: in all, prompt included (--generation-length total), or new",
    )
    p.add_argument(
        "--generation-length",
        default="total",
        choices=GENERATION_LENGTHS,
        help="total: each sample, prompt included, is --generation-tokens long (ROME's protocol); "
        "new: --generation-tokens new tokens after each prompt",
    )
    p.add_argument(
        "--reference-corpus",
        default=None,
        metavar="FILE",
        help="with --generation: the text file (one document a line) the reference score's "
        "tf-idf is fitted on, e.g. Wikipedia articles as in the ROME paper; None: the built-in "
        "facts' statements",
    )
    p.add_argument(
        "--heldout-text",
        default="builtin",
        metavar="builtin|FILE",
        help="the held-out text whose perplexity under each edit gives perplexity_ratio: a short "
        "built-in passage or a text file (e.g. WikiText-2's test file)",
    )
    p.add_argument(
        "--heldout-tokens",
        type=int,
        default=256,
        help="tokens of the held-out text scored after each edit (0: no perplexity_ratio)",
    )
    p.add_argument(
        "--tuned-on",
        default=None,
        metavar="FILE|builtin[:SPLIT]",
        help="the cases the methods' settings were chosen on; refused when they share an edited "
        "subject with --data (never tune and report on the same cases); named in each row",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="run methods that draw at random (replace's partners) with this many seeds; their "
        "row keeps seed 0's means and adds each mean's standard deviation over the seeds",
    )
    p.add_argument(
        "--unrelated-tokens",
        type=int,
        default=20,
        help="tokens sampled after each of a few unrelated prompts under each edit: their "
        "generation entropy is unrelated_entropy (0: not measured)",
    )
    p.add_argument(
        "--no-plus",
        action="store_true",
        help="skip the CounterFact+ neighbourhood (NS+) and neighbourhood KL columns",
    )
    p.add_argument(
        "--append",
        action="store_true",
        help="add this run's rows to the table already in --output (summary.json, summary.md, "
        "cases.jsonl, generations.jsonl, chart.png) instead of replacing it; refused when the "
        "protocols differ, unless --mixed-protocols",
    )
    p.add_argument(
        "--mixed-protocols",
        action="store_true",
        help="allow rows of different protocols (metric family, scoring, generation, statistics, "
        "dtype, model) in one table; the table then gets a protocol column",
    )


def _check_args(args: argparse.Namespace) -> str | None:
    """The first problem with the arguments, found before loading anything expensive."""
    try:
        check_model_spec(args.model)
        check_device(args.device)
        check_output_dir(args.output)
        for flag in POSITIVE_FLAGS:
            check_positive(getattr(args, flag.removeprefix("--").replace("-", "_")), flag)
        args.checkpoints = checkpoint_paths(args.checkpoint, args.method, args.model)
        check_model_layers(args.model, layer_flags(args))
    except ValueError as err:
        return str(err)
    from remedi.methods.rome import CONTEXT_PREFIXES

    top = len(CONTEXT_PREFIXES)
    if args.n_context is not None and not 0 <= args.n_context <= top:
        return f"--n-context must be in 0..{top}, got {args.n_context}"
    for name in args.method:
        cls = registry.method_class(name)
        if cls.requires_statistics and args.no_stats:
            return f"--no-stats: {name} needs the second-moment statistics (its update uses them)"
        n_context = getattr(method_settings(args).get(cls.section or cls.name), "n_context", 0)
        if not 0 <= n_context <= top:
            return f"--{cls.section or cls.name}.n_context must be in 0..{top}, got {n_context}"
    from remedi.methods.second_moment import source_exists

    if not source_exists(args.corpus):
        return f"--corpus: not found: {args.corpus}"
    if args.stats_tokens < 1:
        return f"--stats-tokens must be positive, got {args.stats_tokens}"
    if args.reference_corpus is not None and not Path(args.reference_corpus).is_file():
        return f"--reference-corpus: file not found: {args.reference_corpus}"
    if args.unrelated_tokens < 0:
        return f"--unrelated-tokens must be >= 0, got {args.unrelated_tokens}"
    if args.heldout_tokens < 0:
        return f"--heldout-tokens must be >= 0, got {args.heldout_tokens}"
    if args.heldout_text != "builtin" and not Path(args.heldout_text).is_file():
        return f"--heldout-text: file not found: {args.heldout_text}"
    try:
        schedule = Schedule.parse(args.schedule)
        parse_score_at(args.score_at)
    except ValueError as err:
        return f"--{err}"
    if schedule.accumulates and args.generation:
        return "--generation is measured under --schedule independent only"
    return None


def method_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The config sections of this run: those :func:`main` merged from the config file and
    flags, else the defaults with the flat flags in ``args`` applied."""
    found = getattr(args, "settings", None)
    return found if found is not None else evaluate_config.settings(args)


def layer_flags(args: argparse.Namespace) -> dict[str, list[int | None]]:
    """The layers each layer flag and config section (its ``layer`` or ``layers`` field) asks
    for, to check against the model."""
    found: dict[str, list[int | None]] = {
        "--layer": [args.layer],
        "--memit-layers": list(args.memit_layers or []),
    }
    for name, settings in method_settings(args).items():
        if hasattr(settings, "layer"):
            found[f"--{name}.layer"] = [settings.layer]
        if hasattr(settings, "layers"):
            found[f"--{name}.layers"] = list(settings.layers or [])
    return found


def checkpoint_paths(
    values: Sequence[str], methods: Sequence[str], model: str | None = None
) -> dict[str, Path]:
    """``--checkpoint`` values (``PATH`` or ``METHOD=PATH``) -> a path per trained method asked
    for; a bare path serves the one trained method of the command."""
    trained = [m for m in dict.fromkeys(methods) if registry.method_class(m).trained]
    paths: dict[str, Path] = {}
    for value in values:
        method, sep, path = value.partition("=")
        if not sep:
            if len(trained) != 1:
                raise ValueError(
                    f"--checkpoint {value}: name its method (METHOD=PATH) when the command "
                    f"scores {len(trained)} learned editors"
                )
            method, path = trained[0], value
        if method not in trained:
            raise ValueError(f"--checkpoint {value}: no --method {method} to use it for")
        paths[method] = Path(path)
    for method in trained:
        if method not in paths:
            hint = f"--checkpoint {method}=PATH" if len(trained) > 1 else "--checkpoint PATH"
            raise ValueError(f"--method {method} needs {hint}")
        check_checkpoint_file(paths[method], method=method, model=model)
    return paths


def build_methods(args: argparse.Namespace) -> list[registry.Method]:
    """The registered methods of ``--method``, with their config sections' settings and, for
    trained ones, their ``--checkpoint``."""
    sections = method_settings(args)
    methods = []
    for name in dict.fromkeys(args.method):
        cls = registry.method_class(name)
        settings = None
        if cls.Settings is not registry.NoSettings:
            settings = sections[cls.section or cls.name]
        checkpoint = getattr(args, "checkpoints", {}).get(name) if cls.trained else None
        methods.append(cls(settings=settings, checkpoint=checkpoint))
    return methods


def options(args: argparse.Namespace) -> Options:
    """The evaluation options the flags give (each :class:`Options` field from the flag of the
    same name; ``plus`` from ``--no-plus``)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Options) if f.name in args}
    return Options(**given, plus=not args.no_plus, announce_statistics=True)


def parse(argv: Sequence[str] | None) -> tuple[argparse.Namespace, bool]:
    """The arguments (config file, dotted flags and flags merged) and whether to print the
    configuration."""
    parser = build_parser()
    parsed = evaluate_config.load(sys.argv[1:] if argv is None else argv, parser)
    args = parser.parse_args(parsed.flat_argv)
    args.settings = evaluate_config.settings(args, parsed.sections, parsed.pinned)
    return args, parsed.print_config


def prepare(args: argparse.Namespace) -> tuple[list[EditCase], list[dict[str, Any]]]:
    """Check the arguments and read the cases and the earlier table, before the model loads."""
    if not args.method:
        raise UsageError("--method is required with --task counterfact (e.g. --method none)")
    problem = _check_args(args)
    if problem:
        raise UsageError(problem)
    cases = load_data(args.data)
    missing = [c.case_id for c in cases if c.target_new is None]
    if missing:
        raise UsageError(
            f"--data {args.data}: case {missing[0]} has no target_new (known-facts records "
            "state a fact but request no edit)"
        )
    if args.tuned_on is not None:
        problem = tuning_overlap(load_data(args.tuned_on), cases)
        if problem:
            raise UsageError(f"--tuned-on {args.tuned_on}: {problem} (--data {args.data})")
    earlier = earlier_rows(args.output) if args.append else []
    family = metric_family(cases)
    planned = [row_protocol(m, family, options(args), args.model) for m in build_methods(args)]
    problem = protocol_problem(earlier, planned, args.mixed_protocols)
    if problem:
        raise UsageError(problem)
    return cases, earlier


@interruptible
def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for a usage error, 128 + the signal's
    number after SIGINT or SIGTERM)."""
    quiet_warnings()
    release_freed_memory()
    try:
        args, print_config = parse(argv)
        if print_config:
            evaluate_config.print_config(args, args.settings)
            return 0
        if args.task != "counterfact":
            from remedi.evaluation import tasks

            return tasks.main(args, _check_args)
        cases, earlier = prepare(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        lm = load_lm(args)
        check_layers(lm.arch.num_layers, layer_flags(args), args.model)
    except UsageError as err:
        return fail(err)
    methods = build_methods(args)
    for method in methods:
        try:
            method.bind(lm, args.dtype)
        except (OSError, ValueError) as err:
            return fail(file_error("--checkpoint", str(method.checkpoint), err))
    chosen = options(args)
    chosen.pool = cases
    cases = select_cases(lm, cases, chosen)
    if not cases:
        return fail(f"--data: no cases left to evaluate in {args.data}")
    problem = case_set_problem(earlier, data_fields(cases, chosen)["data_sha256"])
    if problem:
        return fail(problem)
    samples: dict[str, list[list[str]]] = {}
    curves: dict[str, StreamResult] = {}
    rows, records = evaluate(lm, methods, cases, chosen, samples, curves)
    problem = protocol_problem(earlier, rows, args.mixed_protocols)
    if problem:
        return fail(problem)
    rows = [*earlier, *rows]
    extra: dict[str, Sequence[str]] | None = None
    if args.generation:
        extra = {"generations.jsonl": generation_lines(samples, cases)}
    write_outputs(args.output, rows, records, extra, append=bool(earlier))
    print(markdown_table(rows), end="")
    for method in methods:
        stream = curves.get(method.name)
        if stream is not None and not stream.supported:
            print(f"{method.name}: n/a under {stream.schedule} (its edit lives in the input)")
        else:
            print(took_line(method.name, records))
    written = ["summary.json", "summary.md", "cases.jsonl", "chart.png"]
    written += ["generations.jsonl"] if args.generation else []
    if curves:
        written += write_curves(args.output, curves)
    print(f"wrote {args.output / written[0]}, {', '.join(written[1:])}")
    return 0


def generation_lines(samples: dict[str, list[list[str]]], cases: Sequence[EditCase]) -> list[str]:
    """The lines of ``generations.jsonl``: each method's samples per case."""
    return [
        json.dumps({"method": method, "case_id": case.case_id, "samples": texts}) + "\n"
        for method, per_case in samples.items()
        for case, texts in zip(cases, per_case, strict=True)
    ]


if __name__ == "__main__":
    sys.exit(main())
