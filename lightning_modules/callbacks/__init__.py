"""Lightning callbacks that run the non-learned methods during evaluation."""

from lightning_modules.callbacks.baselines import (
    CausalTraceCallback,
    EditorBaseline,
    gradients_enabled,
)

__all__ = ["CausalTraceCallback", "EditorBaseline", "gradients_enabled"]
