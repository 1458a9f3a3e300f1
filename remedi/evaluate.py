"""Score editing methods on CounterFact-format cases with the shared metrics; one table row each.

    python -m remedi.evaluate --method none --method rome --data builtin --limit 10 \\
        --output runs/eval

``--data builtin[:split]`` scores the built-in facts (:func:`remedi.data.load_builtin`; the test
split when no split is named), so a fresh clone needs no data file. Methods: none, prefix (the
context ``rewrite_prompt + " " + target_new`` and ". " before every prompt), ft, ft-l, rome,
memit (all cases in one batch, or groups of ``--memit-batch``), kn (knowledge-neuron value-slot
update), replace (the prompts with another subject of the same relation whose true object is
target_new, :mod:`remedi.methods.replace`; cases without one are skipped and counted), and the
learned editors remedi, mend and ke (each from a trained ``--checkpoint``, with
its best-validation weights). Weight editors (MEND and KE too) are applied per case and restored
after it (see :mod:`remedi.methods.registry`).

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
table (:mod:`remedi.evaluations`): the Fact-Med / Fact-Prior probe of a trained REMEDI editor
with its shuffled-label and identity-editor controls, McRae entailment, Bias in Bios generation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from remedi import evaluate_config, protocol
from remedi.allocator import release_freed_memory
from remedi.atomic import atomic_dir
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
    load_lm,
    one_line,
    quiet_warnings,
)
from remedi.data import ALL_SPLITS, EditCase, load_builtin, load_cases
from remedi.methods.registry import STATS_METHODS, MethodResult, prefix_case, score_method
from remedi.metrics import (
    GENERATION_LENGTHS,
    GENERATION_METRIC_NAMES,
    METRIC_NAMES,
    ZSRE_METRIC_NAMES,
    GenerationEdit,
    case_rows,
    case_samples,
    evaluate_cases,
    generation_metrics,
    metric_names,
    row_probabilities,
    summarize_generation,
)
from remedi.models import DEFAULT_MODEL, LoadedModel
from remedi.models.loading import DTYPES
from remedi.signals import interruptible
from remedi.tokens import PromptBatch

log = logging.getLogger(__name__)
Sampler = Callable[..., None]

LEARNED = ("remedi", "mend", "ke")
METHODS = ("none", "prefix", "replace", "ft", "ft-l", "rome", "memit", "kn", *LEARNED)
WEIGHT_METHODS = ("ft", "ft-l", "rome", "memit", "kn")
POSITIVE_FLAGS = (
    "--limit",
    "--threads",
    "--batch-size",
    "--steps",
    "--memit-batch",
    "--ft-steps",
    "--ft-eps",
    "--generation-tokens",
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
        epilog=EPILOG + "\n" + evaluate_config.sections_help(),
    )
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
        choices=METHODS,
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
        help="a trained editor's checkpoint (remedi, mend, ke); repeat as METHOD=PATH to score "
        "several learned editors in one table",
    )
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="the LM's dtype")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N or mps")
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads; None: torch's default"
    )
    p.add_argument("--batch-size", type=int, default=32, help="prompts per scoring forward pass")
    add_statistics_arguments(p)
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
    p.add_argument("--ft-eps", type=float, default=5e-4, help="FT-L's L-infinity bound")
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
    return p


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
    for section in ("rome", "memit"):
        n_context = method_settings(args)[section].n_context
        if section in args.method and not 0 <= n_context <= top:
            return f"--{section}.n_context must be in 0..{top}, got {n_context}"
    from remedi.methods.second_moment import source_exists

    if not source_exists(args.corpus):
        return f"--corpus: not found: {args.corpus}"
    if args.stats_tokens < 1:
        return f"--stats-tokens must be positive, got {args.stats_tokens}"
    return None


def layer_flags(args: argparse.Namespace) -> dict[str, list[int | None]]:
    """The layers each layer flag (and config section) asks for, to check against the model."""
    sections = args.settings
    return {
        "--layer": [args.layer],
        "--memit-layers": list(args.memit_layers or []),
        "--rome.layer": [sections["rome"].layer],
        "--ft.layer": [sections["ft"].layer],
        "--memit.layers": list(sections["memit"].layers or []),
    }


def checkpoint_paths(
    values: Sequence[str], methods: Sequence[str], model: str | None = None
) -> dict[str, Path]:
    """``--checkpoint`` values (``PATH`` or ``METHOD=PATH``) -> a path per learned method asked
    for; a bare path serves the one learned method of the command."""
    learned = [m for m in dict.fromkeys(methods) if m in LEARNED]
    paths: dict[str, Path] = {}
    for value in values:
        method, sep, path = value.partition("=")
        if not sep:
            if len(learned) != 1:
                raise ValueError(
                    f"--checkpoint {value}: name its method (METHOD=PATH) when the command "
                    f"scores {len(learned)} learned editors"
                )
            method, path = learned[0], value
        if method not in learned:
            raise ValueError(f"--checkpoint {value}: no --method {method} to use it for")
        paths[method] = Path(path)
    for method in learned:
        if method not in paths:
            hint = f"--checkpoint {method}=PATH" if len(learned) > 1 else "--checkpoint PATH"
            raise ValueError(f"--method {method} needs {hint}")
        check_checkpoint_file(paths[method], method=method, model=model)
    return paths


def known_cases(lm: LoadedModel, cases: Sequence[EditCase], batch_size: int = 32) -> list[int]:
    """Indices of cases whose rewrite prompt the unedited LM completes with P(true) > P(new)."""
    known = []
    with tqdm(total=len(cases), desc="known cases", unit="case") as bar:
        for first in range(0, len(cases), batch_size):
            group = cases[first : first + batch_size]
            rows = [row for i, case in enumerate(group) for row in case_rows(case, i)[:2]]
            probs = row_probabilities(lm.model, lm.tokenizer, rows, batch_size=batch_size)
            known += [first + i for i in range(len(group)) if probs[2 * i + 1] > probs[2 * i]]
            bar.update(len(group))
    return known


class Runner:
    """Turns the command-line options into hyperparameters and statistics for
    :func:`remedi.methods.registry.score_method`, which applies and scores each method."""

    def __init__(
        self, lm: LoadedModel, args: argparse.Namespace, trained: dict[str, Any] | None = None
    ) -> None:
        self.lm = lm
        self.args = args
        self.trained: dict[str, Any] = dict(trained or {})
        self._stats: dict[int, Any] = {}

    def stats(self, layers: Sequence[int]) -> dict[int, Any] | None:
        if self.args.no_stats:
            return None
        from remedi.methods import second_moment

        wanted = [layer for layer in layers if layer not in self._stats]
        if wanted:
            collected = second_moment.collect(
                self.lm, wanted, self.args.corpus, n_tokens=self.args.stats_tokens
            )
            print(second_moment.source_line(collected, self.args.corpus), file=sys.stderr)
            self._stats.update(collected)
        return {layer: self._stats[layer] for layer in layers}

    def run(self, method: str, cases: Sequence[EditCase]) -> MethodResult:
        """Score ``method`` on ``cases``. With ``--generation``, each case's generation prompts
        are also sampled while its edit is applied (kept in :attr:`samples`)."""
        self.samples: list[list[str]] = [[] for _ in cases]
        if method == "replace":
            return self._replace(cases)
        sampler = self._sampler(method, cases) if self.args.generation else None
        if method == "remedi":
            return self._remedi(cases, sampler)
        if method in ("mend", "ke"):
            editor = self.trained[method].editor
            return score_method(
                self.lm,
                method,
                cases,
                batch_size=self.args.batch_size,
                under_edit=sampler,
                editor=lambda case: editor.apply_edit(self.lm, [case]),
            )
        layer, stats, hparams = self.settings(method)
        return score_method(
            self.lm,
            method,
            cases,
            layer=layer,
            stats=stats,
            hparams=hparams,
            memit_batch=self.args.memit_batch,
            batch_size=self.args.batch_size,
            under_edit=sampler,
        )

    def settings(self, method: str) -> tuple[int | None, Any, Any]:
        """``(layer, stats, hparams)`` of a non-learned method, from its config section (see
        :mod:`remedi.evaluate_config`) with the model's defaults for null layers and clamps."""
        sections = method_settings(self.args)
        layer, stats, hparams = None, None, None
        if method in ("ft", "ft-l"):
            ft = evaluate_config.resolved(self.lm, "ft", sections["ft"])
            eps = evaluate_config.ft_eps(self.args, ft) if method == "ft-l" else None
            hparams = dataclasses.replace(ft, eps=eps)
            layer = hparams.layer
        elif method == "rome":
            hparams = evaluate_config.resolved(self.lm, "rome", sections["rome"])
            layer = hparams.layer
            layer_stats = self.stats([layer])
            stats = None if layer_stats is None else layer_stats[layer]
        elif method == "memit":
            hparams = evaluate_config.resolved(self.lm, "memit", sections["memit"])
            stats = self.stats(list(hparams.layers))
        return layer, stats, hparams

    def _sampler(self, method: str, cases: Sequence[EditCase]) -> Sampler:
        """Samples the generation prompts of the cases at the given indices into
        :attr:`samples`, under the LM's current edit (plus ``edit_for(i)``, for REMEDI)."""
        progress = tqdm(total=len(cases), desc=f"generate {method}", unit="case")

        def sample(indices: range, edit_for: Callable[[int], GenerationEdit] | None = None) -> None:
            for i in indices:
                case = cases[i]
                context = prefix_case(case).prompt.removesuffix(case.prompt)
                self.samples[i] = case_samples(
                    self.lm,
                    case,
                    self.args.generation_tokens,
                    seed=i,
                    edit=edit_for(i) if edit_for is not None else None,
                    context=context if method == "prefix" else "",
                    length=getattr(self.args, "generation_length", "total"),
                )
                progress.update()
            if progress.n == len(cases):
                progress.close()

        return sample

    def _replace(self, cases: Sequence[EditCase]) -> MethodResult:
        """The replace baseline, its partners drawn from every case of ``--data``; generations
        are sampled from the prompts with the partner's subject."""
        from remedi.methods.replace import replaced_cases

        pool = getattr(self.args, "case_pool", None) or cases
        sampler = None
        if self.args.generation:
            swapped = replaced_cases(cases, pool)
            shown = [s or c for s, c in zip(swapped, cases, strict=True)]
            sampler = self._sampler("replace", shown)
        return score_method(
            self.lm,
            "replace",
            cases,
            batch_size=self.args.batch_size,
            under_edit=sampler,
            pool=pool,
        )

    def _remedi(self, cases: Sequence[EditCase], sampler: Sampler | None) -> MethodResult:
        from lightning_modules.remedi_module import case_context
        from remedi.editors.apply import apply_editor, attribute_states, metrics_context

        module = self.trained["remedi"]
        editor = module.editor
        entities, contexts = zip(*(case_context(c) for c in cases), strict=True)
        start = time.perf_counter()
        with torch.no_grad():
            attributes = attribute_states(self.lm, module.layer, contexts, entities)
        alpha = method_settings(self.args)["remedi"].alpha
        edit = metrics_context(self.lm, module.layer, editor, attributes, alpha)
        seconds = [(time.perf_counter() - start) / len(cases)] * len(cases)
        _, per_case = evaluate_cases(
            self.lm.model, self.lm.tokenizer, cases, edit=edit, batch_size=self.args.batch_size
        )
        if sampler is not None:

            def edit_for(i: int) -> GenerationEdit:
                """Case ``i``'s direction at the subject's last token, on the prompt pass."""

                def apply(batch: PromptBatch) -> AbstractContextManager[object]:
                    rows = attributes[i : i + 1].expand(batch.input_ids.shape[0], -1)
                    positions = batch.subject_last
                    layer = module.layer
                    return apply_editor(
                        self.lm, layer, editor, rows, positions, prompt_pass_only=True, alpha=alpha
                    )

                return apply

            sampler(range(len(cases)), edit_for)
        return MethodResult("remedi", per_case, seconds)


def method_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The rome, memit and ft sections of this run: those :func:`main` merged from the config
    file and flags, else the defaults with the flat flags in ``args`` applied."""
    found = getattr(args, "settings", None)
    return found if found is not None else evaluate_config.settings(args)


def summary_row(
    result: MethodResult,
    model: str,
    n_cases: int,
    summary: dict[str, float],
    names: Sequence[str] = METRIC_NAMES,
    fields: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One table row: the method, its metrics ``names`` (the benchmark's columns), timing and,
    when given, its protocol ``fields`` (see :func:`run_protocol`)."""
    seconds = result.edit_seconds
    return {
        "method": result.method,
        "model": model,
        "n_cases": n_cases,
        **{name: summary.get(name) for name in names},
        "seconds_per_edit": statistics.median(seconds) if seconds else 0.0,
        "seconds_per_edit_mean": statistics.fmean(seconds) if seconds else 0.0,
        **(fields or {}),
    }


def run_protocol(args: argparse.Namespace, family: str, method: str) -> dict[str, Any]:
    """The protocol fields of ``method``'s row in this run (:mod:`remedi.protocol`), known
    from the arguments and the data's metric family before anything is loaded."""
    stats = None
    if method in STATS_METHODS:
        stats = protocol.statistics_setting(args.no_stats, args.corpus, args.stats_tokens)
    return {
        "metric_family": family,
        "scoring": protocol.scoring_setting(family),
        "generation": protocol.generation_setting(
            args.generation, args.generation_tokens, getattr(args, "generation_length", "total")
        ),
        "statistics": stats,
        "dtype": args.dtype,
        "model": args.model,
    }


def metric_family(cases: Sequence[EditCase]) -> str:
    """``zsre`` when the data is zsRE (its cases get zsRE's metrics), else ``counterfact``."""
    return "zsre" if any(case.benchmark == "zsre" for case in cases) else "counterfact"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The summary rows as a Markdown table (zsRE columns for a zsRE table), with the protocol
    in a line under it (a protocol column instead when the rows' protocols differ)."""
    zsre = any(name in row for row in rows for name in ZSRE_METRIC_NAMES)
    columns = ["method", "n_cases", *(ZSRE_METRIC_NAMES if zsre else METRIC_NAMES)]
    columns.append("seconds_per_edit")
    columns += [name for name in GENERATION_METRIC_NAMES if any(name in row for row in rows)]
    mixed = bool(protocol.conflicts(rows))
    lines = ["| " + " | ".join(columns + ["protocol"] * mixed) + " |"]
    lines.append("|" + "---|" * (len(columns) + mixed))
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            cells.append(f"{value:.3f}" if isinstance(value, float) else str(value))
        if mixed:
            cells.append(protocol.describe(protocol.protocol_of(row)))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", protocol.table_line(rows)]
    return "\n".join(lines) + "\n"


def evaluate(
    lm: LoadedModel,
    methods: Sequence[str],
    cases: Sequence[EditCase],
    args: argparse.Namespace,
    samples: dict[str, list[list[str]]] | None = None,
    trained: dict[str, Any] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run every method on ``cases``; return the summary rows and the per-case records.

    ``trained`` maps each learned method to its loaded module (see
    :func:`lightning_modules.load_trained`). With ``args.generation``, each method's samples per
    case are also stored in ``samples``.
    """
    from remedi.metrics import summarize

    runner = Runner(lm, args, trained)
    rows: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    family = metric_family(cases)
    names = metric_names("zsre" if family == "zsre" else "counterfact")
    for method in methods:
        result = runner.run(method, cases)
        summary = summarize(result.per_case)
        fields = run_protocol(args, family, method) | {"model": lm.spec}
        rows.append(summary_row(result, lm.spec, len(cases), summary, names, fields))
        section = evaluate_config.METHOD_SECTIONS.get(method)
        if section is not None:
            rows[-1]["settings"] = dataclasses.asdict(method_settings(args)[section])
        if result.skipped:
            rows[-1]["n_cases"] = len(cases) - len(result.skipped)
            rows[-1]["n_skipped"] = len(result.skipped)
        if args.generation:
            texts = runner.samples
            if samples is not None:
                samples[method] = texts
            generation = generation_metrics(cases, texts)
            rows[-1].update(summarize_generation(generation))
            for metrics, extra in zip(result.per_case, generation, strict=True):
                metrics.update(extra)
        for i, (case, metrics) in enumerate(zip(cases, result.per_case, strict=True)):
            record: dict[str, Any] = {
                "method": method,
                "case_id": case.case_id,
                "subject": case.subject,
                "target_true": case.target_true,
                "target_new": case.target_new,
                **metrics,
                "took": took(metrics) if i not in result.skipped else None,
            }
            if i in result.skipped:
                record["skipped"] = True
            if result.edit_seconds:
                record["seconds"] = result.edit_seconds[i]
            records.append(record)
    return rows, records


def load_data(spec: str) -> list[EditCase]:
    """The cases ``--data`` names: ``builtin[:split]`` (the built-in facts, test split by
    default) or a JSON/JSONL file in any layout :func:`remedi.data.load_cases` reads."""
    name, _, split = spec.partition(":")
    if name == "builtin":
        if split and split not in ALL_SPLITS:
            raise UsageError(f"--data {spec}: the built-in splits are {', '.join(ALL_SPLITS)}")
        return load_builtin(split or "test")
    try:
        return load_cases(spec)
    except (OSError, ValueError) as err:
        raise UsageError(file_error("--data", spec, err)) from err


def took(metrics: dict[str, float]) -> bool:
    """Whether a case's edit took: P(target_new) > P(target_true) on the rewrite prompt
    (CounterFact), or every token of target_new is the top-1 prediction there (zsRE)."""
    if "efficacy_accuracy" in metrics:
        return metrics["efficacy_accuracy"] == 1.0
    return metrics["efficacy_score"] > 0


def took_line(method: str, records: Sequence[dict[str, Any]], shown: int = 10) -> str:
    """``METHOD: K/N edits took (ES x)``, naming the cases whose edit did not take (zsRE:
    ``efficacy accuracy x`` instead of ES)."""
    mine = [r for r in records if r["method"] == method and not r.get("skipped")]
    skipped = sum(1 for r in records if r["method"] == method and r.get("skipped"))
    failed = [str(r["case_id"]) for r in mine if not r["took"]]
    line = f"{method}: {len(mine) - len(failed)}/{len(mine)} edits took"
    accuracies = [r["efficacy_accuracy"] for r in mine if "efficacy_accuracy" in r]
    if accuracies:
        line += f" (efficacy accuracy {sum(accuracies) / len(accuracies):.2f})"
    elif mine:
        line += f" (ES {(len(mine) - len(failed)) / len(mine):.2f})"
    if failed:
        more = f" and {len(failed) - shown} more" if len(failed) > shown else ""
        cases = "case" if len(failed) == 1 else "cases"
        line += f"; not taken: {cases} {', '.join(failed[:shown])}{more}"
    if skipped:
        line += (
            f"; {skipped} skipped (no other subject of the same relation has target_new as "
            "its true object)"
        )
    return line


@interruptible
def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for a usage error, 128 + the signal's
    number after SIGINT or SIGTERM)."""
    quiet_warnings()
    release_freed_memory()
    parser = build_parser()
    try:
        parsed = evaluate_config.load(sys.argv[1:] if argv is None else argv, parser)
    except UsageError as err:
        return fail(err)
    args = parser.parse_args(parsed.flat_argv)
    args.settings = evaluate_config.settings(args, parsed.sections, parsed.pinned)
    if parsed.print_config:
        evaluate_config.print_config(args, args.settings)
        return 0
    if args.task != "counterfact":
        from remedi.evaluations import tasks

        return tasks.main(args)
    if not args.method:
        return fail("--method is required with --task counterfact (e.g. --method none)")
    methods = list(dict.fromkeys(args.method))
    problem = _check_args(args)
    if problem:
        return fail(problem)
    try:
        cases = load_data(args.data)
    except UsageError as err:
        return fail(err)
    missing = [c.case_id for c in cases if c.target_new is None]
    if missing:
        return fail(
            f"--data {args.data}: case {missing[0]} has no target_new (known-facts records "
            "state a fact but request no edit)"
        )
    try:
        earlier = earlier_rows(args.output) if args.append else []
    except UsageError as err:
        return fail(err)
    planned = [run_protocol(args, metric_family(cases), method) for method in methods]
    problem = protocol_problem(earlier, planned, args.mixed_protocols)
    if problem:
        return fail(problem)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        lm = load_lm(args)
    except UsageError as err:
        return fail(err)
    try:
        check_layers(lm.arch.num_layers, layer_flags(args), args.model)
    except UsageError as err:
        return fail(err)
    trained: dict[str, Any] = {}
    if args.checkpoints:
        from lightning_modules import load_trained

        for method, path in args.checkpoints.items():
            try:
                trained[method] = load_trained(method, path, lm, args.dtype)
            except (OSError, ValueError) as err:
                return fail(file_error("--checkpoint", path, err))
    args.case_pool = cases
    if args.known_only:
        cases = [cases[i] for i in known_cases(lm, cases, args.batch_size)]
    if args.limit is not None:
        cases = cases[: args.limit]
    if not cases:
        return fail(f"--data: no cases left to evaluate in {args.data}")
    samples: dict[str, list[list[str]]] = {}
    rows, records = evaluate(lm, methods, cases, args, samples, trained)
    problem = protocol_problem(earlier, rows, args.mixed_protocols)
    if problem:
        return fail(problem)
    rows = [*earlier, *rows]
    generations = samples if args.generation else None
    write_outputs(args.output, rows, records, cases, generations, append=bool(earlier))
    print(markdown_table(rows), end="")
    for method in methods:
        print(took_line(method, records))
    written = ["summary.json", "summary.md", "cases.jsonl", "chart.png"]
    written += ["generations.jsonl"] if args.generation else []
    print(f"wrote {args.output / written[0]}, {', '.join(written[1:])}")
    return 0


def earlier_rows(output: Path) -> list[dict[str, Any]]:
    """The rows of the table already in ``output`` (none when it has no summary.json), for
    ``--append``."""
    path = output / "summary.json"
    if not path.exists():
        return []
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"--append: {path} is not valid JSON: {one_line(err)}") from err
    rows = summary if isinstance(summary, list) else [summary]
    if not all(isinstance(row, dict) and "method" in row for row in rows):
        raise UsageError(f"--append: {path} is not a summary.json of remedi.evaluate")
    return rows


def protocol_problem(
    earlier: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]], mixed: bool
) -> str | None:
    """Why ``rows`` (this run's rows or their planned protocols) may not share one table with
    each other and the ``earlier`` rows kept by ``--append``; None when they may."""
    if mixed:
        return None
    if earlier:
        why = protocol.mismatch(earlier, rows)
        if why:
            return (
                f"--append: the table in summary.json has another protocol ({why}); pass "
                "--mixed-protocols to put both in one table"
            )
    found = protocol.conflicts(rows)
    if found:
        name, values = next(iter(found.items()))
        shown = ", ".join(map(str, values))
        return f"the methods' rows differ in {name} ({shown}); pass --mixed-protocols to allow it"
    return None


def write_outputs(
    output: Path,
    rows: Sequence[dict[str, Any]],
    records: Sequence[dict[str, Any]],
    cases: Sequence[EditCase],
    samples: dict[str, list[list[str]]] | None = None,
    append: bool = False,
) -> None:
    """Write the table (JSON, Markdown, bar chart), the per-case records and, when given, the
    generation samples into ``output``, all at once: into a staged copy of the folder that
    replaces it when complete (:func:`~remedi.atomic.atomic_dir`), so an interruption leaves
    the earlier files whole, never new records beside an old table. With ``append``, ``rows``
    is the whole table and the records and samples are added to those already there."""
    from remedi.methods import figures

    with atomic_dir(output, update=True) as staged:

        def write_lines(name: str, lines: Sequence[str]) -> None:
            before = (output / name).read_text() if append and (output / name).exists() else ""
            (staged / name).write_text(before + "".join(lines), encoding="utf-8")

        write_lines("cases.jsonl", [json.dumps(r) + "\n" for r in records])
        if samples is not None:
            lines = [
                json.dumps({"method": method, "case_id": case.case_id, "samples": texts}) + "\n"
                for method, per_case in samples.items()
                for case, texts in zip(cases, per_case, strict=True)
            ]
            write_lines("generations.jsonl", lines)
        summary: Any = rows[0] if len(rows) == 1 else list(rows)
        (staged / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", "utf-8")
        (staged / "summary.md").write_text(markdown_table(rows), encoding="utf-8")
        figures.save_figure(figures.summary_bars(rows), staged / "chart.png")


if __name__ == "__main__":
    sys.exit(main())
