"""Speed of one REMEDI training step against a floor set by the frozen model itself.

ratio = median(training step) / median(floor), where the training step is loss + backward +
AdamW step on a batch of prompts (attribute representations cached, as in training) and the floor
is one no-grad forward of the same prompt batch plus one forward+backward of it (gradient w.r.t.
the input embeddings, loss = logsumexp of the last position's logits) on the frozen model.
Writes the numbers as JSON to ``--output``.

    python benchmarks/remedi_step.py --output /tmp/remedi_step.json
    python benchmarks/remedi_step.py --random-gptj --device cuda --dtype bfloat16 --output ...
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from remedi.allocator import release_freed_memory
from remedi.atomic import write_json
from remedi.data import load_builtin
from remedi.editors import (
    LossWeights,
    attribute_states,
    build_editor,
    examples_from_case,
    remedi_loss,
)
from remedi.models import LoadedModel, load_model, wrap_model
from remedi.tokens import encode_prompts


def random_gptj(device: str, dtype: torch.dtype) -> LoadedModel:
    """A randomly initialised GPT-J-6B-shaped model with the default model's tokenizer."""
    from transformers import AutoModelForCausalLM, GPTJConfig

    tokenizer = load_model().tokenizer
    config = GPTJConfig(vocab_size=len(tokenizer), n_positions=2048)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return wrap_model(model, tokenizer, spec="random-gptj-6b")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _once(fn: Any, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _time_pair(a: Any, b: Any, repeats: int, device: torch.device) -> tuple[list[float], ...]:
    """Alternate ``a`` and ``b`` (after a warm-up of each) so that load from other processes
    affects both alike."""
    a(), b()
    times_a, times_b = [], []
    for _ in range(repeats):
        times_a.append(_once(a, device))
        times_b.append(_once(b, device))
    return times_a, times_b


def measure(
    lm: LoadedModel, layer: int, batch_size: int, repeats: int, dtype: torch.dtype
) -> dict[str, Any]:
    """Time ``repeats`` REMEDI training steps and floors on ``lm`` (see the module docstring)."""
    device = lm.device
    cases = load_builtin("train")
    examples = [e for c in cases for e in examples_from_case(c)][:batch_size]
    editor = build_editor("affine", lm.arch.hidden_size).to(device)
    torch.nn.init.normal_(editor.linear.weight, std=1e-3)  # a trained-looking, nonzero editor
    optimizer = torch.optim.AdamW(editor.parameters(), lr=1e-3, weight_decay=0.01)
    attribute = attribute_states(
        lm, layer, [e.context for e in examples], [e.entity for e in examples]
    )
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step() -> None:
        with autocast:
            loss = remedi_loss(lm, layer, editor, examples, attribute, LossWeights())["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    batch = encode_prompts(
        lm.tokenizer, [e.prompt for e in examples], [e.entity for e in examples]
    ).to(device)
    embed = lm.model.get_input_embeddings()

    def floor() -> None:
        with autocast:
            with torch.no_grad():
                lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            embeds = embed(batch.input_ids).detach().requires_grad_(True)
            out = lm.model(inputs_embeds=embeds, attention_mask=batch.attention_mask)
            rows = torch.arange(len(examples), device=device)
            loss = out.logits[rows, batch.last_index].float().logsumexp(-1).sum()
        loss.backward()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_times, floor_times = _time_pair(step, floor, repeats, device)
    assert not any(p.requires_grad for p in lm.model.parameters()), "LM parameters require grad"
    step_s, floor_s = statistics.median(step_times), statistics.median(floor_times)
    result: dict[str, Any] = {
        "model": lm.spec,
        "device": str(device),
        "layer": layer,
        "batch_size": len(examples),
        "prompt_tokens": int(batch.attention_mask.sum()),
        "step_s_median": step_s,
        "floor_s_median": floor_s,
        "ratio": step_s / floor_s,
        "examples_per_s": len(examples) / step_s,
        "step_s_all": step_times,
        "floor_s_all": floor_times,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "platform": platform.platform(),
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        result["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
        result["gpu"] = torch.cuda.get_device_name()
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--random-gptj", action="store_true", help="random GPT-J-6B shape")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--layer", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", required=True, type=Path)
    args = parser.parse_args(argv)
    release_freed_memory()
    torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    if args.random_gptj:
        lm = random_gptj(args.device, dtype)
    else:
        lm = load_model(args.model, dtype=args.dtype, device=args.device)
    result = measure(lm, args.layer, args.batch_size, args.repeats, dtype)
    result.update(dtype=args.dtype, threads=args.threads)
    write_json(args.output, result)
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("_all")}, indent=2))
    return result


if __name__ == "__main__":
    main()
