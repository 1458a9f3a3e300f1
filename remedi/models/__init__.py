"""Model loading and the per-architecture module map."""

from remedi.models.architectures import (
    Arch,
    ArchSpec,
    arch_for,
    register_architecture,
    supported_model_types,
)
from remedi.models.loading import (
    DEFAULT_MODEL,
    LoadedModel,
    cache_dir,
    load_model,
    max_positions,
    resolve_dtype,
    wrap_model,
)

__all__ = [
    "DEFAULT_MODEL",
    "Arch",
    "ArchSpec",
    "LoadedModel",
    "arch_for",
    "cache_dir",
    "load_model",
    "max_positions",
    "register_architecture",
    "resolve_dtype",
    "supported_model_types",
    "wrap_model",
]
