"""REMEDI editors: networks mapping attribute representations to directions, and the plain-PyTorch
code that applies them to a frozen LM and trains them."""

from remedi.editors.apply import (
    DirectionRecord,
    apply_direction,
    apply_editor,
    attribute_states,
    editor_edit,
    generate_edited,
    metrics_context,
)
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
    "IdentityEditor",
    "LossWeights",
    "LowRankEditor",
    "MLPEditor",
    "NullEditor",
    "RemediExample",
    "TargetTokens",
    "apply_direction",
    "apply_editor",
    "attribute_states",
    "build_editor",
    "editor_edit",
    "examples_from_case",
    "generate_edited",
    "kl_divergence",
    "logits_at",
    "metrics_context",
    "remedi_loss",
]
