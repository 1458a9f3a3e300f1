"""MEMIT: the least-squares update against a direct solution, and a reversible batch edit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_model
from test_rome import no_square_matrix

from remedi.methods import memit, second_moment
from remedi.methods.requests import EditRequest
from remedi.methods.rome import DeltaResult
from remedi.tokens import encode_continuations, score_continuations

REQUESTS = [
    EditRequest("{} is located in", "The Eiffel Tower", "Japan"),
    EditRequest("{} makes", "Toyota", "phones"),
    EditRequest("The capital of {} is", "Germany", "Rome"),
]


def test_least_squares_update_minimises_the_objective() -> None:
    torch.manual_seed(0)
    n, d_in, d_out, lam = 5, 12, 7, 3.0
    keys, resid = torch.randn(n, d_in), torch.randn(n, d_out)
    a = torch.randn(d_in, 3 * d_in, dtype=torch.float64)
    c = a @ a.T / (3 * d_in)
    update = memit.least_squares_update(keys, resid, c, lam)
    # min ||ΔW K - R||² + λ tr(ΔW C ΔWᵀ) as one stacked least-squares problem over ΔWᵀ.
    root = torch.linalg.cholesky(c)
    design = torch.cat([keys.double(), lam**0.5 * root.T])
    rhs = torch.cat([resid.double(), torch.zeros(d_in, d_out, dtype=torch.float64)])
    direct = torch.linalg.lstsq(design, rhs).solution.T
    torch.testing.assert_close(update, direct)


def test_batch_edit_writes_every_layer_and_restores_bitwise() -> None:
    lm = tiny_model("gptj")
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    hp = memit.MemitHyperParams(layers=(0, 1), n_context=2, steps=4, lr=0.01, mom2_weight=1.0)
    handle = memit.apply_edits(lm, REQUESTS, hparams=hp, progress=False)
    assert handle.info["layers"] == [0, 1] and handle.info["n_requests"] == 3
    changed = sorted(n for n, p in lm.model.named_parameters() if not torch.equal(p, before[n]))
    assert changed == sorted(handle.names) and len(changed) == 2
    handle.restore()
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())


def test_default_layers() -> None:
    """GPT-J's reference layers 3-8; elsewhere the four layers ending at ROME's layer, which
    sits at the measured fraction of the depth."""
    from types import SimpleNamespace

    from remedi.methods import rome

    gptj = SimpleNamespace(arch=SimpleNamespace(model_type="gptj", num_layers=28))
    assert memit.default_layers(gptj) == [3, 4, 5, 6, 7, 8]  # type: ignore[arg-type]
    deep = SimpleNamespace(arch=SimpleNamespace(model_type="llama", num_layers=40))
    last = round(rome.DEFAULT_LAYER_FRACTION * 40)
    assert memit.default_layers(deep) == [last - 3, last - 2, last - 1, last]  # type: ignore[arg-type]
    lm = tiny_model("llama")
    top = rome.default_layer(lm)
    assert memit.default_layers(lm) == list(range(max(0, top - 3), top + 1))


def test_post_norm_mapping_reaches_a_direction_change() -> None:
    lm = tiny_model("gemma3_text")
    norm = lm.arch.post_mlp_norm(0)
    assert norm is not None and tiny_model("gptj").arch.post_mlp_norm(0) is None
    torch.manual_seed(0)
    outputs = torch.randn(4, lm.arch.hidden_size)
    with torch.no_grad():
        normed = norm(outputs)
        # A reachable residual: the normalised output of another vector, minus the current one.
        wanted = norm(outputs + 0.5 * torch.randn_like(outputs)) - normed
        change = memit.through_post_norm(norm, outputs, wanted)
        torch.testing.assert_close(norm(outputs + change), normed + wanted, atol=1e-3, rtol=1e-3)


def test_batch_edit_on_a_post_norm_model_restores_bitwise() -> None:
    lm = tiny_model("gemma3_text")
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    hp = memit.MemitHyperParams(layers=(0, 1), n_context=2, steps=4, lr=0.01, mom2_weight=1.0)
    with memit.apply_edits(lm, REQUESTS, hparams=hp, progress=False) as handle:
        assert handle.info["post_norm_mapped"] is True
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture
def collected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[int, Any]:
    """Cached statistics of the tiny GPT-J's layers 0 and 1 (width 128) over 600 tokens."""
    monkeypatch.setenv("REMEDI_CACHE", str(tmp_path / "cache"))
    second_moment.release_inverses()
    lm = tiny_model("gptj")
    return second_moment.collect(lm, [0, 1], None, n_tokens=600, chunk_len=64, progress=False)


@pytest.mark.parametrize("lam", [15_000.0, 117.0, 1.0])  # GPT-J's, this width's default, tests'
def test_cached_inverse_update_equals_a_direct_float64_solve(
    collected: dict[int, Any], lam: float
) -> None:
    """R (λI + KᵀC⁻¹K)⁻¹ KᵀC⁻¹ from the cached C⁻¹ is R Kᵀ (λC + KKᵀ)⁻¹ solved directly.

    (Both are backward stable; at λ = 0.01 this C, of condition 1e6, makes λC + KKᵀ's condition
    3e11 and the two answers differ by 7e-6: the problem, not either method, sets that.)"""
    torch.manual_seed(0)
    stats = collected[1]
    c = stats.matrix
    keys, resid = torch.randn(9, c.shape[0]), torch.randn(9, 7)
    k, r = keys.double().T, resid.double().T
    direct = torch.linalg.solve(lam * c + k @ k.T, k @ r.T).T
    cached = memit.least_squares_update(keys, resid, None, lam, inverse=stats.inverse("cpu"))
    assert _relative(cached, direct) < 1e-6
    assert _relative(memit.least_squares_update(keys, resid, c, lam), direct) < 1e-6


def test_identity_update_builds_no_square_matrix() -> None:
    torch.manual_seed(0)
    keys, resid, lam = torch.randn(5, 40), torch.randn(5, 7), 2.0
    k, r = keys.double().T, resid.double().T
    direct = torch.linalg.solve(lam * torch.eye(40, dtype=torch.float64) + k @ k.T, k @ r.T).T
    with no_square_matrix(40):
        update = memit.least_squares_update(keys, resid, None, lam)
    assert _relative(update, direct) < 1e-9


def test_identity_statistics_edit_builds_no_square_matrix() -> None:
    lm = tiny_model("gptj")
    hp = memit.MemitHyperParams(layers=(0, 1), n_context=2, steps=3, lr=0.01, mom2_weight=1.0)
    with no_square_matrix(lm.arch.mlp_hidden_size):
        handle = memit.apply_edits(lm, REQUESTS, hparams=hp, progress=False)
    handle.restore()
    assert handle.info["whitened"] is False


def test_edit_with_collected_statistics_restores_bitwise(collected: dict[int, Any]) -> None:
    lm = tiny_model("gptj")
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    hp = memit.MemitHyperParams(layers=(0, 1), n_context=2, steps=3, lr=0.01, mom2_weight=1.0)
    with memit.apply_edits(lm, REQUESTS, stats=collected, hparams=hp, progress=False) as handle:
        assert handle.info["whitened"] is True
        assert any(not torch.equal(p, before[n]) for n, p in lm.model.named_parameters())
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())


def test_keys_and_states_are_read_in_one_batched_pass_per_layer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the target optimisation stubbed out, the LM runs once per edited layer for all
    requests together (it ran once per request per layer, plus once per request for z₀)."""
    lm = tiny_model("gptj")
    hidden = lm.arch.hidden_size

    def fixed_deltas(_lm: object, _site: object, chunk: list[Any], *_: object) -> list[Any]:
        return [DeltaResult(torch.full((hidden,), 0.1), 1.0, 1, [0.0], 0.5) for _ in chunk]

    monkeypatch.setattr(memit, "optimise_deltas", fixed_deltas)
    calls = []
    forward = lm.model.forward

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs["input_ids"].shape[0])
        return forward(*args, **kwargs)

    monkeypatch.setattr(lm.model, "forward", counted)
    hp = memit.MemitHyperParams(layers=(0, 1, 2), n_context=2, mom2_weight=1.0)
    with memit.apply_edits(lm, REQUESTS, hparams=hp, progress=False):
        pass
    assert calls == [len(REQUESTS) * 3] * 3  # 3 requests x 3 templates, one pass per layer


@pytest.mark.parametrize("model_type", ["gptj", "llama"])
def test_batch_edit_raises_the_new_targets_probability(model_type: str) -> None:
    """The point of an edit: after MEMIT, each rewrite prompt gives its target_new a higher
    probability than before, and the restored model gives back the old one.

    A random tiny model's attention barely carries a change at the subject to later tokens, so
    the subjects end the prompts here (the edited state is the predicting one), and the KL and
    weight-decay terms, which on its near-uniform outputs outweigh the target, are off; with
    identity statistics (no corpus) λ is small, as keys of a tiny model have small norms."""
    lm = tiny_model(model_type)
    requests = [
        EditRequest("Everyone knows {}", "The Eiffel Tower", "Japan"),
        EditRequest("I drive a {}", "Toyota", "phones"),
        EditRequest("The capital of {}", "Germany", "Rome"),
    ]
    prompts = [r.rewrite_prompt for r in requests]
    targets = [r.target_new for r in requests]

    def p_new() -> torch.Tensor:
        with torch.no_grad():
            batch = encode_continuations(lm.tokenizer, prompts, targets)
            return score_continuations(lm.model, batch).mean_prob

    before = p_new()
    hp = memit.MemitHyperParams(
        layers=(0, 1, 2),
        n_context=2,
        steps=40,
        clamp=4.0,
        kl_weight=0.0,
        weight_decay=0.0,
        mom2_weight=1e-4,
    )
    with memit.apply_edits(lm, requests, hparams=hp, progress=False):
        after = p_new()
    assert (after > 1.02 * before).all(), (before, after)
    torch.testing.assert_close(p_new(), before, rtol=0, atol=0)
