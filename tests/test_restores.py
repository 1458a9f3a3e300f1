"""Every weight-editing method leaves the LM bitwise as it found it: after apply + restore (in
float32, bfloat16 and float16), when it fails midway (the error propagates), when scoring under
its edit fails, and after an evaluation callback ran inside ``fit``; and no hook stays behind.

The fingerprint is a sha256 over every parameter's and buffer's name, dtype, shape and bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from conftest import score_method, tiny_model
from test_datamodules import write_rome

from datamodules import CounterFactDataModule
from lightning_modules import RemediModule, register_model
from lightning_modules.callbacks import EditorBaseline
from remedi.data import EditCase
from remedi.editors import KeEditor, LayerUpdate, MendEditor
from remedi.evaluation import runner as registry
from remedi.hooks import count_hooks
from remedi.methods import finetune, memit, rome
from remedi.methods import knowledge_neurons as kn
from remedi.methods.weights import EditHandle
from remedi.models import LoadedModel
from remedi.models.cast_copy import cast_copy

METHODS = ["rome", "memit", "kn", "kn-erase", "ft", "ft-l", "mend", "ke"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CASES = [
    EditCase(
        0,
        "The Eiffel Tower",
        "{} is located in",
        "France",
        "Japan",
        paraphrase_prompts=["The Eiffel Tower stands in", "Where is The Eiffel Tower? In"],
        neighborhood_prompts=["Paris is located in"],
    ),
    EditCase(
        1,
        "Toyota",
        "{} makes",
        "cars",
        "phones",
        paraphrase_prompts=["Toyota is famous, and it makes", "What does Toyota make?"],
        neighborhood_prompts=["Apple makes"],
    ),
]


class InjectedFailure(RuntimeError):
    """Raised by a monkeypatched inner step of a method."""


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, raw bytes)."""
    digest = hashlib.sha256()
    tensors = sorted([*model.named_parameters(), *model.named_buffers()], key=lambda x: x[0])
    for name, tensor in tensors:
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _gradient_editor(lm: LoadedModel, method: str) -> MendEditor | KeEditor:
    """An untrained MEND or KE editor over layers 0 and 2 with a visible step size."""
    out_features, in_features = lm.arch.mlp_out_weight(0).shape
    if method == "mend":
        return MendEditor([0, 2], in_features, out_features, rank=4, init_step=1.0)
    return KeEditor([0, 2], in_features, out_features, lm.arch.hidden_size, 8, init_step=1.0)


def editor_for(lm: LoadedModel, method: str) -> Callable[[EditCase], EditHandle]:
    """Apply ``method`` to one case with small settings; returns the restoring handle."""
    if method in ("mend", "ke"):
        editor = _gradient_editor(lm, method)
        return lambda case: editor.apply_edit(lm, [case])
    if method == "memit":
        hp = memit.MemitHyperParams(layers=(0, 1), n_context=1, steps=3)
        return lambda case: memit.apply_edits(lm, [case], hparams=hp, progress=False)
    if method == "kn-erase":
        return lambda case: kn.erase_relation(lm, [case], top=3, steps=2)
    if method == "kn":
        return lambda case: kn.apply_update(lm, case, steps=2)
    if method == "rome":
        hp_rome = rome.RomeHyperParams(layer=1, n_context=1, steps=3)
        return lambda case: rome.apply_edit(lm, case, hparams=hp_rome)
    eps = 1e-3 if method == "ft-l" else None
    hp_ft = finetune.FinetuneHyperParams(layer=1, steps=3, lr=1e-2, eps=eps)
    return lambda case: finetune.apply_edit(lm, case, hp_ft)


def _tiny(dtype: torch.dtype = torch.float32) -> LoadedModel:
    lm = tiny_model("llama")
    torch.nn.Module.to(lm.model, dtype)
    return lm


def assert_clean(lm: LoadedModel, digest: str) -> None:
    """The LM is bitwise as before, frozen, without gradients and without hooks."""
    assert fingerprint(lm.model) == digest
    assert count_hooks(lm.model) == 0
    assert count_hooks(cast_copy(lm, torch.bfloat16).model) == 0  # what ROME optimises on
    assert not any(p.requires_grad or p.grad is not None for p in lm.model.parameters())


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("method", METHODS)
def test_apply_then_restore_is_bitwise(method: str, dtype: torch.dtype) -> None:
    """The edit writes the LM, and restoring it (in any dtype) gives back the exact bytes."""
    lm = _tiny(dtype)
    digest = fingerprint(lm.model)
    handle = editor_for(lm, method)(CASES[0])
    assert fingerprint(lm.model) != digest, "the edit wrote nothing"
    assert count_hooks(lm.model) == 0
    handle.restore()
    assert_clean(lm, digest)
    handle.restore()  # idempotent
    assert_clean(lm, digest)


class FailingInfo(dict[str, object]):
    """A handle's ``info`` that raises when the method records into it, i.e. after the method
    wrote its weights; remembers whether the LM had been written by then."""

    def __init__(self, lm: LoadedModel, digest: str) -> None:
        super().__init__()
        self.lm, self.digest = lm, digest
        self.written: list[bool] = []

    def _fail(self) -> None:
        self.written.append(fingerprint(self.lm.model) != self.digest)
        raise InjectedFailure("recording the edit failed")

    def update(self, *_args: Any, **_kwargs: Any) -> None:
        self._fail()

    def __setitem__(self, key: str, value: object) -> None:
        self._fail()


def fail_after(count: int, written: Callable[[], bool], log: list[bool]) -> Callable[..., Any]:
    """A replacement for an inner step that runs the real one ``count`` times, then raises
    (logging whether the LM had been written by then)."""

    def wrap(real: Callable[..., Any]) -> Callable[..., Any]:
        calls = [0]

        def step(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            if calls[0] > count:
                log.append(written())
                raise InjectedFailure(f"inner step failed on call {calls[0]}")
            return real(*args, **kwargs)

        return step

    return wrap


def inject_midway(
    monkeypatch: pytest.MonkeyPatch, lm: LoadedModel, method: str, written: Callable[[], bool]
) -> list[bool]:
    """Make ``method`` fail between two of its weight writes (or optimiser steps)."""
    log: list[bool] = []
    if method == "memit":  # layer 0 written, layer 1 fails
        wrap = fail_after(1, written, log)
        monkeypatch.setattr(memit, "least_squares_update", wrap(memit.least_squares_update))
    elif method in ("kn", "kn-erase"):  # the first neuron's slot written, the second fails
        neurons = [kn.Neuron(0, 1), kn.Neuron(1, 2)]
        found = kn.KnowledgeNeurons(neurons, 1.0, [neurons])
        monkeypatch.setattr(kn, "relation_neurons", lambda *_a, **_k: neurons)
        monkeypatch.setattr(kn, "identify", lambda *_a, **_k: found)
        wrap = fail_after(1, written, log)
        monkeypatch.setattr(lm.arch, "mlp_out_weight", wrap(lm.arch.mlp_out_weight))
    elif method in ("ft", "ft-l"):  # two optimiser steps taken, the third forward fails
        wrap = fail_after(2, written, log)
        monkeypatch.setattr(rome.ForwardTail, "logits_at", wrap(rome.ForwardTail.logits_at))
    elif method in ("mend", "ke"):  # layer 0 written, layer 2 fails
        wrap = fail_after(1, written, log)
        monkeypatch.setattr(LayerUpdate, "delta", wrap(LayerUpdate.delta))
    else:  # ROME writes once: the write succeeds and the update's norm after it fails
        wrap = fail_after(0, written, log)
        monkeypatch.setattr(rome, "asdict", wrap(rome.asdict))
    return log


@pytest.mark.parametrize("method", METHODS)
def test_failure_midway_restores_and_propagates(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm = _tiny()
    digest = fingerprint(lm.model)
    log = inject_midway(monkeypatch, lm, method, lambda: fingerprint(lm.model) != digest)
    with pytest.raises(InjectedFailure):
        editor_for(lm, method)(CASES[0])
    assert log == [True], "the failure must come after a weight was written"
    assert_clean(lm, digest)


@pytest.mark.parametrize("method", METHODS)
def test_failure_while_recording_restores(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure after every weight was written (while the method records its info) restores."""
    lm = _tiny()
    digest = fingerprint(lm.model)
    infos: list[FailingInfo] = []
    init = EditHandle.__init__

    def failing_init(self: EditHandle, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        infos.append(FailingInfo(lm, digest))
        self.info = infos[-1]

    monkeypatch.setattr(EditHandle, "__init__", failing_init)
    with pytest.raises(InjectedFailure):
        editor_for(lm, method)(CASES[0])
    assert [info.written for info in infos] == [[True]]
    assert_clean(lm, digest)


def _score(lm: LoadedModel, method: str, cases: list[EditCase]) -> registry.MethodResult:
    """Score ``method`` through the shared registry (what ``remedi.evaluate`` runs)."""
    if method == "memit":
        hp = memit.MemitHyperParams(layers=(0, 1), n_context=1, steps=3)
        return score_method(lm, "memit", cases, hparams=hp, progress=False)
    name = "kn" if method == "kn-erase" else method
    edit = editor_for(lm, method)
    return score_method(lm, name, cases, progress=False, editor=edit)


@pytest.mark.parametrize("method", METHODS)
def test_evaluation_restores_even_when_scoring_fails(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scoring every case under its edit leaves the LM as it was, and so does an error raised
    while a case is scored under its edit (e.g. MEND and KE, edited at evaluation)."""
    lm = _tiny()
    digest = fingerprint(lm.model)
    result = _score(lm, method, CASES)
    assert len(result.per_case) == len(CASES)
    assert_clean(lm, digest)

    def broken(*_args: Any, **_kwargs: Any) -> Any:
        assert fingerprint(lm.model) != digest, "scored without the edit"
        raise InjectedFailure("scoring failed")

    monkeypatch.setattr(registry, "evaluate_cases", broken)
    with pytest.raises(InjectedFailure):
        _score(lm, method, CASES)
    assert_clean(lm, digest)


def _fit_with(tmp_path: Path, lm: LoadedModel, callback: L.Callback) -> L.Trainer:
    register_model(lm)
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = CounterFactDataModule(
        path=str(write_rome(tmp_path / "cf.json")), n_train=4, n_val=2, n_test=2, batch_size=2
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        limit_val_batches=1,
        val_check_interval=1,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(RemediModule(model=lm.spec, layer=1), datamodule=data)
    return trainer


def _baseline(method: Any) -> EditorBaseline:
    """The method run on one validation case at layer 1 (MEMIT: its default layers 0-1)."""
    return EditorBaseline(method=method, limit=1, layer=1)


@pytest.mark.parametrize("method", ["rome", "memit", "kn", "ft", "ft-l"])
def test_evaluation_callback_inside_fit_restores(
    method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ``EditorBaseline`` run at every validation of a ``fit`` leaves the LM bitwise intact
    and hook-free, also when its method fails midway (the error ends ``fit``)."""
    lm = tiny_model("gpt2")
    digest = fingerprint(lm.model)
    trainer = _fit_with(tmp_path, lm, _baseline(method))
    assert f"{method}/efficacy_score" in trainer.callback_metrics
    assert_clean(lm, digest)

    inject_midway(monkeypatch, lm, method, lambda: fingerprint(lm.model) != digest)
    with pytest.raises(InjectedFailure):
        _fit_with(tmp_path / "failing", lm, _baseline(method))
    assert_clean(lm, digest)
