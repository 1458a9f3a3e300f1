"""The gradient editors' token positions, locality term, neighbourhood pooling and selection
rule (issue: learned editors that hold on cases nobody tuned on)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import lightning_trainer, tiny_model
from lightning.pytorch.callbacks import Callback
from test_datamodules import write_mend, write_rome

from datamodules import CounterFactDataModule
from lightning_modules import MendModule, register_model
from lightning_modules.learned_editor import selection_score
from remedi.data import EditCase
from remedi.data.neighbourhoods import pool_neighbourhoods
from remedi.editors.gradient import apply_updates, edit_batch, position_mask, token_gradients
from remedi.editors.locality import (
    UneditedStates,
    locality_cells,
    locality_kl,
    locality_rows,
    training_texts,
)
from remedi.editors.mend import MendEditor
from remedi.models import LoadedModel
from remedi.tokens import encode_continuations, final_hidden, unembed


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    lm = tiny_model("gemma3_text")
    register_model(lm)
    return lm


def _case(i: int, subject: str, truth: str, neighbours: list[str]) -> EditCase:
    return EditCase(
        case_id=i,
        subject=subject,
        prompt="{} plays the",
        target_true=truth,
        target_new="piano",
        paraphrase_prompts=[f"{subject} is good at the"],
        neighborhood_prompts=neighbours,
    )


def test_positions_keep_only_the_subjects_tokens() -> None:
    tiny = tiny_model("gpt2")  # full attention: every prompt token has a gradient
    cases = [_case(0, "Toko Yasuda", "guitar", []), _case(1, "Miles Davis", "trumpet", [])]
    batch = edit_batch(tiny, cases)
    assert batch.subject_spans is not None
    every = token_gradients(tiny, [1], cases, "all")[0]
    last = token_gradients(tiny, [1], cases, "subject_last")[0]
    span = token_gradients(tiny, [1], cases, "subject")[0]
    assert last.groups.tolist() == [0, 1]  # one token a request
    widths = [s.end - s.start for s in batch.subject_spans]
    assert span.groups.tolist() == [0] * widths[0] + [1] * widths[1]
    assert len(every.groups) > len(span.groups)
    # the kept token's (u, δ) is the one the "all" gradients hold at that position
    mask = position_mask(batch, "all") & (batch.attention_mask > 0)
    rows, cols = mask.nonzero(as_tuple=True)
    kept = [(int(r), int(c)) for r, c in zip(rows, cols, strict=True)]
    at = kept.index((0, batch.subject_spans[0].last))
    torch.testing.assert_close(last.grads[0], every.grads[at])
    torch.testing.assert_close(last.inputs[0], every.inputs[at])


def test_an_editor_keyed_on_the_subject_writes_a_rank_one_update_per_layer(
    tiny: LoadedModel,
) -> None:
    weight = tiny.arch.mlp_out_weight(1)
    n_in, n_out = int(weight.shape[1]), int(weight.shape[0])
    editor = MendEditor([1], n_in, n_out, rank=4, positions="subject_last").eval()
    with torch.no_grad():
        (update,) = editor.updates(tiny, [_case(0, "Toko Yasuda", "guitar", [])])
    assert int(torch.linalg.matrix_rank(update.delta())) == 1
    with pytest.raises(ValueError, match="positions 'tokens' must be one of"):
        MendEditor([1], n_in, n_out, positions="tokens")  # type: ignore[arg-type]


def test_neighbourhoods_are_pooled_by_true_object_without_the_own_subject() -> None:
    cases = [
        _case(0, "A", "guitar", ["A1 plays the"]),
        _case(1, "B", "guitar", ["B1 plays the", "A is known for the"]),
        _case(2, "C", "guitar", ["C1 plays the"]),
        _case(3, "D", "drums", ["D1 plays the"]),
    ]
    zsre = EditCase(
        4, "E", "{} is", "x", "y", neighborhood_prompts=["q?"], neighborhood_targets=["z"]
    )
    pooled = pool_neighbourhoods([*cases, zsre], up_to=3)
    assert pooled[0].neighborhood_prompts[0] == "A1 plays the"  # its own first
    assert set(pooled[0].neighborhood_prompts) == {"A1 plays the", "B1 plays the", "C1 plays the"}
    assert "A is known for the" not in pooled[0].neighborhood_prompts  # mentions A itself
    assert set(pooled[2].neighborhood_prompts) >= {"C1 plays the", "A1 plays the"}
    assert len(pooled[1].neighborhood_prompts) == 3
    assert pooled[3].neighborhood_prompts == ["D1 plays the"]  # nobody else knows drums
    assert pooled[4] is zsre
    assert cases[0].neighborhood_prompts == ["A1 plays the"]  # copies, not edits
    assert pool_neighbourhoods(cases, up_to=3) == pooled[:4]  # the same every time


def test_locality_rows_draw_per_step_and_add_other_cases_facts() -> None:
    cases = [
        _case(0, "A", "guitar", [f"N{k} plays the" for k in range(6)]),
        _case(1, "B", "drums", ["M plays the"]),
    ]
    prompts, answers, groups = locality_rows(cases, per_case=2, unrelated=1, draw=None)
    assert prompts == ["N0 plays the", "N1 plays the", "B plays the", "M plays the", "A plays the"]
    assert answers == ["guitar", "guitar", "drums", "drums", "guitar"]
    assert groups == [0, 0, 0, 1, 1]
    draws = {tuple(locality_rows(cases, 2, 0, draw=str(step))[0][:2]) for step in range(20)}
    assert len(draws) > 3  # different steps see different neighbourhood prompts
    assert locality_rows(cases, 2, 0, draw="7") == locality_rows(cases, 2, 0, draw="7")


def test_locality_kl_is_the_kl_at_every_position_and_the_cache_changes_nothing(
    tiny: LoadedModel,
) -> None:
    cases = [_case(0, "Toko Yasuda", "guitar", ["John Lennon plays the"])]
    weight = tiny.arch.mlp_out_weight(1)
    editor = MendEditor([1], int(weight.shape[1]), int(weight.shape[0]), rank=4, init_step=50.0)
    with torch.no_grad():
        updates = editor.eval().updates(tiny, cases)
    prompts, answers = ["John Lennon plays the"], ["guitar"]
    plain = locality_kl(tiny, updates, prompts, answers, [0], "all")
    cache = UneditedStates()
    cache.fill(tiny, training_texts(cases))
    assert len(cache) == 2  # the neighbourhood prompt and the case's own fact
    cached = locality_kl(tiny, updates, prompts, answers, [0], "all", cache)
    torch.testing.assert_close(cached, plain, rtol=1e-4, atol=1e-6)
    # by hand: full log-softmax at every position whose next token is in the text
    batch = encode_continuations(tiny.tokenizer, prompts, answers)
    n = int(batch.attention_mask.sum())
    _, cols = locality_cells(batch, "all")
    assert cols.tolist() == list(range(n - 1))
    with torch.no_grad():
        before = torch.log_softmax(
            unembed(tiny.model, final_hidden(tiny.model, batch.input_ids, batch.attention_mask)),
            -1,
        )[0, : n - 1]
        with apply_updates(tiny, updates, [0]):
            after = torch.log_softmax(
                unembed(
                    tiny.model, final_hidden(tiny.model, batch.input_ids, batch.attention_mask)
                ),
                -1,
            )[0, : n - 1]
    by_hand = (before.exp() * (before - after)).sum()
    assert float(by_hand) > 0
    torch.testing.assert_close(plain, by_hand, rtol=1e-4, atol=1e-6)
    answer_only = locality_kl(tiny, updates, prompts, answers, [0], "answer")
    assert float(answer_only) < float(plain)


def test_selection_prefers_efficacy_only_while_the_neighbourhood_holds() -> None:
    assert selection_score(0.9, 0.80, unedited_neighborhood=0.84, margin=0.05) == 0.9
    below = selection_score(1.0, 0.70, unedited_neighborhood=0.84, margin=0.05)
    assert below < selection_score(0.1, 0.84, 0.84, 0.05)  # doing little but keeping wins
    assert below < 0
    assert selection_score(1.0, 0.75, 0.84, 0.05) > below  # closer to the floor ranks higher


def test_val_path_takes_the_validation_cases_and_overlaps_are_refused(tmp_path: Path) -> None:
    train = write_mend(tmp_path / "train.json")
    rows = json.loads(train.read_text())
    val = tmp_path / "val.json"
    val.write_text(json.dumps([{**r, "case_id": r["case_id"] + 1000} for r in rows[:3]]))
    dm = CounterFactDataModule(
        path=str(train), val_path=str(val), n_val=2, n_test=0, split="ordered", train_neighbors=3
    )
    dm.setup("fit")
    assert [c.case_id for c in dm.val_cases] == [1000, 1001]
    assert len(dm.train_cases) == len(rows)
    assert all(len(c.neighborhood_prompts) >= 1 for c in dm.train_cases)
    same = CounterFactDataModule(path=str(train), val_path=str(train), n_val=2, n_train=3)
    with pytest.raises(ValueError, match="the train and validation splits share"):
        same.setup("fit")


def test_training_logs_the_selection_and_keeps_its_best(tiny: LoadedModel, tmp_path: Path) -> None:
    data = CounterFactDataModule(
        path=str(write_rome(tmp_path / "cf.json")),
        n_train=4,
        n_val=2,
        n_test=0,
        split="ordered",
        batch_size=2,
        train_neighbors=4,
    )
    torch.manual_seed(0)
    module = MendModule(
        model=tiny.spec, layers=[1], positions="subject_last", loc_prompts=2, lr=1e-2
    )
    seen: list[tuple[int, float]] = []

    class Record(Callback):
        def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if not trainer.sanity_checking:
                value = float(trainer.callback_metrics["val/selection"])
                seen.append((trainer.current_epoch, value))

    trainer = lightning_trainer(
        tmp_path, max_epochs=3, limit_val_batches=None, callbacks=[Record()]
    )
    trainer.fit(module, data)
    assert "val/unedited_neighborhood" in trainer.callback_metrics
    assert module.unedited_val_neighborhood is not None
    assert len(module.unedited) == len(training_texts(data.train_cases))
    assert len(seen) == 3
    best_epoch, best = max(seen, key=lambda x: (x[1], -x[0]))
    assert module.best_selection == pytest.approx(best)
    assert module.best_epoch == best_epoch


def test_ke_conditions_on_the_prompt_and_both_objects(tiny: LoadedModel) -> None:
    from remedi.editors.ke import KeEditor

    weight = tiny.arch.mlp_out_weight(1)
    torch.manual_seed(0)
    editor = KeEditor([1], int(weight.shape[1]), int(weight.shape[0]), tiny.arch.hidden_size, 8)
    case = _case(0, "Toko Yasuda", "guitar", [])
    other_truth = _case(0, "Toko Yasuda", "violin", [])
    other_new = EditCase(0, "Toko Yasuda", "{} plays the", "guitar", "drums")
    c = editor.condition(tiny, [case, other_truth, other_new])
    assert not torch.allclose(c[0], c[1])  # the true object is read
    assert not torch.allclose(c[0], c[2])  # the new object is read
    # an untrained KE is the scaled gradient step: its conditioner's output layer starts at zero
    head = editor.heads[0](c)
    assert torch.all(head[:, : weight.shape[0]] == 0)


def test_the_lagrange_multiplier_rises_while_the_locality_constraint_is_broken(
    tiny: LoadedModel, tmp_path: Path
) -> None:
    from lightning_modules import KeModule

    torch.manual_seed(0)
    module = KeModule(model=tiny.spec, layers=[1], loc_margin=0.0, c_loc=1.0, init_step=1.0)
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Optimizer)
    cases = [_case(0, "Toko Yasuda", "guitar", ["John Lennon plays the"])]
    start = float(torch.nn.functional.softplus(module.multiplier))
    assert start == pytest.approx(1.0, rel=1e-5)
    for _ in range(3):
        terms = module.loss_terms(cases)
        assert float(terms["loc"]) > 0  # above the margin 0: the constraint is broken
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
    assert float(torch.nn.functional.softplus(module.multiplier)) > start
    relaxed = KeModule(model=tiny.spec, layers=[1], loc_margin=1e6, init_step=1.0)
    optimizer = relaxed.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Optimizer)
    before = float(torch.nn.functional.softplus(relaxed.multiplier))
    relaxed.loss_terms(cases)["loss"].backward()
    optimizer.step()
    assert float(torch.nn.functional.softplus(relaxed.multiplier)) < before  # constraint holds


def test_a_bf16_model_gets_the_float32_update_rounded_once() -> None:
    import copy

    from remedi.editors.gradient import write_updates
    from remedi.models import wrap_model

    lm32 = tiny_model("gemma3_text")
    model16 = copy.deepcopy(lm32.model).to(torch.bfloat16)
    lm16 = wrap_model(model16, lm32.tokenizer, spec="tiny-bf16")
    weight = lm32.arch.mlp_out_weight(1)
    torch.manual_seed(0)
    editor = MendEditor([1], int(weight.shape[1]), int(weight.shape[0]), rank=4, init_step=1e-3)
    cases = [_case(0, "Toko Yasuda", "guitar", [])]
    with torch.no_grad():
        (u32,) = editor.eval().updates(lm32, cases)
        (u16,) = editor.updates(lm16, cases)
    # the gradients of a bf16 LM point where the float32 ones do
    cosine = torch.nn.functional.cosine_similarity(u16.delta().flatten(), u32.delta().flatten(), 0)
    assert float(cosine) > 0.95
    original = lm16.arch.mlp_out_weight(1).detach().clone()
    handle = write_updates(lm16, [u16])
    expected = (original.float() + u16.delta()).to(torch.bfloat16)
    assert torch.equal(lm16.arch.mlp_out_weight(1), expected)
    assert not torch.equal(lm16.arch.mlp_out_weight(1), original)
    handle.restore()
    assert torch.equal(lm16.arch.mlp_out_weight(1), original)


def test_unedited_states_are_read_back_from_the_disk_cache(
    tiny: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import remedi.editors.locality as locality

    monkeypatch.setenv("REMEDI_CACHE", str(tmp_path / "cache"))
    cases = [_case(0, "Toko Yasuda", "guitar", ["John Lennon plays the", "Jimi Hendrix plays"])]
    texts = training_texts(cases)
    first = UneditedStates()
    assert not first.fill(tiny, texts, batch_size=2, cache=True)
    assert locality.states_path(tiny, texts, 2).is_file()

    def no_lm(*_args: object, **_kwargs: object) -> torch.Tensor:
        raise AssertionError("the LM must not run: the states are cached")

    monkeypatch.setattr(locality, "final_hidden", no_lm)
    second = UneditedStates()
    assert second.fill(tiny, texts, batch_size=2, cache=True)
    for key in texts:
        assert torch.equal(second._states[key], first._states[key])
    # other texts, another file; a damaged file is computed again, with a warning
    assert locality.states_path(tiny, texts[:1], 2) != locality.states_path(tiny, texts, 2)
    monkeypatch.undo()
    monkeypatch.setenv("REMEDI_CACHE", str(tmp_path / "cache"))
    locality.states_path(tiny, texts, 2).write_bytes(b"garbled")
    third = UneditedStates()
    assert not third.fill(tiny, texts, batch_size=2, cache=True)
    assert torch.equal(third._states[texts[0]], first._states[texts[0]])
