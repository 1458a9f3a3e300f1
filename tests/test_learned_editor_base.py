"""``LearnedEditorModule`` is an abstract base: a LightningModule whose metaclass is ``ABCMeta``,
which refuses to build a module that leaves out one of the methods every learned editor
supplies (no model is loaded: the refusal comes before ``__init__`` runs)."""

from __future__ import annotations

import inspect
from abc import ABCMeta
from typing import Any

import lightning as L
import pytest
import torch

from lightning_modules import LEARNED_METHODS, LearnedEditorModule
from remedi.data import EditCase
from remedi.metrics import EditContext

SUPPLIED = {"edit_layers", "training_terms", "eval_terms", "case_edit"}


def test_the_base_is_an_abstract_lightning_module() -> None:
    assert isinstance(LearnedEditorModule, ABCMeta)
    assert issubclass(LearnedEditorModule, L.LightningModule)
    assert set(LearnedEditorModule.__abstractmethods__) == SUPPLIED
    with pytest.raises(TypeError, match="abstract"):
        LearnedEditorModule("tiny", "float32", "mean", 1)  # type: ignore[abstract]


@pytest.mark.parametrize("method", sorted(LEARNED_METHODS))
def test_every_learned_method_supplies_them(method: str) -> None:
    assert not inspect.isabstract(LEARNED_METHODS[method])


def test_a_module_that_leaves_one_out_cannot_be_built() -> None:
    class NoCaseEdit(LearnedEditorModule):
        @property
        def edit_layers(self) -> list[int]:
            return [0]

        def training_terms(self, batch: Any) -> dict[str, torch.Tensor]:
            return {}

        def eval_terms(self, batch: Any) -> dict[str, torch.Tensor]:
            return {}

    with pytest.raises(TypeError, match="case_edit"):
        NoCaseEdit("tiny", "float32", "mean", 1)  # type: ignore[abstract]

    class Complete(NoCaseEdit):
        def case_edit(self, cases: list[EditCase]) -> EditContext:
            raise NotImplementedError

    assert not inspect.isabstract(Complete)
