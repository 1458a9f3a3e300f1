"""MEMIT: the least-squares update against a direct solution, and a reversible batch edit."""

from __future__ import annotations

import torch
from conftest import tiny_model

from remedi.methods import memit
from remedi.methods.requests import EditRequest

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
    lm = tiny_model("llama")
    layers = memit.default_layers(lm)
    assert layers and all(0 <= x < lm.arch.num_layers for x in layers)


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
