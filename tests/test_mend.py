"""MEND and KE: the networks, factored updates, reversible edits and their Lightning modules."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from conftest import lightning_trainer, target_probability, tiny_model
from lightning.pytorch.callbacks import ModelCheckpoint
from test_datamodules import write_rome

from datamodules import CounterFactDataModule
from lightning_modules import KeModule, MendModule, load_trained, register_model
from lightning_modules.gradient_editor import GradientEditorModule
from remedi.data import EditCase, load_cases
from remedi.editors.gradient import apply_updates, edit_batch_loss, token_gradients
from remedi.editors.ke import KeEditor
from remedi.editors.mend import MendEditor
from remedi.methods.rome import mlp_out_param
from remedi.models import LoadedModel


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    lm = tiny_model("gemma3_text")
    register_model(lm)
    return lm


def _cases(tmp_path: Path) -> list[EditCase]:
    return load_cases(write_rome(tmp_path / "cf.json"))


def _digest(lm: LoadedModel) -> str:
    h = hashlib.sha256()
    for name, p in sorted(lm.model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _shape(lm: LoadedModel, layer: int) -> tuple[int, int]:
    weight = lm.arch.mlp_out_weight(layer)
    return int(weight.shape[1]), int(weight.shape[0])


@pytest.mark.parametrize("model_type", ["gemma3_text", "gpt2"])  # out_in and in_out layouts
def test_untrained_mend_update_is_a_scaled_gradient_step(model_type: str, tmp_path: Path) -> None:
    lm = tiny_model(model_type)
    cases = _cases(tmp_path)[:2]
    layers = [0, 2]
    editor = MendEditor(layers, *_shape(lm, layers[0]), rank=8, init_step=0.3).eval()
    weights = [mlp_out_param(lm, layer) for layer in layers]
    for w in weights:
        w.requires_grad_(True)
    grads = torch.autograd.grad(edit_batch_loss(lm, cases), weights)
    for w in weights:
        w.requires_grad_(False)
    before = [w.detach().clone() for w in weights]
    with editor.apply_edit(lm, cases) as handle:
        for w, b, g in zip(weights, before, grads, strict=True):
            torch.testing.assert_close(w - b, -0.3 * g, rtol=1e-4, atol=1e-6)
        assert handle.info["method"] == "mend"
    for w, b in zip(weights, before, strict=True):
        assert torch.equal(w, b)


def test_only_the_configured_layers_change_and_restore_is_exact(
    tiny: LoadedModel, tmp_path: Path
) -> None:
    names = {n: p.detach().clone() for n, p in tiny.model.named_parameters()}
    digest = _digest(tiny)
    editor = MendEditor([1], *_shape(tiny, 1), rank=8, init_step=1.0)
    handle = editor.apply_edit(tiny, _cases(tmp_path))
    changed = {n for n, p in tiny.model.named_parameters() if not torch.equal(p, names[n])}
    assert changed == {"model.layers.1.mlp.down_proj.weight"}
    handle.restore()
    assert _digest(tiny) == digest


def test_hooked_updates_match_written_weights(tiny: LoadedModel, tmp_path: Path) -> None:
    """Applying a case's factored update through hooks (training) computes what writing it
    into the weights (evaluation) does, and rows of other groups stay unedited."""
    cases = _cases(tmp_path)
    editor = KeEditor([0, 1], *_shape(tiny, 0), embed_dim=tiny.arch.hidden_size, hidden=4).eval()
    editor.steps.data.fill_(2.0)
    ids = tiny.tokenizer(["Paris is located in", "Toyota makes"], return_tensors="pt", padding=True)
    with torch.no_grad():
        updates = editor.updates(tiny, cases[:1])
        plain = tiny.model(**ids).logits
        with apply_updates(tiny, updates, [0, -1]):
            hooked = tiny.model(**ids).logits
        with editor.apply_edit(tiny, cases[:1]):
            written = tiny.model(**ids).logits
    assert not torch.allclose(hooked[0], plain[0])
    torch.testing.assert_close(hooked[0], written[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(hooked[1], plain[1])


def test_several_requests_give_one_summed_update(tiny: LoadedModel, tmp_path: Path) -> None:
    cases = _cases(tmp_path)[:2]
    editor = MendEditor([1], *_shape(tiny, 1), rank=8).eval()
    with torch.no_grad():
        (update,) = editor.updates(tiny, cases)
    torch.testing.assert_close(update.delta(), update.delta(0) + update.delta(1))
    grads = token_gradients(tiny, [1], cases)[0]
    assert set(grads.groups.tolist()) == {0, 1}


def _data(tmp_path: Path) -> CounterFactDataModule:
    path = tmp_path / "cf.json"
    if not path.exists():
        write_rome(path)
    return CounterFactDataModule(
        path=str(path), n_train=6, n_val=2, n_test=2, split="ordered", batch_size=2
    )


_trainer = lightning_trainer


def _module(tiny: LoadedModel, method: str = "mend", **kwargs: object) -> GradientEditorModule:
    torch.manual_seed(0)
    cls = MendModule if method == "mend" else KeModule
    return cls(model=tiny.spec, layers=[1, 2], lr=1e-2, lr_step=1e-2, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["mend", "ke"])
def test_training_step_leaves_the_lm_and_trains_the_editor(
    tiny: LoadedModel, tmp_path: Path, method: str
) -> None:
    digest = _digest(tiny)
    module = _module(tiny, method)
    start = {k: v.clone() for k, v in module.editor.state_dict().items()}
    _trainer(tmp_path, max_steps=2).fit(module, _data(tmp_path))
    assert _digest(tiny) == digest
    moved = [k for k, v in module.editor.state_dict().items() if not torch.equal(v, start[k])]
    assert "steps" in moved and len(moved) > 2
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert all(k.startswith("editor.") for k in ckpt["state_dict"])
    lm_names = {n for n, _ in tiny.model.named_parameters()}
    assert not any(k.split(".", 1)[-1] in lm_names for k in ckpt["state_dict"])
    assert ckpt["remedi"]["method"] == method and ckpt["remedi"]["layers"] == [1, 2]
    groups = ckpt["optimizer_states"][0]["param_groups"]
    assert [g["name"] for g in groups] == ["networks", "steps"]
    editor_bytes = sum(v.numel() * v.element_size() for v in module.editor.state_dict().values())
    assert (tmp_path / "last.ckpt").stat().st_size < 4 * editor_bytes + 200_000


@pytest.mark.parametrize("n", [2, 3])  # mid-epoch and at the epoch's end (3 steps/epoch)
def test_resume_matches_uninterrupted_training(tiny: LoadedModel, tmp_path: Path, n: int) -> None:
    every_n = ModelCheckpoint(
        dirpath=str(tmp_path / "a"),
        every_n_train_steps=n,
        save_top_k=-1,
        filename="step{step}",
        auto_insert_metric_name=False,
    )
    straight = _module(tiny)
    _trainer(tmp_path / "a", max_steps=2 * n, callbacks=[every_n]).fit(straight, _data(tmp_path))
    resumed = _module(tiny)
    trainer = _trainer(tmp_path / "b", max_steps=2 * n)
    trainer.fit(resumed, _data(tmp_path), ckpt_path=str(tmp_path / "a" / f"step{n}.ckpt"))
    assert trainer.global_step == 2 * n
    for (name, a), b in zip(
        straight.editor.state_dict().items(), resumed.editor.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_validation_scores_and_best_weights_survive_a_resume(
    tiny: LoadedModel, tmp_path: Path
) -> None:
    module = _module(tiny)
    trainer = _trainer(tmp_path, max_epochs=2, limit_val_batches=None)
    trainer.fit(module, _data(tmp_path))
    for name in ("loss", "edit", "loc", "efficacy_score", "neighborhood_score", "score"):
        assert f"val/{name}" in trainer.callback_metrics
    assert module.best_editor_state is not None
    best = {k: v.clone() for k, v in module.best_editor_state.items()}
    loaded = MendModule.load_from_checkpoint(tmp_path / "last.ckpt")
    assert loaded.best_val_loss == module.best_val_loss
    assert loaded.use_best_weights()
    for key, value in loaded.editor.state_dict().items():
        assert torch.equal(value, best[key]), key


def test_checkpoint_from_another_model_or_method_fails(tiny: LoadedModel, tmp_path: Path) -> None:
    _trainer(tmp_path, max_steps=1).fit(_module(tiny), _data(tmp_path))
    gpt2 = tiny_model("gpt2")
    register_model(gpt2)
    with pytest.raises(ValueError, match="tiny-gpt2") as info:
        MendModule.load_from_checkpoint(tmp_path / "last.ckpt", model=gpt2.spec)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="trained a 'mend' editor, but this run loads a 'ke'"):
        load_trained("ke", tmp_path / "last.ckpt", tiny)


def test_bad_settings_fail_early(tiny: LoadedModel) -> None:
    with pytest.raises(ValueError, match="layer 7"):
        MendModule(model=tiny.spec, layers=[7])
    with pytest.raises(ValueError, match="names a layer twice"):
        MendModule(model=tiny.spec, layers=[1, 1])
    with pytest.raises(ValueError, match="c_loc"):
        KeModule(model=tiny.spec, c_loc=-1.0)


@pytest.fixture
def saved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A tiny model saved as a directory, a data file and a MEND checkpoint trained for it."""
    from remedi.models import load_model

    monkeypatch.setenv("REMEDI_CACHE", str(tmp_path / "cache"))
    tiny = tiny_model("gemma3_text")
    model_dir = tmp_path / "model"
    tiny.model.save_pretrained(model_dir)
    tiny.tokenizer.save_pretrained(model_dir)
    lm = load_model(str(model_dir))
    register_model(lm)
    torch.manual_seed(0)
    module = MendModule(model=lm.spec, layers=[1, 2], lr=1e-2, lr_step=1e-2)
    _trainer(tmp_path / "run", max_epochs=1, limit_val_batches=None).fit(module, _data(tmp_path))
    requests = tmp_path / "requests.json"
    requests.write_text(
        '[{"prompt": "{} is located in", "subject": "Toyota", "target_new": "Paris"}]'
    )
    return {
        "model": model_dir,
        "data": tmp_path / "cf.json",
        "ckpt": tmp_path / "run" / "last.ckpt",
        "requests": requests,
        "out": tmp_path / "out",
    }


def test_evaluate_scores_a_trained_editor_in_the_table(saved: dict[str, Path]) -> None:
    import json

    from remedi import evaluate

    args = ["--model", str(saved["model"]), "--data", str(saved["data"]), "--limit", "2"]
    args += ["--method", "none", "--method", "mend", "--checkpoint", f"mend={saved['ckpt']}"]
    assert evaluate.main([*args, "--output", str(saved["out"])]) == 0
    rows = json.loads((saved["out"] / "summary.json").read_text())
    assert [r["method"] for r in rows] == ["none", "mend"]
    assert rows[1]["seconds_per_edit"] > 0 and 0.0 <= rows[1]["efficacy_score"] <= 1.0
    # the same edits made by hand: the trained editor loaded through the registry, each case
    # edited on its own, its probabilities read from the model's own logits
    import remedi

    lm = remedi.load_model(str(saved["model"]))
    mend = remedi.editor("mend", checkpoint=saved["ckpt"])
    margins = []
    for case in remedi.load_cases(saved["data"])[:2]:
        with mend.edit(lm, [case]):
            new = target_probability(lm, case.rewrite_prompt, str(case.target_new))
            true = target_probability(lm, case.rewrite_prompt, case.target_true)
        margins.append(new - true)
    assert rows[1]["efficacy_magnitude"] == pytest.approx(sum(margins) / 2, abs=1e-5)
    assert rows[1]["efficacy_magnitude"] != pytest.approx(rows[0]["efficacy_magnitude"], abs=1e-7)


def test_evaluate_refuses_a_checkpoint_of_another_method(
    saved: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from remedi import evaluate

    args = ["--model", str(saved["model"]), "--data", str(saved["data"]), "--method", "ke"]
    code = evaluate.main([*args, "--checkpoint", str(saved["ckpt"]), "--output", "x"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and last.startswith(f"error: --checkpoint {saved['ckpt']}: trained a 'mend'")


def test_edit_applies_a_trained_editor_and_saves_the_model(saved: dict[str, Path]) -> None:
    from remedi import edit
    from remedi.models import load_model

    args = [
        "mend",
        "--model",
        str(saved["model"]),
        "--requests",
        str(saved["requests"]),
        "--allow-failed",
    ]
    assert (
        edit.main([*args, "--checkpoint", str(saved["ckpt"]), "--output", str(saved["out"])]) == 0
    )
    edited = load_model(str(saved["out"]))
    original = load_model(str(saved["model"]))
    changed = [
        name
        for (name, a), b in zip(
            edited.model.named_parameters(), original.model.parameters(), strict=True
        )
        if not torch.equal(a, b)
    ]
    assert changed == ["model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"]
