"""LightningModules that train editors against a frozen LM, on one shared base."""

from lightning_modules.gradient_editor import GradientEditorModule, KeModule, MendModule
from lightning_modules.learned_editor import (
    LearnedEditorModule,
    is_registered,
    register_model,
    shared_model,
)
from lightning_modules.remedi_module import RemediModule
from lightning_modules.serac_module import SeracModule
from lightning_modules.trained import LEARNED_METHODS, load_trained

__all__ = [
    "LEARNED_METHODS",
    "GradientEditorModule",
    "KeModule",
    "LearnedEditorModule",
    "MendModule",
    "RemediModule",
    "SeracModule",
    "is_registered",
    "load_trained",
    "register_model",
    "shared_model",
]
