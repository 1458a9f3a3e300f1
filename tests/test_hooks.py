"""The one hook mechanism: record, add, replace; gradients flow; hooks always come off."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_TYPES, tiny_model

from remedi.hooks import EMBEDDINGS, Site, add_at, intervene, replace_at, scale_at


def _batch(lm, texts=("The Eiffel Tower is in Paris", "Toyota makes cars")):
    enc = lm.tokenizer(list(texts), return_tensors="pt", padding=True, padding_side="right")
    return enc["input_ids"], enc["attention_mask"]


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_recorded_blocks_match_hidden_states(model_type: str) -> None:
    lm = tiny_model(model_type)
    ids, mask = _batch(lm)
    sites = [Site("block", layer) for layer in range(lm.arch.num_layers)]
    with torch.no_grad(), intervene(lm.arch, record=sites) as states:
        out = lm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    last = lm.arch.num_layers - 1
    for layer in range(last):
        torch.testing.assert_close(states[Site("block", layer)], out.hidden_states[layer + 1])
    # HF applies the final norm to its last hidden state.
    torch.testing.assert_close(
        lm.arch.final_norm(states[Site("block", last)]), out.hidden_states[last + 1]
    )


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_record_widths_of_every_kind(model_type: str) -> None:
    lm = tiny_model(model_type)
    ids, mask = _batch(lm)
    sites = [Site(kind, 1) for kind in ("block", "attn", "mlp", "mlp_in")]
    with torch.no_grad(), intervene(lm.arch, record=sites) as states:
        lm.model(input_ids=ids, attention_mask=mask)
    for site in sites:
        width = lm.arch.mlp_hidden_size if site.kind == "mlp_in" else lm.arch.hidden_size
        assert states[site].shape == (*ids.shape, width), site
    assert _hook_count(lm.model) == 0


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("kind", ["block", "attn", "mlp", "mlp_in"])
def test_edit_changes_only_later_positions(model_type: str, kind: str) -> None:
    lm = tiny_model(model_type)
    ids, mask = _batch(lm)
    with torch.no_grad():
        clean = lm.model(input_ids=ids, attention_mask=mask).logits
        site = Site(kind, 1)  # type: ignore[arg-type]
        width = lm.arch.mlp_hidden_size if kind == "mlp_in" else lm.arch.hidden_size
        with intervene(lm.arch, edit={site: add_at([3, 2], torch.full((width,), 5.0))}):
            edited = lm.model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(edited[0, :3], clean[0, :3])
    torch.testing.assert_close(edited[1, :2], clean[1, :2])
    assert not torch.allclose(edited[0, 3:], clean[0, 3:])
    assert not torch.allclose(edited[1, 2:], clean[1, 2:])


def test_replace_with_clean_state_restores_clean_run() -> None:
    lm = tiny_model("gpt2")
    ids, mask = _batch(lm)
    site = Site("block", 0)
    with torch.no_grad():
        with intervene(lm.arch, record=[site]) as states:
            clean = lm.model(input_ids=ids, attention_mask=mask).logits
        noisy = add_at([1, 1], torch.full((lm.arch.hidden_size,), 3.0))
        restore = replace_at([1, 1], states[site][:, 1])
        with intervene(lm.arch, edit={Site("attn", 0): noisy, site: restore}):
            restored = lm.model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(restored, clean)


def test_scale_units_at_mlp_in() -> None:
    lm = tiny_model("llama")
    ids, mask = _batch(lm)
    site = Site("mlp_in", 2)
    units = torch.tensor([0, 5])
    with torch.no_grad():
        with intervene(lm.arch, record=[site]) as clean:
            lm.model(input_ids=ids, attention_mask=mask)
        before = clean[site].clone()
        with intervene(lm.arch, edit={site: scale_at([4, 4], 0.0, units)}, record=[site]) as got:
            lm.model(input_ids=ids, attention_mask=mask)
    after = got[site]
    assert torch.all(after[:, 4, units] == 0)
    torch.testing.assert_close(after[:, 4, 6:], before[:, 4, 6:])
    torch.testing.assert_close(after[:, :4], before[:, :4])


def test_gradients_flow_through_an_edit() -> None:
    lm = tiny_model("gemma3_text")
    ids, mask = _batch(lm)
    delta = torch.zeros(lm.arch.hidden_size, requires_grad=True)
    with intervene(lm.arch, edit={Site("block", 0): add_at([2, 2], delta)}):
        loss = lm.model(input_ids=ids, attention_mask=mask).logits[:, -1].logsumexp(-1).sum()
    loss.backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0
    assert all(p.grad is None for p in lm.model.parameters())


def test_hooks_removed_on_exception() -> None:
    lm = tiny_model("gptj")
    with (
        pytest.raises(RuntimeError, match="boom"),
        intervene(lm.arch, record=[Site("mlp", 0)], edit={Site("mlp_in", 1): lambda h: h}),
    ):
        raise RuntimeError("boom")
    assert _hook_count(lm.model) == 0


def test_stop_after_ends_forward_early() -> None:
    lm = tiny_model("gpt_neox")
    ids, mask = _batch(lm)
    ran_after = []
    handle = lm.arch.block(2).register_forward_hook(lambda *_: ran_after.append(True))
    try:
        with (
            torch.no_grad(),
            intervene(lm.arch, record=[Site("block", 1)], stop_after=Site("block", 1)) as states,
        ):
            lm.model(input_ids=ids, attention_mask=mask)
            pytest.fail("the forward pass should have stopped")
    finally:
        handle.remove()
    assert not ran_after
    assert states[Site("block", 1)].shape[:2] == ids.shape


def test_stop_after_mlp_in_skips_the_output_projection() -> None:
    """Stopping at a key (the output projection's input) records it without running the
    projection."""
    lm = tiny_model("gemma3_text")
    ids, mask = _batch(lm)
    ran: list[bool] = []
    handle = lm.arch.mlp_out(1).register_forward_hook(lambda *_: ran.append(True))
    site = Site("mlp_in", 1)
    try:
        with torch.no_grad(), intervene(lm.arch, record=[site], stop_after=site) as states:
            lm.model(input_ids=ids, attention_mask=mask)
    finally:
        handle.remove()
    assert not ran
    assert states[site].shape == (*ids.shape, lm.arch.mlp_hidden_size)


def test_prompt_pass_only_edits_generation_prefill() -> None:
    lm = tiny_model("llama")
    ids, mask = _batch(lm, ["The Eiffel Tower is in"])
    calls: list[int] = []

    def edit(h: torch.Tensor) -> torch.Tensor:
        calls.append(h.shape[1])
        return h

    with torch.no_grad(), intervene(lm.arch, edit={Site("block", 0): edit}, prompt_pass_only=True):
        lm.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=3,
            do_sample=False,
            pad_token_id=lm.tokenizer.pad_token_id,
        )
    assert calls == [ids.shape[1]]


def test_add_at_rejects_mismatched_vectors() -> None:
    fn = add_at([1, 2], torch.zeros(3, 8))
    with pytest.raises(ValueError, match="match neither the batch"):
        fn(torch.zeros(2, 4, 8))


def test_bad_site_kind() -> None:
    with pytest.raises(ValueError, match="site kind 'resid'"):
        Site("resid", 0)  # type: ignore[arg-type]


def test_embedding_site_matches_input_embeddings() -> None:
    lm = tiny_model("gemma3_text")
    ids, mask = _batch(lm)
    with torch.no_grad(), intervene(lm.arch, record=[EMBEDDINGS]) as states:
        out = lm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    torch.testing.assert_close(states[EMBEDDINGS], out.hidden_states[0])
