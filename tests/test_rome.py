"""ROME on tiny random models (tail forward, rank-one algebra, reversibility) and one slow
check on the default model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import MODEL_TYPES, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from remedi.data import EditCase
from remedi.methods import rome, second_moment
from remedi.methods.requests import EditRequest
from remedi.metrics import evaluate_cases
from remedi.models import LoadedModel, cast_copy

REQUEST = EditRequest("{} is located in", "The Eiffel Tower", "Japan")
FAST = rome.RomeHyperParams(layer=1, n_context=3, steps=6, lr=0.01, weight_decay=0.0)


def _params(lm: LoadedModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_tail_logits_match_full_forward(model_type: str) -> None:
    lm = tiny_model(model_type)
    ids = torch.randint(3, 300, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        full = lm.model(input_ids=ids, attention_mask=mask).logits
        tail = rome.ForwardTail(lm, 1, ids, mask)
        rows, cols = torch.tensor([0, 0, 1]), torch.tensor([2, 6, 4])
        torch.testing.assert_close(tail.logits_at(rows, cols), full[rows, cols])


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_suffix_run_logits_match_full_forward(model_type: str) -> None:
    lm = tiny_model(model_type)
    rows = [torch.randint(3, 300, (n,)) for n in (7, 4, 9)]
    split = [3, 1, 5]
    with torch.no_grad():
        run = rome.SuffixRun(lm, rows, split)
        for i, row in enumerate(rows):
            full = lm.model(input_ids=row[None]).logits[0]
            cols = torch.arange(split[i], len(row))
            got = run.logits_at(torch.full_like(cols, i), cols)
            torch.testing.assert_close(got, full[cols], rtol=1e-4, atol=1e-4)


def test_deltas_optimised_in_bfloat16_match_float32() -> None:
    """δ optimised on a cached bfloat16 copy lands where float32 would."""
    lm = tiny_model("gemma3_text")
    site = rome.Site("mlp", 1)
    templates = rome.context_templates(2)
    hp = rome.RomeHyperParams(n_context=2, steps=5, lr=0.05, clamp=1.0, optimise_dtype="bfloat16")
    fast = rome.optimise_delta(lm, site, REQUEST, templates, hp)
    exact = rome.optimise_delta(lm, site, REQUEST, templates, replace(hp, optimise_dtype=None))
    assert rome.optimisation_model(lm, "bfloat16").dtype is torch.bfloat16
    assert rome.optimisation_model(lm, None) is lm
    cosine = torch.nn.functional.cosine_similarity(fast.delta, exact.delta, dim=0)
    assert float(cosine) > 0.95
    assert fast.target_prob == pytest.approx(exact.target_prob, rel=0.05)


@pytest.mark.parametrize("bf16_fast", [True, False])
def test_auto_optimises_in_bfloat16_only_where_the_cpu_runs_it_fast(
    monkeypatch: pytest.MonkeyPatch, bf16_fast: bool
) -> None:
    """An AVX2-only CPU runs bfloat16 matrix products tens of times slower than float32, so
    ``"auto"`` (the default) keeps the float32 LM there and takes the bfloat16 copy elsewhere."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: bf16_fast)
    assert cast_copy.fast_dtype("cpu") is (torch.bfloat16 if bf16_fast else None)
    lm = tiny_model("gemma3_text")
    assert rome.RomeHyperParams().optimise_dtype == "auto"
    chosen = rome.optimisation_model(lm, "auto")
    assert chosen.dtype is (torch.bfloat16 if bf16_fast else torch.float32)
    assert (chosen is lm) is not bf16_fast
    assert cast_copy.fast_dtype("meta") is None


def test_batched_deltas_match_one_request_at_a_time() -> None:
    lm = tiny_model("gemma3_text")
    requests = [REQUEST, EditRequest("{} makes", "Toyota", "phones")]
    hp = rome.RomeHyperParams(n_context=2, steps=5, lr=0.05, loss_threshold=0.05, clamp=1.0)
    site = rome.Site("mlp", 1)
    templates = rome.context_templates(hp.n_context)
    together = rome.optimise_deltas(lm, site, requests, templates, hp)
    for request, batched in zip(requests, together, strict=True):
        alone = rome.optimise_delta(lm, site, request, templates, hp)
        torch.testing.assert_close(batched.delta, alone.delta, atol=1e-4, rtol=1e-4)
        assert batched.steps == alone.steps and batched.init_norm == pytest.approx(alone.init_norm)
        assert batched.losses == pytest.approx(alone.losses, rel=1e-4)


def test_rank_one_update_maps_key_to_value() -> None:
    torch.manual_seed(0)
    weight = torch.randn(6, 10)
    a = torch.randn(10, 40, dtype=torch.float64)
    c = a @ a.T / 40
    key, delta = torch.randn(10), torch.randn(6)
    update = rome.rank_one_update(weight, key, delta, c)
    torch.testing.assert_close((weight + update) @ key, weight @ key + delta)
    assert torch.linalg.matrix_rank(update.double(), rtol=1e-5) == 1


class _NoSquare(TorchDispatchMode):
    """Fails any operation whose result is a ``width`` × ``width`` matrix."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor) and tuple(item.shape) == (self.width, self.width):
                raise AssertionError(f"{func} built a {self.width} x {self.width} matrix")
        return out


@contextmanager
def no_square_matrix(width: int) -> Iterator[None]:
    """Inside, no torch operation may produce a ``width`` × ``width`` matrix (identity
    statistics must not build one, not even the identity)."""
    with _NoSquare(width):
        yield


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture
def collected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> second_moment.SecondMoment:
    """Cached layer-1 statistics of the tiny Llama (width 48) over 400 tokens."""
    monkeypatch.setenv("REMEDI_CACHE", str(tmp_path / "cache"))
    second_moment.release_inverses()
    lm = tiny_model("llama")
    return second_moment.collect(lm, [1], None, n_tokens=400, chunk_len=64, progress=False)[1]


def test_cached_inverse_update_equals_a_direct_float64_solve(
    collected: second_moment.SecondMoment,
) -> None:
    torch.manual_seed(0)
    c = collected.matrix
    weight = torch.zeros(6, c.shape[0], dtype=torch.float64)
    key, delta = torch.randn(c.shape[0]), torch.randn(6)
    cached = rome.rank_one_update(weight, key, delta, inverse=collected.inverse("cpu"))
    left = torch.linalg.solve(c, key.double())
    direct = torch.outer(delta.double(), left) / torch.dot(key.double(), left)
    assert _relative(cached, direct) < 1e-6
    assert _relative(rome.rank_one_update(weight, key, delta, c), direct) < 1e-6


def test_identity_update_is_the_unwhitened_rank_one_update() -> None:
    torch.manual_seed(0)
    weight, key, delta = torch.zeros(6, 10, dtype=torch.float64), torch.randn(10), torch.randn(6)
    expected = torch.outer(delta, key).double() / key.double().dot(key.double())
    with no_square_matrix(10):
        update = rome.rank_one_update(weight, key, delta)
    torch.testing.assert_close(update, expected)


def test_identity_statistics_build_no_square_matrix() -> None:
    lm = tiny_model("gpt2")
    width = lm.arch.mlp_hidden_size
    assert width != lm.arch.hidden_size
    with no_square_matrix(width), rome.apply_edit(lm, REQUEST, hparams=FAST) as handle:
        assert handle.info["whitened"] is False


def test_edit_with_collected_statistics_uses_the_cached_inverse(
    collected: second_moment.SecondMoment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The edit whitens by the cached inverse (no solve), and maps k* to v*."""
    lm = tiny_model("llama")
    collected.inverse(lm.device)

    def no_solve(*_: object, **__: object) -> None:
        raise AssertionError("a d x d system was solved during the edit")

    monkeypatch.setattr(torch.linalg, "solve", no_solve)
    monkeypatch.setattr(second_moment, "factorise", no_solve)
    with rome.apply_edit(lm, REQUEST, stats=collected, hparams=FAST) as handle:
        key, value = handle.info["key"], handle.info["value"]
        assert isinstance(key, torch.Tensor) and isinstance(value, torch.Tensor)
        weight = lm.arch.mlp_out_weight(1).detach()
        torch.testing.assert_close(weight @ key, value, rtol=1e-4, atol=1e-4)
        assert handle.info["whitened"] is True


def test_request_states_batch_matches_one_request_at_a_time() -> None:
    lm = tiny_model("gpt2")
    requests = [REQUEST, EditRequest("{} makes", "Toyota", "phones")]
    templates = rome.context_templates(3)
    sites = [rome.Site("mlp_in", 1), rome.Site("block", 2)]
    together = rome.request_states(lm, sites, requests, templates, batch_rows=3)
    for i, request in enumerate(requests):
        alone = rome.subject_states(lm, sites, request, templates)
        for site in sites:
            torch.testing.assert_close(together[site][i], alone[site], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gptj", "gemma3_text"])
def test_edit_maps_key_to_value_and_restores_bitwise(model_type: str) -> None:
    lm = tiny_model(model_type)
    before = _params(lm)
    width = lm.arch.mlp_hidden_size
    a = torch.randn(width, 4 * width, dtype=torch.float64)
    handle = rome.apply_edit(lm, REQUEST, stats=a @ a.T / (4 * width), hparams=FAST)
    key, value = handle.info["key"], handle.info["value"]
    assert isinstance(key, torch.Tensor) and isinstance(value, torch.Tensor)
    weight = lm.arch.mlp_out_weight(1).detach()
    torch.testing.assert_close(weight @ key, value, rtol=1e-4, atol=1e-4)
    losses = handle.info["losses"]
    assert isinstance(losses, list) and losses[-1] < losses[0]
    changed = [n for n, p in lm.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed == handle.names
    handle.restore()
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())


def test_edit_accepts_cases_and_rejects_bad_input() -> None:
    lm = tiny_model("gpt2")
    case = EditCase(0, "Toyota", "{} makes", "cars", "phones")
    with rome.apply_edit(lm, case, hparams=rome.RomeHyperParams(layer=0, n_context=1, steps=2)):
        pass
    with pytest.raises(ValueError, match="layer 7 is out of range"):
        rome.apply_edit(lm, REQUEST, layer=7)
    with pytest.raises(ValueError, match="target_new is empty"):
        rome.apply_edit(lm, EditRequest("{} is in", "Paris", " "))
    with pytest.raises(ValueError, match="exactly one"):
        rome.apply_edit(lm, EditRequest("Paris is in", "Paris", "Spain"))


@pytest.mark.slow
def test_rome_flips_a_known_fact_on_the_default_model(gemma: LoadedModel) -> None:
    """Without corpus statistics (identity C) the fact and a paraphrase flip. Neighbours are not
    checked: an unwhitened update also moves other companies (see the report's measurements,
    which use corpus statistics)."""
    case = EditCase(
        0,
        "Toyota",
        "{} is headquartered in",
        "Japan",
        "Germany",
        paraphrase_prompts=["Toyota's head office is located in"],
    )
    _, before = evaluate_cases(gemma.model, gemma.tokenizer, [case])
    assert before[0]["efficacy_score"] == 0.0
    with rome.apply_edit(gemma, case) as handle:
        _, per_case = evaluate_cases(gemma.model, gemma.tokenizer, [case])
    assert handle.restored
    assert per_case[0]["efficacy_score"] == 1.0
    assert per_case[0]["paraphrase_score"] == 1.0
