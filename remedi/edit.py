"""Apply weight edits to a model and save it as a Hugging Face directory.

    python -m remedi.edit rome --model gemma3-270m --requests edits.json --output edited/ \\
        --corpus wiki.txt

Requests: ``{prompt, subject, target_new}`` objects (JSON list or JSONL; the prompt holds ``{}``
or the subject) or CounterFact-style records. ROME, FT and KN apply the requests one after the
other; MEMIT, and a trained MEND or KE editor (``--checkpoint``, best-validation weights), write
them all at once (one summed update). Prints each request's top next token and target
probabilities before and after, writes them to ``OUTPUT/edits.json`` and saves the edited model
(safetensors + tokenizer) so that ``load_model(OUTPUT)`` opens it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from remedi.allocator import release_freed_memory
from remedi.data import EditCase
from remedi.methods.requests import EditRequest, load_requests
from remedi.metrics import ScoredRow, row_probabilities
from remedi.models import LoadedModel
from remedi.models.loading import save_tokenizer
from remedi.tokens import top_prediction

METHODS = ("rome", "memit", "kn", "ft", "mend", "ke")
LEARNED = ("mend", "ke")
DEFAULT_THREADS = 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m remedi.edit", description=__doc__.split("\n")[0])
    p.add_argument("method", choices=METHODS)
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--requests", required=True, type=Path)
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--threads",
        type=int,
        default=DEFAULT_THREADS,
        help="torch CPU threads (default 1: edits run tiny batches, which more threads barely "
        "speed up and slow down many times over on a CPU shared with other jobs)",
    )
    p.add_argument("--corpus", default=None, help="text file(s)/dir or hf:NAME for statistics")
    p.add_argument("--stats-tokens", type=int, default=100_000)
    p.add_argument("--no-stats", action="store_true", help="identity C (unwhitened updates)")
    p.add_argument("--layer", type=int, default=None, help="ROME/FT layer")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="MEMIT layers")
    p.add_argument("--ft-eps", type=float, default=None, help="FT-L bound (default: plain FT)")
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="mend/ke: the trained editor's checkpoint (python -m remedi.train fit ...)",
    )
    return p


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _check(args: argparse.Namespace, requests: Sequence[EditRequest]) -> str | None:
    if args.method in ("rome", "memit") and not args.no_stats:
        if args.corpus is None:
            return f"{args.method} needs --corpus PATH for its statistics (or --no-stats)"
        if not str(args.corpus).startswith("hf:") and not Path(args.corpus).exists():
            return f"--corpus: not found: {args.corpus}"
    if args.method in LEARNED:
        if args.checkpoint is None:
            return f"{args.method} needs --checkpoint PATH (a trained {args.method} editor)"
        if not args.checkpoint.is_file():
            return f"--checkpoint: file not found: {args.checkpoint}"
    elif args.checkpoint is not None:
        return f"--checkpoint is for mend and ke, not {args.method}"
    if args.threads < 1:
        return f"--threads must be positive, got {args.threads}"
    if args.stats_tokens < 1:
        return f"--stats-tokens must be positive, got {args.stats_tokens}"
    if args.output.exists() and not args.output.is_dir():
        return f"--output {args.output} exists and is not a directory"
    if args.method == "kn":
        from remedi.methods import knowledge_neurons

        if not callable(getattr(knowledge_neurons, "apply_update", None)):
            return "kn is not available yet (remedi.methods.knowledge_neurons.apply_update)"
        for i, req in enumerate(requests):
            if not req.target_true:
                return f"request {i}: kn needs target_true (the object to replace)"
    return None


def _as_case(index: int, request: EditRequest) -> EditCase:
    return EditCase(
        case_id=index,
        subject=request.subject,
        prompt=request.prompt,
        target_true=request.target_true or "",
        target_new=request.target_new,
    )


def predictions(lm: LoadedModel, requests: Sequence[EditRequest]) -> list[dict[str, Any]]:
    """Per request: the top next token after the rewrite prompt and the targets' probabilities.

    The top token is read from the last position only (262k-entry logits at every position of
    the prompt would cost more than the rest of the forward pass).
    """
    rows = []
    for i, req in enumerate(requests):
        for target in (req.target_new, req.target_true):
            if target:
                rows.append(ScoredRow(i, "rewrite", req.rewrite_prompt, req.subject, target))
    probs = row_probabilities(lm.model, lm.tokenizer, rows)
    out: list[dict[str, Any]] = [{} for _ in requests]
    for row, prob in zip(rows, probs.tolist(), strict=True):
        key = "p_new" if row.target == requests[row.case_index].target_new else "p_true"
        out[row.case_index][key] = prob
    for i, req in enumerate(requests):
        out[i]["top"], out[i]["p_top"] = top_prediction(lm.model, lm.tokenizer, req.rewrite_prompt)
    return out


def apply(
    lm: LoadedModel,
    args: argparse.Namespace,
    requests: Sequence[EditRequest],
    editor: Any = None,
) -> None:
    """Apply every request to ``lm`` in place (the edits are kept); ``editor`` is the trained
    MEND/KE editor for those methods."""
    from remedi.methods import second_moment

    if args.method == "rome":
        from remedi.methods import rome

        hp = rome.RomeHyperParams(layer=args.layer)
        layer = lm.arch.check_layer(
            args.layer if args.layer is not None else rome.default_layer(lm)
        )
        stats = None
        if not args.no_stats:
            stats = second_moment.collect(lm, [layer], args.corpus, n_tokens=args.stats_tokens)
        for req in requests:
            c = None if stats is None else stats[layer]
            rome.apply_edit(lm, req, layer=layer, stats=c, hparams=hp)
    elif args.method == "memit":
        from remedi.methods import memit

        mhp = memit.MemitHyperParams(layers=tuple(args.layers) if args.layers else None)
        layers = list(mhp.layers or memit.default_layers(lm))
        mstats = None
        if not args.no_stats:
            mstats = second_moment.collect(lm, layers, args.corpus, n_tokens=args.stats_tokens)
        memit.apply_edits(lm, requests, stats=mstats, hparams=mhp)
    elif args.method == "ft":
        from remedi.methods import finetune

        fhp = finetune.FinetuneHyperParams(layer=args.layer, eps=args.ft_eps)
        for req in requests:
            finetune.apply_edit(lm, req, fhp)
    elif args.method in LEARNED:
        editor.apply_edit(lm, [_as_case(i, req) for i, req in enumerate(requests)])
    else:
        from remedi.methods import knowledge_neurons

        for i, req in enumerate(requests):
            knowledge_neurons.apply_update(lm, _as_case(i, req))


def save(lm: LoadedModel, output: Path, report: list[dict[str, Any]]) -> None:
    """Write the model, tokenizer and report to a temporary sibling, then swap it in."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=output.name + ".tmp-", dir=output.parent))
    old = None
    try:
        lm.model.save_pretrained(tmp)
        save_tokenizer(lm.tokenizer, tmp)
        (tmp / "edits.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        if output.exists():
            old = output.with_name(output.name + ".old-" + tmp.name.rsplit("-", 1)[-1])
            output.rename(old)
        tmp.rename(output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    release_freed_memory()
    args = build_parser().parse_args(argv)
    try:
        requests = load_requests(args.requests)
    except (OSError, ValueError) as err:
        return _fail(str(err))
    problem = _check(args, requests)
    if problem:
        return _fail(problem)
    torch.set_num_threads(args.threads)
    from remedi.models import load_model

    loading = time.perf_counter()
    try:
        lm = load_model(args.model, dtype=args.dtype, device=args.device)
    except (OSError, ValueError) as err:
        return _fail(f"--model: {err}")
    loaded = time.perf_counter() - loading
    n = lm.arch.num_layers
    for name, layers in (("--layer", [args.layer]), ("--layers", args.layers or [])):
        bad = [x for x in layers if x is not None and not 0 <= x < n]
        if bad:
            return _fail(f"{name} {bad[0]} is out of range (0..{n - 1})")
    editor = None
    if args.method in LEARNED:
        from lightning_modules import load_trained

        try:
            editor = load_trained(args.method, args.checkpoint, lm, args.dtype).editor
        except ValueError as err:
            return _fail(str(err))
    try:
        before = predictions(lm, requests)
    except ValueError as err:
        return _fail(f"--requests: {err}")
    start = time.perf_counter()
    apply(lm, args, requests, editor)
    seconds = time.perf_counter() - start
    after = predictions(lm, requests)
    report = []
    for req, b, a in zip(requests, before, after, strict=True):
        report.append({"request": vars(req), "before": b, "after": a})
        true = (
            f", P(true) {b.get('p_true', 0):.3f} -> {a.get('p_true', 0):.3f}"
            if req.target_true
            else ""
        )
        print(
            f"{req.rewrite_prompt!r}: top {b['top']!r} ({b['p_top']:.3f}) -> "
            f"{a['top']!r} ({a['p_top']:.3f}); P({req.target_new!r}) "
            f"{b['p_new']:.3f} -> {a['p_new']:.3f}{true}"
        )
    saving = time.perf_counter()
    save(lm, args.output, report)
    print(
        f"{args.method}: {len(requests)} edit(s) in {seconds:.1f} s; saved to {args.output} "
        f"(model load {loaded:.1f} s, save {time.perf_counter() - saving:.1f} s)"
    )
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
