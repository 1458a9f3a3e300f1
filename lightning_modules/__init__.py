"""LightningModules that train editors against a frozen LM."""

from lightning_modules.remedi_module import RemediModule, register_model, shared_model

__all__ = ["RemediModule", "register_model", "shared_model"]
