"""REMEDI's own evaluations (Hernandez, Li, Andreas 2023), in plain PyTorch and scikit-learn: the
Fact-Med / Fact-Prior probe (:mod:`.probe`), McRae entailment (:mod:`.mcrae`) and Bias in Bios
generation (:mod:`.biosbias`). ``python -m remedi.evaluate --task probe|mcrae|biosbias`` runs
them (:mod:`.tasks`); their settings are the ``probe``, ``mcrae`` and ``biosbias`` sections of
its config files (:mod:`.settings`)."""

from remedi.evaluations.settings import BiosSettings, McRaeSettings, ProbeSettings

__all__ = ["BiosSettings", "McRaeSettings", "ProbeSettings"]
