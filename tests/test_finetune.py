"""FT and FT-L of one MLP output projection: the loss falls, FT-L respects its bound, and the
weights are restored bitwise."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from remedi.methods import finetune
from remedi.methods.requests import EditRequest

REQUEST = EditRequest("{} is located in", "The Eiffel Tower", "Japan")


@pytest.mark.parametrize("eps", [None, 1e-3])
def test_finetune_lowers_loss_and_restores(eps: float | None) -> None:
    lm = tiny_model("gpt2")
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    hp = finetune.FinetuneHyperParams(layer=1, lr=1e-2, steps=5, eps=eps)
    handle = finetune.apply_edit(lm, REQUEST, hp)
    losses = handle.info["losses"]
    assert isinstance(losses, list) and losses[-1] < losses[0]
    name = handle.names[0]
    change = dict(lm.model.named_parameters())[name].detach() - before[name]
    assert change.abs().max() > 0
    if eps is not None:
        assert change.abs().max() <= eps + 1e-7
    assert not any(p.requires_grad for p in lm.model.parameters())
    handle.restore()
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())


def test_bad_eps() -> None:
    with pytest.raises(ValueError, match="eps"):
        finetune.apply_edit(tiny_model("gpt2"), REQUEST, finetune.FinetuneHyperParams(eps=0.0))
