"""Apply edits to a model and save it as a Hugging Face directory (or, for a memory editor, the
memory that edits it).

    python -m remedi.edit rome --requests examples/requests.jsonl --output runs/edited

Requests: ``{prompt, subject, target_new[, target_true]}`` objects (JSON list or JSONL; the prompt
holds ``{}`` or the subject) or CounterFact-style records. ROME, FT and KN apply the requests one
after the other; MEMIT, and a trained MEND or KE editor (``--checkpoint``, best-validation
weights), write them all at once (one summed update). Prints each request's top next token and
target probabilities before and after and whether its edit took (see :func:`edit_took`), writes
them to ``OUTPUT/edits.json`` and saves the edited model (safetensors + tokenizer) so that
``load_model(OUTPUT)`` opens it. A memory editor (SERAC, ``--checkpoint``) changes no weight: the
output holds its editor, the requests and the model's name, which
:func:`remedi.methods.serac_editor.load_memory` reopens. Exits with 1 when an edit did not take
(the model is saved all the same) unless ``--allow-failed``, and with 2 on a usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from remedi import registry
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
from remedi.methods.requests import EditRequest, load_requests
from remedi.metrics import EditContext, ScoredRow, row_probabilities
from remedi.metrics.rows import scored_chunks
from remedi.models import DEFAULT_MODEL, LoadedModel
from remedi.models.loading import DTYPES, save_tokenizer
from remedi.signals import interruptible
from remedi.tokens import (
    ContinuationBatch,
    encode_continuations,
    final_hidden,
    top_prediction,
    unembed,
)

DEFAULT_THREADS = 1
MEMORY_FILE = "memory.json"
"""A memory editor's saved edits (with the method and model), in its output folder."""
MEMORY_EDITOR = "editor"
"""The folder (beside :data:`MEMORY_FILE`) holding a memory editor's trained weights."""
EDIT_FAILED = 1
"""Exit code when an edit did not take (without ``--allow-failed``)."""


EPILOG = """\
examples:
  python -m remedi.edit rome --requests examples/requests.jsonl --output runs/edited
  python -m remedi.edit memit --requests examples/requests.jsonl --output runs/edited-memit
  python -m remedi.train fit --config configs/mend/quickstart.yaml   # trains a MEND editor, then
  python -m remedi.edit mend --checkpoint checkpoints/mend/quickstart/last.ckpt \\
      --requests examples/requests.jsonl --output runs/edited-mend

--requests: a .jsonl file (one request a line) or a .json file (a list of them); a request is
  {"prompt": "{} is headquartered in", "subject": "Toyota", "target_new": "Paris",
   "target_true": "Japan"}
"prompt" holds "{}" where the subject goes, or the subject itself. "target_true", the answer
being replaced, is optional (kn needs it). Records of the layouts remedi.evaluate reads
(CounterFact, MEND, zsRE; see python -m remedi.evaluate --help) work too.

An edit took when, after it, P(target_new) > P(target_true) on the prompt; for a request without
target_true, when target_new's first token is the model's top-1 next token. Exit code 1 when an
edit did not take (the edited model is saved all the same) unless --allow-failed; 2 for a usage
error (nothing loaded or written).

outputs in --output: the edited model (config.json, model.safetensors, tokenizer files; open it
with --model OUTPUT or remedi.models.load_model("OUTPUT")) and edits.json (per request: the
request, the predictions before and after, and "took").
"""


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m remedi.edit`` (also documents the request format)."""
    p = ArgumentParser(
        prog="python -m remedi.edit",
        description=__doc__.split("\n")[0],
        epilog=EPILOG,
    )
    p.add_argument(
        "method",
        choices=weight_methods(),
        help="the editing method (one that writes weights, or keeps a memory)",
    )
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="the LM: gemma3-270m, a hub id org/name, a model directory or a .gguf file",
    )
    p.add_argument(
        "--requests", required=True, type=Path, help="a JSON/JSONL file of edit requests (below)"
    )
    p.add_argument(
        "--output",
        required=True,
        type=Path,
        help="directory the edited model and edits.json are saved to (replaced if it exists)",
    )
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="the LM's dtype")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N or mps")
    p.add_argument(
        "--threads",
        type=int,
        default=DEFAULT_THREADS,
        help="torch CPU threads: edits run tiny batches, which more threads barely speed up and "
        "slow down many times over on a CPU shared with other jobs",
    )
    add_statistics_arguments(p)
    p.add_argument(
        "--layer",
        type=int,
        default=None,
        help="the layer ROME and FT edit; None: ROME's default layer for the model",
    )
    p.add_argument(
        "--layers",
        type=int,
        nargs="+",
        default=None,
        help="the layers MEMIT spreads its update over; None: its default layers for the model",
    )
    p.add_argument(
        "--ft-eps", type=float, default=None, help="ft: an L-infinity bound (FT-L); None: plain FT"
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="a trained editor's checkpoint (python -m remedi.train fit ...) or shipped folder",
    )
    p.add_argument(
        "--allow-failed",
        action="store_true",
        help="exit with 0 even when an edit did not take",
    )
    return p


def _check(args: argparse.Namespace, requests: Sequence[EditRequest]) -> str | None:
    """The first problem with the arguments and requests, found before loading the model."""
    try:
        check_model_spec(args.model)
        check_device(args.device)
        check_output_dir(args.output)
        check_positive(args.threads, "--threads")
        check_positive(args.ft_eps, "--ft-eps")
        check_model_layers(args.model, _layer_flags(args))
    except UsageError as err:
        return str(err)
    from remedi.methods.second_moment import source_exists

    if not source_exists(args.corpus):
        return f"--corpus: not found: {args.corpus}"
    cls = registry.method_class(args.method)
    if cls.trained:
        if args.checkpoint is None:
            return f"{args.method} needs --checkpoint PATH (a trained {args.method} editor)"
        try:
            check_checkpoint_file(args.checkpoint, method=args.method, model=args.model)
        except UsageError as err:
            return str(err)
    elif args.checkpoint is not None:
        trained = ", ".join(m for m in weight_methods() if registry.method_class(m).trained)
        return f"--checkpoint is for {trained}, not {args.method}"
    if args.stats_tokens < 1:
        return f"--stats-tokens must be positive, got {args.stats_tokens}"
    return cls.check_requests(requests)


def _layer_flags(args: argparse.Namespace) -> dict[str, list[int | None]]:
    """The layers ``--layer`` and ``--layers`` ask for, to check against the model."""
    return {"--layer": [args.layer], "--layers": list(args.layers or [])}


def predictions(
    lm: LoadedModel, requests: Sequence[EditRequest], edit: EditContext | None = None
) -> list[dict[str, Any]]:
    """Per request: the top next token after the rewrite prompt and the targets' probabilities,
    under ``edit`` (a memory editor's routing; None: the model as it is).

    The top token is read from the last position only (262k-entry logits at every position of
    the prompt would cost more than the rest of the forward pass).
    """
    rows = []
    for i, req in enumerate(requests):
        for target in (req.target_new, req.target_true):
            if target:
                rows.append(ScoredRow(i, "rewrite", req.rewrite_prompt, req.subject, target))
    probs = row_probabilities(lm.model, lm.tokenizer, rows, edit)
    out: list[dict[str, Any]] = [{} for _ in requests]
    for row, prob in zip(rows, probs.tolist(), strict=True):
        key = "p_new" if row.target == requests[row.case_index].target_new else "p_true"
        out[row.case_index][key] = prob
    if edit is None:
        for i, req in enumerate(requests):
            out[i]["top"], out[i]["p_top"] = top_prediction(
                lm.model, lm.tokenizer, req.rewrite_prompt
            )
        return out
    firsts = [
        next(j for j, row in enumerate(rows) if row.case_index == i) for i in range(len(requests))
    ]
    chosen = [rows[j] for j in firsts]
    for indices, (ids, top) in scored_chunks(lm.model, lm.tokenizer, chosen, edit, scorer=_top):
        for j, token, p in zip(indices, ids.tolist(), top.tolist(), strict=True):
            out[j]["top"], out[j]["p_top"] = lm.tokenizer.decode([token]), p
    return out


def _top(model: torch.nn.Module, batch: ContinuationBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The top next token after each row's prompt and its probability."""
    device = next(model.parameters()).device
    batch = batch.to(device)
    hidden = final_hidden(model, batch.input_ids, batch.attention_mask)
    last = hidden[torch.arange(len(hidden), device=device), batch.last_prompt_index]
    probs = torch.softmax(unembed(model, last).float(), dim=-1)
    top = probs.max(dim=-1)
    return top.indices.cpu(), top.values.cpu()


def first_target_token(tokenizer: PreTrainedTokenizerBase, request: EditRequest) -> str:
    """The first token of ``target_new`` after the rewrite prompt, decoded, tokenised as the
    scores tokenise it (so it compares with :func:`predictions`' ``top``)."""
    batch = encode_continuations(tokenizer, [request.rewrite_prompt], [request.target_new])
    return str(tokenizer.decode([int(batch.target_ids[0, 0])]))


def edit_took(request: EditRequest, after: dict[str, Any], first_token: str) -> bool:
    """Whether the edit of ``request`` took, from :func:`predictions` after it.

    With a ``target_true``: P(target_new) > P(target_true) on the rewrite prompt (CounterFact's
    efficacy). Without one there is no rival answer to beat, so: ``target_new``'s first token
    (``first_token``) is the top-1 next token. Probabilities alone cannot say it without a rival,
    and the top-1 test is what a user sees when generating from the prompt.
    """
    if request.target_true:
        return bool(after["p_new"] > after["p_true"])
    return bool(after["top"] == first_token)


def _prob(p: float) -> str:
    return f"{p:.2f}" if p >= 0.01 else f"{p:.1e}"


def outcome(request: EditRequest, after: dict[str, Any], took: bool) -> str:
    """The numbers :func:`edit_took` decided by, e.g. ``P(new) 0.01 <= P(true) 0.30``."""
    if request.target_true:
        sign = ">" if took else "<="
        return f"P(new) {_prob(after['p_new'])} {sign} P(true) {_prob(after['p_true'])}"
    verdict = "begins" if took else "not"
    return (
        f"top {after['top']!r} {_prob(after['p_top'])}, {verdict} {request.target_new!r}; "
        f"P(new) {_prob(after['p_new'])}"
    )


def summary_line(
    method: str, requests: Sequence[EditRequest], report: Sequence[dict[str, Any]], shown: int = 5
) -> str:
    """``METHOD: K/N edits took; failed: request I 'PROMPT' (numbers), ...``."""
    failed = [i for i, entry in enumerate(report) if not entry["took"]]
    line = f"{method}: {len(report) - len(failed)}/{len(report)} edits took"
    if failed:
        named = [
            f"request {i} {requests[i].rewrite_prompt!r} ({report[i]['outcome']})"
            for i in failed[:shown]
        ]
        more = f"; and {len(failed) - shown} more (see edits.json)" if len(failed) > shown else ""
        line += f"; failed: {', '.join(named)}{more}"
    return line


def weight_methods() -> list[str]:
    """The registered methods whose edits live in the weights (so the edited model can be
    saved) or in a memory (saved beside the editor)."""
    return [
        name
        for name in registry.names()
        if registry.method_class(name).writes_weights or registry.method_class(name).keeps_memory
    ]


def build_method(args: argparse.Namespace) -> registry.Method:
    """The registered method of the command, its settings from the flags that its settings
    have (``--layer``, ``--layers``, ``--ft-eps``), the statistics from ``--corpus``."""
    cls = registry.method_class(args.method)
    flags = {"layer": args.layer, "layers": tuple(args.layers or ()) or None, "eps": args.ft_eps}
    names = {f.name for f in dataclasses.fields(cls.Settings)}
    given = {k: v for k, v in flags.items() if k in names and v is not None}
    method = cls(checkpoint=args.checkpoint, **given)
    method.environment = registry.Environment(
        statistics=registry.Statistics(
            args.corpus,
            args.stats_tokens,
            enabled=not args.no_stats,
            announce=lambda line: print(line, file=sys.stderr),
        )
    )
    return method


def apply(
    lm: LoadedModel, method: registry.Method, requests: Sequence[EditRequest]
) -> EditContext | None:
    """Write every request into ``lm``'s weights and keep the edits (the model is saved
    edited); for a memory editor, put them all in one memory and return the routing that the
    model runs under afterwards."""
    cases = registry.as_cases(requests)
    if method.keeps_memory:
        method.begin_stream(lm)
        method.remember(lm, cases)
        return method.stream_edit(lm)
    assert isinstance(method, registry.WeightMethod)
    method.write(lm, cases)
    return None


def save(lm: LoadedModel, output: Path, report: list[dict[str, Any]]) -> None:
    """Write the model, tokenizer and report to a temporary sibling, then swap it in."""
    with atomic_dir(output) as tmp:
        lm.model.save_pretrained(tmp)
        save_tokenizer(lm.tokenizer, tmp)
        (tmp / "edits.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def save_memory(
    args: argparse.Namespace, requests: Sequence[EditRequest], report: list[dict[str, Any]]
) -> None:
    """A memory editor's output: the model is unchanged, so the folder holds what reloads the
    edits onto it (:func:`remedi.methods.serac_editor.load_memory`): the editor (as a shipped
    checkpoint folder), the requests and which model they edit, and the report."""
    from remedi import checkpoints

    with atomic_dir(args.output) as tmp:
        checkpoints.export(args.checkpoint, tmp / MEMORY_EDITOR)
        saved = {
            "method": args.method,
            "model": args.model,
            "requests": [vars(r) for r in requests],
        }
        (tmp / MEMORY_FILE).write_text(json.dumps(saved, indent=2) + "\n", encoding="utf-8")
        (tmp / "edits.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


@interruptible
def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (1: an edit did not take, 2: usage error,
    128 + the signal's number after SIGINT or SIGTERM)."""
    quiet_warnings()
    release_freed_memory()
    args = build_parser().parse_args(argv)
    try:
        requests = load_requests(args.requests)
    except (OSError, ValueError) as err:
        return fail(file_error("--requests", args.requests, err))
    problem = _check(args, requests)
    if problem:
        return fail(problem)
    torch.set_num_threads(args.threads)
    loading = time.perf_counter()
    try:
        lm = load_lm(args)
    except UsageError as err:
        return fail(err)
    loaded = time.perf_counter() - loading
    try:
        check_layers(lm.arch.num_layers, _layer_flags(args), args.model)
    except UsageError as err:
        return fail(err)
    method = build_method(args)
    try:
        method.bind(lm, args.dtype)
    except (OSError, ValueError) as err:
        return fail(file_error("--checkpoint", args.checkpoint, err))
    try:
        before = predictions(lm, requests)
        first_tokens = [first_target_token(lm.tokenizer, req) for req in requests]
    except ValueError as err:
        return fail(f"--requests {args.requests}: {one_line(err)}")
    start = time.perf_counter()
    routing = apply(lm, method, requests)
    seconds = time.perf_counter() - start
    after = predictions(lm, requests, routing)
    report = []
    for req, b, a, first in zip(requests, before, after, first_tokens, strict=True):
        took = edit_took(req, a, first)
        report.append(
            {
                "request": vars(req),
                "before": b,
                "after": a,
                "took": took,
                "outcome": outcome(req, a, took),
            }
        )
        true = (
            f", P(true) {b.get('p_true', 0):.3f} -> {a.get('p_true', 0):.3f}"
            if req.target_true
            else ""
        )
        print(
            f"{req.rewrite_prompt!r}: top {b['top']!r} ({b['p_top']:.3f}) -> "
            f"{a['top']!r} ({a['p_top']:.3f}); P({req.target_new!r}) "
            f"{b['p_new']:.3f} -> {a['p_new']:.3f}{true}; " + ("took" if took else "did not take")
        )
    print(summary_line(args.method, requests, report))
    saving = time.perf_counter()
    if method.keeps_memory:
        save_memory(args, requests, report)
    else:
        save(lm, args.output, report)
    print(
        f"{args.method}: {len(requests)} edit(s) in {seconds:.1f} s; saved to {args.output} "
        f"(model load {loaded:.1f} s, save {time.perf_counter() - saving:.1f} s)"
    )
    failed = sum(not entry["took"] for entry in report)
    if failed and not args.allow_failed:
        print(
            f"error: {failed} of {len(report)} edits did not take (the edited model is saved in "
            f"{args.output} all the same); pass --allow-failed to accept that",
            file=sys.stderr,
        )
        return EDIT_FAILED
    return 0


def exit_now(code: int) -> NoReturn:
    """End the process without the interpreter's teardown of torch and transformers.

    The teardown takes about a second; by now every output file is written and closed, so only
    the standard streams and logging need flushing.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
