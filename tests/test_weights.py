"""Reversible weight edits restore every value bitwise."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from remedi.methods.weights import backup, param_name


def test_restore_is_bitwise_and_survives_exceptions() -> None:
    lm = tiny_model("gpt2")
    name = param_name(lm.model, lm.arch.mlp_out(1).weight)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    with pytest.raises(RuntimeError), backup(lm.model, [name]):
        with torch.no_grad():
            lm.arch.mlp_out_weight(1).add_(torch.randn_like(lm.arch.mlp_out_weight(1)))
        assert not torch.equal(lm.model.state_dict()[name], before[name])
        raise RuntimeError("evaluation failed")
    for key, value in lm.model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_unknown_parameter() -> None:
    lm = tiny_model("llama")
    with pytest.raises(KeyError, match="no parameter"):
        backup(lm.model, ["model.layers.9.mlp.down_proj.weight"])
