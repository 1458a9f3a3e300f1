"""Command line for the locators: causal tracing and knowledge neurons of one fact.

    python -m remedi.locate trace --model gemma3-270m --prompt "Toyota is headquartered in" \
        --subject Toyota --output out/
    python -m remedi.locate kn --prompt "The capital of Poland is" --prompt "Poland's capital is" \
        --prompt "The capital city of Poland is" --subject Poland --target Warsaw --output out/

``trace`` writes ``trace.json`` (tokens, subject_range, target, clean_prob, corrupted_prob and
``scores`` {hidden, mlp, attn} as [tokens][layers]) and ``trace_{kind}.png``; ``kn`` writes
``kn.json`` (attributions, identified neurons) and ``kn.png``. Bad input stops with one line on
stderr and exit code 2 before the model is loaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from remedi.allocator import release_freed_memory
from remedi.atomic import write_json
from remedi.models import DEFAULT_MODEL, LoadedModel, load_model

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class InputError(ValueError):
    """Bad command-line input, reported as one line and exit code 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m remedi.locate", description="Locate a fact inside a causal LM."
    )
    sub = parser.add_subparsers(dest="method", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default=DEFAULT_MODEL, help="model spec (see load_model)")
    common.add_argument("--subject", required=True, help="the subject, as written in the prompt")
    common.add_argument("--output", required=True, type=Path, help="directory for JSON and PNG")
    common.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    common.add_argument("--device", default="cpu")
    common.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    common.add_argument("--seed", type=int, default=0)

    tr = sub.add_parser("trace", parents=[common], help="causal tracing")
    tr.add_argument("--prompt", required=True, help="prompt whose next token is traced")
    tr.add_argument("--target", default=None, help="trace this answer instead of the top-1")
    tr.add_argument("--samples", type=int, default=10, help="noise samples")
    tr.add_argument("--noise-scale", type=float, default=3.0, help="× std of subject embeddings")
    tr.add_argument("--window", type=int, default=10, help="layers restored for mlp/attn")
    tr.add_argument("--kinds", nargs="+", default=["hidden", "mlp", "attn"])
    tr.add_argument("--batch-size", type=int, default=160, help="rows per forward pass")

    kn = sub.add_parser("kn", parents=[common], help="knowledge neurons")
    kn.add_argument(
        "--prompt", required=True, action="append", help="a prompt of the fact (repeatable)"
    )
    kn.add_argument("--target", default=None, help="the answer (default: the top-1 token)")
    kn.add_argument("--steps", type=int, default=20, help="integrated-gradient steps")
    kn.add_argument("--threshold", type=float, default=0.2, help="fraction of the maximum")
    kn.add_argument("--share", type=float, default=0.7, help="fraction of prompts")
    return parser


def _check_model_spec(spec: str) -> None:
    path = Path(spec).expanduser()
    if spec == DEFAULT_MODEL or (_HUB_ID.match(spec) and not path.exists()):
        return
    if spec.endswith(".gguf") and path.is_file():
        return
    if path.is_dir() and (path / "config.json").is_file():
        return
    raise InputError(
        f"--model {spec!r} is neither {DEFAULT_MODEL!r}, a .gguf file, a model directory with "
        "config.json, nor a hub id 'org/name'"
    )


def _check(args: argparse.Namespace) -> None:
    """Validate everything that does not need the model."""
    _check_model_spec(args.model)
    prompts = args.prompt if isinstance(args.prompt, list) else [args.prompt]
    if not args.subject.strip():
        raise InputError("--subject is empty")
    for prompt in prompts:
        if not prompt.strip():
            raise InputError("--prompt is empty")
        if args.subject not in prompt:
            raise InputError(f"--subject {args.subject!r} does not occur in --prompt {prompt!r}")
    if args.target is not None and not args.target.strip():
        raise InputError("--target is empty")
    if args.method == "trace":
        if args.samples < 1:
            raise InputError(f"--samples must be >= 1, got {args.samples}")
        bad = [k for k in args.kinds if k not in ("hidden", "mlp", "attn")]
        if bad:
            raise InputError(f"--kinds {bad[0]!r} is not one of hidden, mlp, attn")
    elif args.steps < 1:
        raise InputError(f"--steps must be >= 1, got {args.steps}")
    if args.output.exists() and not args.output.is_dir():
        raise InputError(f"--output {str(args.output)!r} exists and is not a directory")


def _run_trace(lm: LoadedModel, args: argparse.Namespace) -> dict[str, Any]:
    from remedi.methods import causal_trace, figures

    start = time.perf_counter()
    result = causal_trace.trace(
        lm,
        args.prompt,
        args.subject,
        args.target,
        kinds=args.kinds,
        samples=args.samples,
        noise_scale=args.noise_scale,
        window=args.window,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=True,
    )
    data = result.to_json()
    data["seconds"] = time.perf_counter() - start
    data["model"] = lm.spec
    data["prompt"] = args.prompt
    data["subject"] = args.subject
    write_json(args.output / "trace.json", data)
    for kind in result.scores:
        figures.save_figure(figures.trace_heatmap(result, kind), args.output / f"trace_{kind}.png")
    return data


def _run_kn(lm: LoadedModel, args: argparse.Namespace) -> dict[str, Any]:
    from remedi.methods import figures
    from remedi.methods import knowledge_neurons as kn

    prompts: list[str] = args.prompt
    target = args.target
    if target is None:
        target = _top1(lm, prompts[0])
    start = time.perf_counter()
    found = kn.identify(
        lm,
        prompts,
        target,
        steps=args.steps,
        threshold=args.threshold,
        share=args.share,
        min_prompts=1,
        progress=True,
    )
    neurons, attributions = found.neurons, found.attributions
    mean = torch.stack(attributions).mean(0)
    data: dict[str, Any] = {
        "model": lm.spec,
        "prompts": prompts,
        "subject": args.subject,
        "target": target,
        "neurons": [[n.layer, n.index] for n in neurons],
        "share": found.share,
        "per_prompt": [
            {
                "prompt": p,
                "neurons": [[n.layer, n.index, float(a[n.layer, n.index])] for n in hits],
                "max": float(a.max()),
            }
            for p, a, hits in zip(prompts, attributions, found.per_prompt, strict=True)
        ],
        "attribution": mean.tolist(),
        "seconds": time.perf_counter() - start,
    }
    write_json(args.output / "kn.json", data)
    pairs = [(n.layer, n.index) for n in neurons]
    figures.save_figure(figures.attribution_figure(mean, pairs), args.output / "kn.png")
    return data


def _top1(lm: LoadedModel, prompt: str) -> str:
    from remedi.tokens import top_token

    text = top_token(lm.model, lm.tokenizer, prompt).strip()
    if not text:
        raise InputError(f"the top-1 token after {prompt!r} is blank; pass --target")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (2 for bad input)."""
    release_freed_memory()
    args = _parser().parse_args(argv)
    try:
        _check(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        try:
            lm = load_model(args.model, dtype=args.dtype, device=args.device)
        except (ValueError, OSError) as exc:
            raise InputError(f"--model {args.model!r}: {exc}") from exc
        args.output.mkdir(parents=True, exist_ok=True)
        data = _run_trace(lm, args) if args.method == "trace" else _run_kn(lm, args)
    except (InputError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log.info("wrote %s results to %s", args.method, args.output)
    summary = {k: data[k] for k in ("target", "seconds") if k in data}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
