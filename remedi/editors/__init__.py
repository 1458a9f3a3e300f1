"""Learned editors in plain PyTorch: REMEDI (networks mapping attribute representations to
directions, applied to a frozen LM) and the gradient editors MEND and KE."""

from remedi.editors.apply import (
    DirectionRecord,
    apply_direction,
    apply_editor,
    attribute_states,
    editor_edit,
    generate_edited,
    metrics_context,
)
from remedi.editors.gradient import (
    GradientEditor,
    LayerUpdate,
    TokenGradients,
    apply_updates,
    token_gradients,
    write_updates,
)
from remedi.editors.ke import KeEditor
from remedi.editors.mend import MendEditor
from remedi.editors.modules import (
    EDITOR_KINDS,
    AffineEditor,
    BiaffineEditor,
    Editor,
    EditorKind,
    IdentityEditor,
    LowRankEditor,
    MLPEditor,
    NullEditor,
    build_editor,
)
from remedi.editors.training import (
    LossWeights,
    RemediExample,
    TargetTokens,
    examples_from_case,
    kl_divergence,
    logits_at,
    remedi_loss,
)

__all__ = [
    "EDITOR_KINDS",
    "AffineEditor",
    "BiaffineEditor",
    "DirectionRecord",
    "Editor",
    "EditorKind",
    "GradientEditor",
    "IdentityEditor",
    "KeEditor",
    "LayerUpdate",
    "LossWeights",
    "LowRankEditor",
    "MLPEditor",
    "MendEditor",
    "NullEditor",
    "RemediExample",
    "TargetTokens",
    "TokenGradients",
    "apply_direction",
    "apply_editor",
    "apply_updates",
    "attribute_states",
    "build_editor",
    "editor_edit",
    "examples_from_case",
    "generate_edited",
    "kl_divergence",
    "logits_at",
    "metrics_context",
    "remedi_loss",
    "token_gradients",
    "write_updates",
]
