"""SERAC: memory, scope classifier, routing, the counterfactual LoRA model and its training."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from conftest import lightning_trainer, tiny_model
from lightning.pytorch.callbacks import ModelCheckpoint
from test_datamodules import write_rome

from datamodules import CounterFactDataModule
from lightning_modules import register_model
from lightning_modules.serac_module import SeracModule
from remedi import checkpoints, registry
from remedi.data import EditCase, load_cases
from remedi.editors.serac import (
    SeracEditor,
    context_text,
    counterfactual_states,
    prefixed_ids,
    query_states,
    routed_edit,
    scope_terms,
)
from remedi.evaluation.runner import score_cases
from remedi.evaluation.stream import Schedule, run_stream
from remedi.metrics import ScoredRow, evaluate_cases
from remedi.metrics.rows import scored_chunks
from remedi.models import LoadedModel
from remedi.tokens import encode_continuations, final_hidden


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    lm = tiny_model("gemma3_text")
    register_model(lm)
    return lm


def _cases(tmp_path: Path) -> list[EditCase]:
    return load_cases(write_rome(tmp_path / "cf.json"))


def _digest(lm: LoadedModel) -> str:
    h = hashlib.sha256()
    for name, p in sorted(lm.model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _editor(lm: LoadedModel, seed: int = 0) -> SeracEditor:
    torch.manual_seed(seed)
    weight = lm.arch.mlp_out_weight(0)
    editor = SeracEditor(
        list(range(lm.arch.num_layers)),
        int(weight.shape[1]),
        int(weight.shape[0]),
        lm.arch.hidden_size,
        scope_layer=1,
        rank=4,
        width=16,
    )
    for module in editor.lora_B.values():  # a non-identity adapter
        torch.nn.init.normal_(module.weight, std=0.5)
    return editor


@pytest.mark.parametrize("model_type", ["gemma3_text", "gpt2"])  # out_in and in_out layouts
def test_counterfactual_model_is_the_lm_with_a_lora_update_and_leaves_it(model_type: str) -> None:
    lm = tiny_model(model_type)
    editor = _editor(lm)
    names = [n for n, _ in lm.model.named_modules()]
    digest = _digest(lm)
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    mask = torch.ones_like(ids)
    plain = final_hidden(lm.model, ids, mask)
    layer = 1
    with editor.counterfactual(lm):
        adapted = final_hidden(lm.model, ids, mask)
        wrapped = lm.arch.mlp_out(layer)
        x = torch.randn(3, editor.lora_A[str(layer)].in_features)
        scale = editor.alpha / editor.rank
        by_hand = wrapped.get_base_layer()(x) + scale * (
            x @ editor.lora_A[str(layer)].weight.T @ editor.lora_B[str(layer)].weight.T
        )
        torch.testing.assert_close(wrapped(x), by_hand)
    assert not torch.allclose(plain, adapted)
    assert [n for n, _ in lm.model.named_modules()] == names
    assert "peft_config" not in vars(lm.model)
    assert _digest(lm) == digest
    assert torch.equal(final_hidden(lm.model, ids, mask), plain)


def test_prefixed_rows_keep_their_own_tokens(tiny: LoadedModel, tmp_path: Path) -> None:
    case = _cases(tmp_path)[0]
    batch = encode_continuations(tiny.tokenizer, [case.rewrite_prompt], [case.target_new or ""])
    row = [int(t) for t in batch.input_ids[0]]
    full = prefixed_ids(tiny.tokenizer, context_text(case), row)
    context = list(tiny.tokenizer(context_text(case))["input_ids"])
    assert full[: len(context)] == context
    assert full[len(context) :] == row[1:]  # the row's BOS is the context's


def test_identity_adapter_gives_the_lm_reading_the_statement(
    tiny: LoadedModel, tmp_path: Path
) -> None:
    case = _cases(tmp_path)[0]
    editor = _editor(tiny)
    for module in editor.lora_B.values():
        torch.nn.init.zeros_(module.weight)
    batch = encode_continuations(tiny.tokenizer, [case.rewrite_prompt], [" far away place"])
    with torch.no_grad():
        states = counterfactual_states(tiny, editor, batch, [0], [context_text(case)])
    text = context_text(case) + case.rewrite_prompt
    by_text = encode_continuations(tiny.tokenizer, [text], [" far away place"])
    site_rows = by_text.target_positions()[0, : int(by_text.target_lengths[0])]
    with torch.no_grad():
        hidden = final_hidden(tiny.model, by_text.input_ids, by_text.attention_mask)
    torch.testing.assert_close(tiny.arch.final_norm(states), hidden[0, site_rows])


def _rows(cases: list[EditCase]) -> list[ScoredRow]:
    rows = []
    for i, case in enumerate(cases):
        for prompt in [case.rewrite_prompt, *case.paraphrase_prompts, *case.neighborhood_prompts]:
            rows.append(ScoredRow(i, "rewrite", prompt, None, case.target_true))
    return rows


def test_out_of_scope_rows_are_bitwise_the_lm_and_in_scope_rows_are_not(
    tiny: LoadedModel, tmp_path: Path
) -> None:
    cases = _cases(tmp_path)[:3]
    editor = _editor(tiny)
    with torch.no_grad():
        memory = editor.memory(tiny, cases)
        queries = query_states(tiny, 1, [r.prompt for r in _rows(cases)])
        probability = torch.sigmoid(editor.scope.logits(queries, memory.keys)).max(1).values
    # a bias between the rows' probabilities routes some rows in and the others out
    ranked = probability.unique()  # sorted
    middle = len(ranked) // 2
    cut = (ranked[middle - 1] + ranked[middle]) / 2
    with torch.no_grad():
        editor.scope.bias -= torch.logit(cut.clamp(1e-4, 1 - 1e-4))
    rows = _rows(cases)
    edit = routed_edit(tiny, editor, memory)
    plain = list(scored_chunks(tiny.model, tiny.tokenizer, rows, batch_size=64))
    routed = list(scored_chunks(tiny.model, tiny.tokenizer, rows, edit, batch_size=64))
    in_scope = (probability > cut).tolist()
    assert 0 < sum(in_scope) < len(rows)
    (indices, before), (_, after) = plain[0], routed[0]
    for j, i in enumerate(indices):
        same = torch.equal(before.token_logprobs[j], after.token_logprobs[j])
        assert same != in_scope[i], rows[i].prompt


def test_trained_classifier_routes_each_paraphrase_to_its_edit(
    tiny: LoadedModel, tmp_path: Path
) -> None:
    cases = _cases(tmp_path)
    editor = _editor(tiny)
    optimiser = torch.optim.Adam(editor.scope.parameters(), lr=3e-2)
    for _ in range(150):
        loss = scope_terms(tiny, editor, cases)["scope"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        memory = editor.memory(tiny, cases)
        for i, case in enumerate(cases):
            routing = editor.route(query_states(tiny, 1, case.paraphrase_prompts), memory)
            assert routing.edit.tolist() == [i] * len(case.paraphrase_prompts)
            assert routing.in_scope.all()
            if any(case.subject in p for p in case.neighborhood_prompts):
                continue  # ("The capital of Italy is" for Italy): no real neighbour names it
            outside = query_states(tiny, 1, case.neighborhood_prompts)
            own = torch.full((len(case.neighborhood_prompts),), i)
            assert not editor.route(outside, memory, own).in_scope.any()


def _data(tmp_path: Path) -> CounterFactDataModule:
    path = tmp_path / "cf.json"
    if not path.exists():
        write_rome(path)
    return CounterFactDataModule(
        path=str(path), n_train=6, n_val=2, n_test=2, split="ordered", batch_size=2
    )


def _module(tiny: LoadedModel) -> SeracModule:
    torch.manual_seed(0)
    return SeracModule(model=tiny.spec, scope_layer=1, rank=4, width=16, lr=1e-2)


def test_training_trains_the_editor_and_leaves_the_lm(tiny: LoadedModel, tmp_path: Path) -> None:
    digest = _digest(tiny)
    module = _module(tiny)
    start = {k: v.clone() for k, v in module.editor.state_dict().items()}
    trainer = lightning_trainer(tmp_path, max_epochs=1, limit_val_batches=None)
    trainer.fit(module, _data(tmp_path))
    assert _digest(tiny) == digest
    changed = [k for k, v in module.editor.state_dict().items() if not torch.equal(v, start[k])]
    assert any("lora_B" in k for k in changed) and any("scope" in k for k in changed)
    for name in ("scope", "edit", "loc", "efficacy_score", "neighborhood_score", "selection"):
        assert f"val/{name}" in trainer.callback_metrics, name
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert all(key.startswith("editor.") for key in saved["state_dict"])
    assert saved["remedi"]["method"] == "serac"


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
    lightning_trainer(tmp_path / "a", max_steps=2 * n, callbacks=[every_n]).fit(
        straight, _data(tmp_path)
    )
    resumed = _module(tiny)
    trainer = lightning_trainer(tmp_path / "b", max_steps=2 * n)
    trainer.fit(resumed, _data(tmp_path), ckpt_path=str(tmp_path / "a" / f"step{n}.ckpt"))
    for (name, a), b in zip(
        straight.editor.state_dict().items(), resumed.editor.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


@pytest.fixture
def trained(tiny: LoadedModel, tmp_path: Path) -> Path:
    lightning_trainer(tmp_path, max_steps=2).fit(_module(tiny), _data(tmp_path))
    return tmp_path / "last.ckpt"


def test_registered_method_scores_from_a_checkpoint_and_an_export(
    tiny: LoadedModel, trained: Path, tmp_path: Path
) -> None:
    cases = _cases(tmp_path)[:3]
    folder = checkpoints.export(trained, tmp_path / "serac-export")
    assert not any("model." in k for k in checkpoints.read(folder)["editor_state"])
    rows = [registry.editor("serac", checkpoint=path) for path in (trained, folder)]
    digest = _digest(tiny)
    found = []
    for method in rows:
        method.bind(tiny)
        with method.edit(tiny, cases[:1]) as edited:
            assert edited.row_edit is not None
            _, per_case = evaluate_cases(
                tiny.model, tiny.tokenizer, cases[:1], edit=edited.row_edit
            )
        found.append(per_case[0])
    assert found[0] == found[1]
    assert _digest(tiny) == digest


def test_stream_memory_grows_and_is_emptied(
    tiny: LoadedModel, trained: Path, tmp_path: Path
) -> None:
    cases = _cases(tmp_path)
    method = registry.editor("serac", checkpoint=trained)
    method.bind(tiny)
    digest = _digest(tiny)
    seen: list[int] = []
    remember = method.remember

    def counted(lm: LoadedModel, group: list[EditCase]) -> None:
        remember(lm, group)
        assert method.stream_memory is not None
        seen.append(len(method.stream_memory))

    method.remember = counted  # type: ignore[method-assign]
    result = run_stream(tiny, method, cases, Schedule.parse("batch:2"), [2])
    assert seen == list(range(2, len(cases) + 1, 2))
    assert method.stream_memory is None
    assert result.supported and all(m for m in result.per_case)
    assert _digest(tiny) == digest
    # the final scores are those of one memory of every case
    memory_method = registry.editor("serac", checkpoint=trained)
    memory_method.bind(tiny)
    memory_method.begin_stream(tiny)
    memory_method.remember(tiny, cases)
    again = score_cases(
        tiny, memory_method.environment, cases, range(len(cases)), memory_method.stream_edit(tiny)
    )
    assert [m["efficacy_score"] for m in again] == [m["efficacy_score"] for m in result.per_case]


def test_bad_settings_fail_early(tiny: LoadedModel) -> None:
    with pytest.raises(ValueError, match="layer 9"):
        SeracModule(model=tiny.spec, scope_layer=9)
    with pytest.raises(ValueError, match="rank"):
        SeracModule(model=tiny.spec, rank=0)
    with pytest.raises(ValueError, match="c_loc"):
        SeracModule(model=tiny.spec, c_loc=-1.0)


@pytest.fixture
def saved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A tiny model saved as a directory, a data file and a SERAC checkpoint trained for it."""
    from remedi.models import load_model

    monkeypatch.setenv("REMEDI_CACHE", str(tmp_path / "cache"))
    tiny = tiny_model("gemma3_text")
    model_dir = tmp_path / "model"
    tiny.model.save_pretrained(model_dir)
    tiny.tokenizer.save_pretrained(model_dir)
    lm = load_model(str(model_dir))
    register_model(lm)
    torch.manual_seed(0)
    module = SeracModule(model=lm.spec, scope_layer=1, rank=4, width=16, lr=1e-2)
    lightning_trainer(tmp_path / "run", max_epochs=1, limit_val_batches=None).fit(
        module, _data(tmp_path)
    )
    requests = tmp_path / "requests.json"
    requests.write_text(
        '[{"prompt": "{} is located in", "subject": "Toyota", "target_new": "Paris",'
        ' "target_true": "Japan"}, {"prompt": "{} makes", "subject": "Sony",'
        ' "target_new": "bread", "target_true": "televisions"}]'
    )
    return {
        "model": model_dir,
        "data": tmp_path / "cf.json",
        "ckpt": tmp_path / "run" / "last.ckpt",
        "requests": requests,
        "out": tmp_path / "out",
    }


@pytest.mark.parametrize("schedule", ["independent", "sequential"])
def test_evaluate_scores_serac_under_each_schedule(saved: dict[str, Path], schedule: str) -> None:
    import json

    from remedi import evaluate

    args = ["--model", str(saved["model"]), "--data", str(saved["data"]), "--limit", "4"]
    args += ["--method", "none", "--method", "serac", "--checkpoint", f"serac={saved['ckpt']}"]
    args += ["--schedule", schedule, "--output", str(saved["out"])]
    assert evaluate.main(args) == 0
    rows = json.loads((saved["out"] / "summary.json").read_text())
    assert [r["method"] for r in rows] == ["none", "serac"]
    serac = rows[1]
    assert serac["schedule"].startswith(schedule) and serac["n_cases"] == 4
    for name in ("efficacy_score", "paraphrase_score", "neighborhood_score"):
        assert serac[name] is not None, name
    # free text does not pass through the routing: n/a, not the unedited model's value
    assert serac["perplexity_ratio"] is None and rows[0]["perplexity_ratio"] == 1.0


def test_edit_saves_a_memory_that_reloads_onto_the_unchanged_model(
    saved: dict[str, Path],
) -> None:
    import json

    from remedi import edit
    from remedi.methods.serac_editor import load_memory
    from remedi.metrics import row_probabilities
    from remedi.models import load_model

    args = ["serac", "--model", str(saved["model"]), "--requests", str(saved["requests"])]
    args += ["--checkpoint", str(saved["ckpt"]), "--output", str(saved["out"]), "--allow-failed"]
    assert edit.main(args) == 0
    assert not list(saved["out"].glob("*.safetensors"))  # no model: its weights did not change
    report = json.loads((saved["out"] / "edits.json").read_text())
    lm, method = load_memory(saved["out"], load_model(str(saved["model"])))
    assert method.stream_memory is not None and len(method.stream_memory) == 2
    rows = [
        ScoredRow(0, "rewrite", "Toyota is located in", "Toyota", "Paris"),
        ScoredRow(1, "rewrite", "Sony makes", "Sony", "bread"),
    ]
    probs = row_probabilities(lm.model, lm.tokenizer, rows, method.stream_edit(lm))
    assert probs.tolist() == pytest.approx([entry["after"]["p_new"] for entry in report])


def test_generation_is_routed_like_scored_prompts(tiny: LoadedModel, tmp_path: Path) -> None:
    from remedi.editors.serac import routed_generate
    from remedi.tokens import generate_text

    case = _cases(tmp_path)[0]
    editor = _editor(tiny)
    memory = editor.memory(tiny, [case])
    prompt = case.paraphrase_prompts[0]
    with torch.no_grad():
        editor.scope.bias.fill_(-100.0)  # nothing in scope: the LM's own continuation
    assert routed_generate(tiny, editor, memory, prompt, 6) == generate_text(tiny, prompt, 6)
    with torch.no_grad():
        editor.scope.bias.fill_(100.0)  # everything in scope: the counterfactual model's
    with editor.counterfactual(tiny):
        expected = generate_text(tiny, context_text(case) + prompt, 6)
    assert routed_generate(tiny, editor, memory, prompt, 6) == expected
    assert expected != generate_text(tiny, context_text(case) + prompt, 6)
