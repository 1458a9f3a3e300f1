"""The architecture map resolves every module of every supported model type."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_TYPES, tiny_model

from remedi.models import arch_for, supported_model_types


def test_every_supported_type_has_a_tiny_model() -> None:
    assert set(supported_model_types()) == set(MODEL_TYPES)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_paths_resolve_and_widths_match(model_type: str) -> None:
    lm = tiny_model(model_type)
    arch = lm.arch
    assert arch.model_type == model_type
    assert arch.num_layers == 3
    for layer in range(arch.num_layers):
        for module in (arch.block(layer), arch.attn(layer), arch.mlp(layer), arch.mlp_out(layer)):
            assert isinstance(module, torch.nn.Module)
    assert arch.block(-1) is arch.block(arch.num_layers - 1)
    embed_weight = arch.embed.weight
    assert embed_weight.shape[1] == arch.hidden_size
    assert arch.unembed.weight.shape[1] == arch.hidden_size
    assert sum(p.numel() for p in arch.final_norm.parameters()) >= arch.hidden_size
    assert tuple(arch.mlp_out_weight(0).shape) == (arch.hidden_size, arch.mlp_hidden_size)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_declared_orientation_reproduces_projection(model_type: str) -> None:
    arch = tiny_model(model_type).arch
    projection = arch.mlp_out(1)
    x = torch.randn(5, arch.mlp_hidden_size)
    bias = getattr(projection, "bias", None)
    expected = x @ arch.mlp_out_weight(1).T + (0 if bias is None else bias)
    torch.testing.assert_close(projection(x), expected)


def test_mlp_out_weight_is_a_writable_view() -> None:
    arch = tiny_model("gpt2").arch
    view = arch.mlp_out_weight(0)
    with torch.no_grad():
        view[0, 0] = 123.0
    assert arch.mlp_out(0).weight[0, 0] == 123.0  # Conv1D stores [in, out]


def test_loaded_model_is_frozen(any_tiny) -> None:
    assert not any(p.requires_grad for p in any_tiny.model.parameters())
    assert not any_tiny.model.training
    assert any_tiny.tokenizer.pad_token is not None


def test_unknown_model_type_lists_supported() -> None:
    model = torch.nn.Linear(2, 2)
    model.config = type("Config", (), {"model_type": "bert"})()  # type: ignore[assignment]
    with pytest.raises(ValueError, match=r"'bert' is not supported; supported: .*gpt2.*register"):
        arch_for(model)


def test_layer_out_of_range_names_the_layer() -> None:
    arch = tiny_model("llama").arch
    with pytest.raises(ValueError, match=r"layer 7 is out of range .* 3 layers"):
        arch.mlp(7)
