"""The narrower-dtype copy ROME and MEMIT optimise on: cast, cached, tied, kept in sync."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from remedi.methods.weights import backup
from remedi.models.cast_copy import cast_copy


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("model_type", ["gpt2", "gemma3_text"])
def test_copy_is_cast_and_computes_like_the_original(model_type: str) -> None:
    lm = tiny_model(model_type)
    fast = cast_copy(lm, torch.bfloat16)
    assert fast.dtype is torch.bfloat16 and lm.dtype is torch.float32
    assert fast.tokenizer is lm.tokenizer and fast.arch.num_layers == lm.arch.num_layers
    assert not any(p.requires_grad for p in fast.model.parameters())
    if lm.model.config.tie_word_embeddings:
        assert fast.arch.unembed.weight is fast.arch.embed.weight
    ids = torch.randint(3, 300, (2, 6))
    torch.testing.assert_close(
        _logits(fast.model, ids), _logits(lm.model, ids), atol=0.05, rtol=0.05
    )
    assert cast_copy(lm, torch.float32) is lm


def test_copy_is_reused_and_follows_in_place_edits() -> None:
    lm = tiny_model("gemma3_text")
    fast = cast_copy(lm, torch.bfloat16)
    assert cast_copy(lm, torch.bfloat16) is fast
    name = "model.layers.1.mlp.down_proj.weight"
    weight = dict(lm.model.named_parameters())[name]
    copied = dict(fast.model.named_parameters())[name]
    handle = backup(lm.model, [name])
    with torch.no_grad():
        weight.add_(1.0)
    assert cast_copy(lm, torch.bfloat16) is fast
    torch.testing.assert_close(copied, weight.to(torch.bfloat16))
    handle.restore()
    cast_copy(lm, torch.bfloat16)
    torch.testing.assert_close(copied, weight.to(torch.bfloat16))
    assert cast_copy(lm, torch.float16).dtype is torch.float16
