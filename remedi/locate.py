"""Command line for the locators: causal tracing and knowledge neurons of one fact.

    python -m remedi.locate trace --prompt "Toyota is headquartered in" --subject Toyota \\
        --output runs/trace
    python -m remedi.locate kn --prompt "The capital of Poland is" --prompt "Poland's capital is" \\
        --prompt "The capital city of Poland is" --subject Poland --target Warsaw --output runs/kn

``trace`` writes ``trace.json`` (tokens, subject_range, target, clean_prob, corrupted_prob and
``scores`` {hidden, mlp, attn} as [tokens][layers]) and ``trace_{kind}.png``; ``kn`` writes
``kn.json`` (attributions, identified neurons) and ``kn.png``. Both print what they found and the
files they wrote. Bad input stops with one line on stderr and exit code 2 before the model is
loaded.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from remedi.allocator import release_freed_memory
from remedi.atomic import write_json
from remedi.cli import (
    MODEL_LOAD_ERRORS,
    ArgumentParser,
    HelpFormatter,
    UsageError,
    check_device,
    check_model_layers,
    check_model_spec,
    check_output_dir,
    check_positive,
    fail,
    one_line,
    quiet_warnings,
)
from remedi.models import DEFAULT_MODEL, LoadedModel, load_model
from remedi.models.loading import DTYPES

KINDS = ("hidden", "mlp", "attn")
"""What causal tracing restores: the block output, the MLP outputs or the attention outputs."""

TRACE_EPILOG = """\
example:
  python -m remedi.locate trace --prompt "Toyota is headquartered in" --subject Toyota \\
      --output runs/trace

  python -m remedi.locate trace --prompt "{} is headquartered in" --subject Toyota \
      --output runs/trace

Corrupts the subject's embeddings with noise, then restores one hidden state (or a window of MLP
or attention outputs) at a time and records P(target). The noise level is fixed per model:
--noise-scale (3) x the standard deviation of the embeddings of the built-in facts' subjects, the
same for every prompt (ROME's protocol: one level per dataset); --noise sets an absolute level.
A --prompt with "{}" is a template: the subject is put, and located, there. Writes
OUTPUT/trace.json (tokens, subject_range, target, clean_prob, corrupted_prob, noise_std, scores
{kind: [tokens][layers]}) and one heatmap OUTPUT/trace_KIND.png per --kinds entry.
"""

KN_EPILOG = """\
example:
  python -m remedi.locate kn --prompt "The capital of Poland is" --prompt "Poland's capital is" \\
      --prompt "The capital city of Poland is" --subject Poland --target Warsaw --output runs/kn

Integrated-gradient attribution of each MLP neuron to P(target) on every prompt; neurons above
--threshold of the largest attribution on at least --share of the prompts are the fact's
knowledge neurons. Writes OUTPUT/kn.json (neurons as [layer, index], per-prompt attributions, the
mean attribution [layers][neurons]) and OUTPUT/kn.png.
"""


EPILOG = """\
examples:
  python -m remedi.locate trace --prompt "Toyota is headquartered in" --subject Toyota \\
      --output runs/trace
  python -m remedi.locate kn --prompt "The capital of Poland is" --prompt "Poland's capital is" \\
      --subject Poland --target Warsaw --output runs/kn

python -m remedi.locate trace --help and python -m remedi.locate kn --help list their flags.
"""


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m remedi.locate",
        description="Locate a fact inside a causal LM: causal tracing (trace) or knowledge neurons "
        "(kn).",
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="method", required=True, metavar="{trace,kn}")
    common = ArgumentParser(add_help=False)
    common.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="the LM: gemma3-270m, a hub id org/name, a model directory or a .gguf file",
    )
    common.add_argument("--subject", required=True, help="the subject, as written in the prompt")
    common.add_argument(
        "--output", required=True, type=Path, help="directory for the JSON and PNG files (created)"
    )
    common.add_argument("--dtype", default="float32", choices=list(DTYPES), help="the LM's dtype")
    common.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N or mps")
    common.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads; None: torch's default"
    )
    common.add_argument("--seed", type=int, default=0, help="seed of the noise (trace)")

    tr = sub.add_parser(
        "trace",
        parents=[common],
        help="causal tracing: which hidden states carry the fact",
        description="Causal tracing of one fact: which hidden states carry it.",
        epilog=TRACE_EPILOG,
        formatter_class=HelpFormatter,
    )
    tr.add_argument(
        "--prompt",
        required=True,
        help='the prompt whose next token is traced; with "{}", a template for the subject',
    )
    tr.add_argument(
        "--target", default=None, help="trace this answer; None: the model's top-1 next token"
    )
    tr.add_argument("--samples", type=int, default=10, help="noise samples averaged")
    tr.add_argument(
        "--noise-scale",
        type=float,
        default=3.0,
        help="noise std as a multiple of the std of the built-in facts' subject embeddings "
        "(one level per model, the same for every prompt)",
    )
    tr.add_argument(
        "--noise",
        type=float,
        default=None,
        help="absolute noise std, instead of --noise-scale; None: use --noise-scale",
    )
    tr.add_argument(
        "--window", type=int, default=10, help="consecutive layers restored together for mlp/attn"
    )
    tr.add_argument(
        "--kinds",
        nargs="+",
        default=list(KINDS),
        choices=KINDS,
        help="what to restore: block outputs (hidden), MLP outputs, attention outputs",
    )
    tr.add_argument("--batch-size", type=int, default=160, help="rows per forward pass")

    kn = sub.add_parser(
        "kn",
        parents=[common],
        help="knowledge neurons: which MLP neurons express the fact",
        description="Knowledge neurons of one fact: the MLP neurons that express it.",
        epilog=KN_EPILOG,
        formatter_class=HelpFormatter,
    )
    kn.add_argument(
        "--prompt",
        required=True,
        action="append",
        help="a prompt of the fact ending where the target follows; repeat for several",
    )
    kn.add_argument(
        "--target", default=None, help="the answer; None: the top-1 token after the first prompt"
    )
    kn.add_argument("--steps", type=int, default=20, help="integrated-gradient steps")
    kn.add_argument(
        "--threshold",
        type=float,
        default=0.2,
        help="a neuron counts on a prompt above this fraction of the prompt's largest attribution",
    )
    kn.add_argument(
        "--share",
        type=float,
        default=0.7,
        help="a knowledge neuron counts on at least this fraction of the prompts",
    )
    return parser


def _check(args: argparse.Namespace) -> None:
    """Validate everything that does not need the model; raises :class:`UsageError`."""
    check_model_spec(args.model)
    check_model_layers(args.model, {})
    check_device(args.device)
    check_output_dir(args.output)
    check_positive(args.threads, "--threads")
    prompts = args.prompt if isinstance(args.prompt, list) else [args.prompt]
    if not args.subject.strip():
        raise UsageError("--subject is empty")
    for prompt in prompts:
        if not prompt.strip():
            raise UsageError("--prompt is empty")
        template = args.method == "trace" and "{}" in prompt
        if template and prompt.count("{}") != 1:
            raise UsageError(f"--prompt {prompt!r} must hold one '{{}}' for the subject")
        if not template and args.subject not in prompt:
            raise UsageError(f"--subject {args.subject!r} does not occur in --prompt {prompt!r}")
    if args.target is not None and not args.target.strip():
        raise UsageError("--target is empty")
    if args.method == "trace":
        for flag in ("--samples", "--window", "--batch-size", "--noise-scale", "--noise"):
            check_positive(getattr(args, flag.removeprefix("--").replace("-", "_")), flag)
    else:
        check_positive(args.steps, "--steps")
        for flag, value in (("--threshold", args.threshold), ("--share", args.share)):
            if not 0 < value <= 1:
                raise UsageError(f"{flag} must be in (0, 1], got {value}")


def _run_trace(lm: LoadedModel, args: argparse.Namespace) -> tuple[str, list[Path]]:
    """Trace, write the JSON and heatmaps; return a line saying what was found, and the files."""
    from remedi.methods import causal_trace, figures
    from remedi.tokens import fill_template

    start = time.perf_counter()
    prompt, subject_start = args.prompt, None
    if "{}" in prompt:
        prompt, subject_start = fill_template(prompt, args.subject)
    result = causal_trace.trace(
        lm,
        prompt,
        args.subject,
        args.target,
        subject_start=subject_start,
        kinds=args.kinds,
        samples=args.samples,
        noise_scale=args.noise_scale,
        noise_std=args.noise,
        window=args.window,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=True,
    )
    data = result.to_json()
    data["seconds"] = time.perf_counter() - start
    data["model"] = lm.spec
    data["prompt"] = prompt
    data["subject"] = args.subject
    written = [args.output / "trace.json"]
    write_json(written[0], data)
    for kind in result.scores:
        written.append(args.output / f"trace_{kind}.png")
        figures.save_figure(figures.trace_heatmap(result, kind), written[-1])
    found = (
        f"trace: P({result.target!r}) {result.clean_prob:.3f} clean, "
        f"{result.corrupted_prob:.3f} with the subject corrupted ({data['seconds']:.1f} s)"
    )
    return found, written


def _run_kn(lm: LoadedModel, args: argparse.Namespace) -> tuple[str, list[Path]]:
    """Find the knowledge neurons, write the JSON and figure; return a line saying what was
    found, and the files."""
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
    written = [args.output / "kn.json", args.output / "kn.png"]
    write_json(written[0], data)
    pairs = [(n.layer, n.index) for n in neurons]
    figures.save_figure(figures.attribution_figure(mean, pairs), written[1])
    named = ", ".join(f"L{layer}#{index}" for layer, index in pairs[:8])
    named += f" and {len(pairs) - 8} more" if len(pairs) > 8 else ""
    line = (
        f"kn: {len(pairs)} knowledge neuron(s) for {target!r}"
        + (f": {named}" if pairs else "")
        + f" ({data['seconds']:.1f} s)"
    )
    return line, written


def _top1(lm: LoadedModel, prompt: str) -> str:
    from remedi.tokens import top_token

    text = top_token(lm.model, lm.tokenizer, prompt).strip()
    if not text:
        raise UsageError(f"the top-1 token after {prompt!r} is blank; pass --target")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (2 for bad input)."""
    quiet_warnings()
    release_freed_memory()
    args = _parser().parse_args(argv)
    try:
        _check(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        try:
            lm = load_model(args.model, dtype=args.dtype, device=args.device)
        except MODEL_LOAD_ERRORS as exc:
            raise UsageError(f"--model {args.model!r}: {one_line(exc)}") from exc
        args.output.mkdir(parents=True, exist_ok=True)
        found, written = _run_trace(lm, args) if args.method == "trace" else _run_kn(lm, args)
    except ValueError as exc:
        return fail(one_line(exc))
    print(found)
    print(f"wrote {written[0]}, {', '.join(path.name for path in written[1:])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
