"""LightningModules that train editors against a frozen LM."""
