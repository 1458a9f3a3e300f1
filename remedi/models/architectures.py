"""The one table of architecture knowledge: where each causal LM keeps blocks, MLPs, norms."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

Orientation = Literal["out_in", "in_out"]
"""Layout of a projection's weight: ``out_in`` is ``nn.Linear`` (y = x Wᵀ), ``in_out`` is GPT-2's
``Conv1D`` (y = x W)."""


@dataclass(frozen=True)
class ArchSpec:
    """Module paths (relative to the causal-LM wrapper) and config readers for one model type."""

    model_type: str
    layers: str
    attn: str
    mlp: str
    mlp_out: str
    mlp_out_orientation: Orientation
    embed: str
    final_norm: str
    unembed: str
    num_layers: Callable[[Any], int]
    hidden_size: Callable[[Any], int]
    mlp_hidden_size: Callable[[Any], int]
    post_mlp_norm: str | None = None
    """Norm applied to the MLP output before the residual add (Gemma 2/3), relative to a block."""


_REGISTRY: dict[str, ArchSpec] = {}
MODULE_KINDS = ("block", "attn", "mlp", "mlp_out", "embed", "final_norm", "unembed")


def register_architecture(spec: ArchSpec) -> None:
    """Add (or replace) the map for ``spec.model_type``."""
    _REGISTRY[spec.model_type] = spec


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def spec_for(model_type: str) -> ArchSpec:
    """Return the map for a ``config.model_type``, or fail naming the supported types."""
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise ValueError(
            f"model_type {model_type!r} is not supported; supported: "
            f"{', '.join(supported_model_types())}. To add one, call "
            "remedi.models.register_architecture(ArchSpec(...)) with its module paths "
            "(see remedi/models/architectures.py)."
        ) from None


def _gpt2_inner(c: Any) -> int:
    return c.n_inner if c.n_inner is not None else 4 * c.n_embd


def _llama_like(model_type: str, post_mlp_norm: str | None = None) -> ArchSpec:
    return ArchSpec(
        model_type=model_type,
        layers="model.layers",
        attn="self_attn",
        mlp="mlp",
        mlp_out="mlp.down_proj",
        mlp_out_orientation="out_in",
        embed="model.embed_tokens",
        final_norm="model.norm",
        unembed="lm_head",
        num_layers=lambda c: c.num_hidden_layers,
        hidden_size=lambda c: c.hidden_size,
        mlp_hidden_size=lambda c: c.intermediate_size,
        post_mlp_norm=post_mlp_norm,
    )


for _spec in (
    ArchSpec(
        model_type="gpt2",
        layers="transformer.h",
        attn="attn",
        mlp="mlp",
        mlp_out="mlp.c_proj",
        mlp_out_orientation="in_out",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        num_layers=lambda c: c.n_layer,
        hidden_size=lambda c: c.n_embd,
        mlp_hidden_size=_gpt2_inner,
    ),
    ArchSpec(
        model_type="gptj",
        layers="transformer.h",
        attn="attn",
        mlp="mlp",
        mlp_out="mlp.fc_out",
        mlp_out_orientation="out_in",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        num_layers=lambda c: c.n_layer,
        hidden_size=lambda c: c.n_embd,
        mlp_hidden_size=_gpt2_inner,
    ),
    ArchSpec(
        model_type="gpt_neox",
        layers="gpt_neox.layers",
        attn="attention",
        mlp="mlp",
        mlp_out="mlp.dense_4h_to_h",
        mlp_out_orientation="out_in",
        embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
        unembed="lm_head",
        num_layers=lambda c: c.num_hidden_layers,
        hidden_size=lambda c: c.hidden_size,
        mlp_hidden_size=lambda c: c.intermediate_size,
    ),
    ArchSpec(
        model_type="gpt_neo",
        layers="transformer.h",
        attn="attn",
        mlp="mlp",
        mlp_out="mlp.c_proj",
        mlp_out_orientation="out_in",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        num_layers=lambda c: c.num_layers,
        hidden_size=lambda c: c.hidden_size,
        mlp_hidden_size=lambda c: c.intermediate_size or 4 * c.hidden_size,
    ),
    *(_llama_like(t) for t in ("llama", "mistral", "qwen2")),
    *(_llama_like(t, "post_feedforward_layernorm") for t in ("gemma2", "gemma3_text")),
):
    register_architecture(_spec)


class Arch:
    """An :class:`ArchSpec` bound to one loaded model: resolves modules per layer."""

    def __init__(self, model: nn.Module, spec: ArchSpec) -> None:
        self.model = model
        self.spec = spec
        config = model.config
        self.model_type: str = spec.model_type
        self.num_layers: int = int(spec.num_layers(config))
        self.hidden_size: int = int(spec.hidden_size(config))
        self.mlp_hidden_size: int = int(spec.mlp_hidden_size(config))
        self.mlp_out_orientation: Orientation = spec.mlp_out_orientation

    def __repr__(self) -> str:
        return (
            f"Arch({self.model_type}, layers={self.num_layers}, hidden={self.hidden_size}, "
            f"mlp_hidden={self.mlp_hidden_size})"
        )

    def check_layer(self, layer: int) -> int:
        """``layer`` as an index in ``0..num_layers-1`` (negative counts from the end), or a
        one-line error naming it."""
        if not -self.num_layers <= layer < self.num_layers:
            raise ValueError(
                f"layer {layer} is out of range for {self.model_type} with "
                f"{self.num_layers} layers (valid: 0..{self.num_layers - 1})"
            )
        return layer % self.num_layers

    def path(self, kind: str, layer: int | None = None) -> str:
        """Dotted path of a module ``kind`` (see :data:`MODULE_KINDS`)."""
        s = self.spec
        if kind in ("embed", "final_norm", "unembed"):
            return str(getattr(s, kind))
        if layer is None:
            raise ValueError(f"module kind {kind!r} needs a layer")
        block = f"{s.layers}.{self.check_layer(layer)}"
        if kind == "block":
            return block
        if kind in ("attn", "mlp", "mlp_out"):
            return f"{block}.{getattr(s, kind)}"
        raise ValueError(f"unknown module kind {kind!r}; use one of {', '.join(MODULE_KINDS)}")

    def module(self, kind: str, layer: int | None = None) -> nn.Module:
        return self.model.get_submodule(self.path(kind, layer))

    def block(self, layer: int) -> nn.Module:
        return self.module("block", layer)

    def attn(self, layer: int) -> nn.Module:
        return self.module("attn", layer)

    def mlp(self, layer: int) -> nn.Module:
        return self.module("mlp", layer)

    def mlp_out(self, layer: int) -> nn.Module:
        return self.module("mlp_out", layer)

    @property
    def embed(self) -> nn.Module:
        return self.module("embed")

    @property
    def final_norm(self) -> nn.Module:
        return self.module("final_norm")

    @property
    def unembed(self) -> nn.Module:
        return self.module("unembed")

    def post_mlp_norm(self, layer: int) -> nn.Module | None:
        """The norm between the MLP output and the residual add, or None (most models)."""
        name = self.spec.post_mlp_norm
        return None if name is None else self.block(layer).get_submodule(name)

    def mlp_out_shape(self, layer: int) -> tuple[int, int]:
        """``(in, out)`` widths of block ``layer``'s MLP output projection."""
        weight = self.mlp_out_weight(layer)
        return int(weight.shape[1]), int(weight.shape[0])

    def mlp_out_weight(self, layer: int) -> torch.Tensor:
        """The MLP output projection's weight as an ``[out, in]`` view (writes go to the model)."""
        weight: torch.Tensor = self.mlp_out(layer).weight  # type: ignore[assignment]
        return weight if self.mlp_out_orientation == "out_in" else weight.T


def arch_for(model: nn.Module) -> Arch:
    """The architecture map of an already-loaded Hugging Face causal LM."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise ValueError(f"{type(model).__name__} has no config.model_type; is it a HF model?")
    return Arch(model, spec_for(model_type))
