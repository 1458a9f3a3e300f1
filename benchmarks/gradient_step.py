"""Speed of one MEND (or KE) training step against the frozen LM's passes that the step needs.

ratio = median(training step) / median(LM passes), where the training step is
:meth:`lightning_modules.gradient_editor.GradientEditorModule.loss_terms` + backward + Adam step
on a batch of CounterFact cases (the unedited locality states cached, as in training), and the
LM passes are the same three passes without the editor: the edit loss's forward and backward
for ``(u, δ)`` (:func:`remedi.editors.gradient.token_gradients`), a forward and backward of the
rewrite and paraphrase rows, and a forward and backward of the locality rows with their KL, the
gradients taken with respect to zeros added at the edited layers' MLP outputs (where the
editor's updates enter). Writes JSON to ``--output``.

    python benchmarks/gradient_step.py --data $data/counterfact-train.mend_format.json \\
        --config configs/mend/counterfact_gemma3.yaml --output runs/mend_step.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml
from remedi_step import _time_pair

from lightning_modules import KeModule, MendModule
from lightning_modules.gradient_editor import GradientEditorModule, edit_rows
from remedi.atomic import write_json
from remedi.data import load_cases
from remedi.data.neighbourhoods import pool_neighbourhoods
from remedi.editors.gradient import token_gradients
from remedi.editors.locality import locality_cells, locality_rows, training_texts
from remedi.editors.training import kl_divergence
from remedi.hooks import Site, intervene
from remedi.tokens import encode_continuations, final_hidden, score_continuations


@contextmanager
def zeros_at_mlp(module: GradientEditorModule) -> Iterator[list[torch.Tensor]]:
    """Add zeros that require grad at each edited layer's MLP output (the updates' entry)."""
    added: list[torch.Tensor] = []

    def add(state: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros_like(state, requires_grad=True)
        added.append(zero)
        return state + zero

    edit = {Site("mlp", layer): add for layer in module.layers}
    with intervene(module.lm.arch, edit=edit):
        yield added


def lm_passes(module: GradientEditorModule, cases: list[Any], draw: str) -> Callable[[], None]:
    """The frozen LM's passes of one training step, without the editor."""
    lm = module.lm

    def run() -> None:
        token_gradients(lm, module.layers, cases, module.positions)
        prompts, targets, _ = edit_rows(cases)
        batch = encode_continuations(lm.tokenizer, prompts, targets).to(lm.device)
        with zeros_at_mlp(module):
            loss = -score_continuations(lm.model, batch).mean.mean()
        loss.backward()
        prompts, answers, _ = locality_rows(
            cases, module.loc_prompts, module.unrelated_prompts, draw
        )
        batch = encode_continuations(lm.tokenizer, prompts, answers).to(lm.device)
        rows, cols = locality_cells(batch, module.loc_positions)
        keys = list(zip(prompts, answers, strict=True))
        before = module.unedited.gather(lm, batch, keys, rows, cols)
        with zeros_at_mlp(module):
            after = final_hidden(lm.model, batch.input_ids, batch.attention_mask)[rows, cols]
            kl = kl_divergence(lm.model, before, after)
        kl.backward()

    return run


def build(config: Path, overrides: dict[str, Any]) -> GradientEditorModule:
    """The module a training config describes (its ``model.init_args``, with ``overrides``)."""
    spec = yaml.safe_load(config.read_text())["model"]
    cls = {"MendModule": MendModule, "KeModule": KeModule}[spec["class_path"].split(".")[-1]]
    return cls(**{**spec.get("init_args", {}), **overrides})


def measure(
    module: GradientEditorModule, cases: list[Any], batch_size: int, repeats: int
) -> dict[str, Any]:
    module.unedited.fill(module.lm, training_texts(cases), module.eval_batch_size)
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Optimizer)
    batches = [cases[i : i + batch_size] for i in range(0, len(cases), batch_size)]
    turn = [0]

    def step() -> None:
        batch = batches[turn[0] % len(batches)]
        terms = module.loss_terms(batch, draw=str(turn[0]))
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()

    def floor() -> None:
        batch = batches[turn[0] % len(batches)]
        lm_passes(module, batch, str(turn[0]))()
        turn[0] += 1

    step_times, floor_times = _time_pair(step, floor, repeats, module.lm.device)
    step_s, floor_s = statistics.median(step_times), statistics.median(floor_times)
    return {
        "method": module.method,
        "layers": module.layers,
        "positions": module.positions,
        "loc_prompts": module.loc_prompts,
        "unrelated_prompts": module.unrelated_prompts,
        "loc_positions": module.loc_positions,
        "batch_size": batch_size,
        "step_s_median": step_s,
        "lm_passes_s_median": floor_s,
        "ratio": step_s / floor_s,
        "examples_per_s": batch_size / step_s,
        "epoch_hours_10000": 10000 / (batch_size / step_s) / 3600,
        "step_s_all": step_times,
        "lm_passes_s_all": floor_times,
        "unedited_cache_mib": module.unedited.nbytes / 2**20,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="CounterFact training records")
    parser.add_argument("--config", type=Path, default=Path("configs/mend/counterfact_gemma3.yaml"))
    parser.add_argument("--model", default=None, help="override the config's model")
    parser.add_argument("--cases", type=int, default=400, help="first N records (pooled)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", required=True, type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    overrides = {"model": args.model} if args.model else {}
    module = build(args.config, overrides)
    cases = sorted(load_cases(args.data), key=lambda c: int(c.case_id))[: args.cases]
    cases = pool_neighbourhoods(cases, 10)
    result = measure(module, cases, args.batch_size, args.repeats)
    write_json(args.output, result)
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("_all")}, indent=2))
    return result


if __name__ == "__main__":
    main()
