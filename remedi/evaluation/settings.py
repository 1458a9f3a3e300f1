"""Settings of REMEDI's own evaluations, one dataclass per task: the ``probe``, ``mcrae`` and
``biosbias`` sections of ``remedi.evaluate`` config files (``--probe.entity_layer 16``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Split = Literal["train", "validation", "test", "all"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test", "all")


@dataclass
class ProbeSettings:
    """The Fact-Med / Fact-Prior probe (:mod:`remedi.evaluation.probe`).

    Args:
        entity_layer: block whose output at the entity's last token is compared with the
            directions; None: two below the top (GPT-J's 26 of 28 in REMEDI's paper).
        seed: seed of the shuffled-label control.
    """

    entity_layer: int | None = None
    seed: int = 0


@dataclass
class McRaeSettings:
    """McRae entailment (:mod:`remedi.evaluation.mcrae`). The examples are split exactly as
    ``datamodules.McRaeDataModule`` splits them in training, so give the training config's
    ``examples_per_concept``, ``n_val``, ``n_test`` and ``seed`` to score held-out examples.

    Args:
        split: which examples to score; with one example per concept, ``test`` holds concepts
            the editor never saw.
        examples_per_concept, n_val, n_test, seed, min_co_prob, min_co_concepts: as in
            ``McRaeDataModule``.
        max_co_features: co-occurring features scored per example (a seeded sample when there
            are more); None: all.
    """

    split: Split = "test"
    examples_per_concept: int = 1
    n_val: int | None = 60
    n_test: int | None = 120
    seed: int = 0
    min_co_prob: float = 0.1
    min_co_concepts: int = 2
    max_co_features: int | None = 50


@dataclass
class BiosSettings:
    """Bias in Bios generation (:mod:`remedi.evaluation.biosbias`). The bios are split exactly
    as ``datamodules.BiasInBiosDataModule`` splits them in training (give the training config's
    ``limit``, ``n_val``, ``n_test`` and ``seed``).

    Args:
        split: which examples to score.
        limit, n_val, n_test, seed: as in ``BiasInBiosDataModule``.
        top_k: the k of top-k occupation accuracy (REMEDI: 3).
        max_new_tokens: tokens sampled (top-k 5) after each prompt for fluency and consistency.
    """

    split: Split = "test"
    limit: int | None = None
    n_val: int | None = None
    n_test: int | None = None
    seed: int = 0
    top_k: int = 3
    max_new_tokens: int = 100
