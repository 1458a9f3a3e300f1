"""Second-moment statistics: exact accumulation, caching and cache keys."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from remedi.hooks import Site, intervene
from remedi.methods import second_moment


@pytest.fixture
def corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("REMEDI_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "corpus.txt"
    path.write_text(
        "The Eiffel Tower is in Paris.\n\nToyota makes cars in Japan.\n"
        "Berlin is the capital of Germany.\nApple makes the iPhone.\n" * 4
    )
    return path


def test_matches_direct_computation(corpus: Path) -> None:
    lm = tiny_model("gpt2")
    stats = second_moment.collect(lm, [0, 2], corpus, n_tokens=120, chunk_len=16, progress=False)
    keys = {0: [], 2: []}
    for ids, skip in second_moment.token_chunks(lm, corpus, 120, 16):
        sites = [Site("mlp_in", 0), Site("mlp_in", 2)]
        with torch.no_grad(), intervene(lm.arch, record=sites) as states:
            lm.model(input_ids=ids)
        for site in sites:
            keys[site.layer].append(states[site][0, skip:].double())
    for layer in (0, 2):
        k = torch.cat(keys[layer])
        assert stats[layer].n_tokens == len(k) == 120
        width = lm.arch.mlp_hidden_size
        assert stats[layer].matrix.shape == (width, width)
        assert stats[layer].matrix.dtype == torch.float64
        torch.testing.assert_close(stats[layer].matrix, k.T @ k / len(k))


def test_second_call_loads_from_cache(corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lm = tiny_model("llama")
    first = second_moment.collect(lm, [1], corpus, n_tokens=60, chunk_len=16, progress=False)
    assert not first[1].from_cache
    assert second_moment.cache_path(lm, 1, corpus, 60, 16).is_file()

    def no_forward(*_: object, **__: object) -> None:
        raise AssertionError("the model ran although the statistics were cached")

    monkeypatch.setattr(lm.model, "forward", no_forward)
    second = second_moment.collect(lm, [1], corpus, n_tokens=60, chunk_len=16, progress=False)
    assert second[1].from_cache
    assert torch.equal(first[1].matrix, second[1].matrix)


def test_cache_key_changes_with_layer_corpus_and_tokens(corpus: Path) -> None:
    lm = tiny_model("gpt2")
    base = second_moment.cache_path(lm, 1, corpus, 100)
    assert second_moment.cache_path(lm, 2, corpus, 100) != base
    assert second_moment.cache_path(lm, 1, corpus, 200) != base
    corpus.write_text(corpus.read_text() + "One more line.\n")
    assert second_moment.cache_path(lm, 1, corpus, 100) != base


def test_bos_is_prepended_and_skipped(corpus: Path) -> None:
    lm = tiny_model("gpt2", with_bos=True)
    ids, skip = next(second_moment.token_chunks(lm, corpus, 50, 16))
    assert skip == 1 and int(ids[0, 0]) == lm.tokenizer.bos_token_id and ids.shape[1] == 16


def test_bad_corpus_is_a_clear_error(tmp_path: Path) -> None:
    lm = tiny_model("gpt2")
    with pytest.raises(FileNotFoundError, match="corpus"):
        second_moment.collect(lm, [0], tmp_path / "missing.txt", n_tokens=10)


def test_corpus_identity_follows_contents_not_location(tmp_path) -> None:
    from remedi.methods.second_moment import corpus_identity

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "text.txt").write_text("one line\nanother line\n")
    (b / "text.txt").write_text("one line\nanother line\n")
    assert corpus_identity(a) == corpus_identity(b)
    (b / "text.txt").write_text("one line\nchanged line\n")
    assert corpus_identity(a) != corpus_identity(b)


def test_short_corpus_warns_and_is_cached_under_what_it_holds(
    corpus: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A corpus that runs out warns with both numbers, is cached under the tokens it holds, and
    the next request for the same (larger) number reads that cache instead of running again."""
    lm = tiny_model("gpt2")
    with caplog.at_level("WARNING", logger="remedi.methods.second_moment"):
        first = second_moment.collect(lm, [0], corpus, n_tokens=100_000, progress=False)
    held = first[0].n_tokens
    assert 0 < held < 100_000 and first[0].exhausted
    assert f"hold {held} tokens where 100000 were asked for" in caplog.text
    cached = sorted(p.name for p in (Path(second_moment.cache_dir()) / "stats").iterdir())
    assert len(cached) == 1 and cached[0].endswith(f"-{held}.pt")
    monkeypatch.setattr(lm.model, "forward", lambda *a, **k: pytest.fail("ran the model"))
    caplog.clear()
    with caplog.at_level("WARNING", logger="remedi.methods.second_moment"):
        again = second_moment.collect(lm, [0], corpus, n_tokens=100_000, progress=False)
    assert again[0].from_cache and again[0].n_tokens == held
    assert "where 100000 were asked for" in caplog.text


def test_sampled_source_is_text_sampled_from_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``sampled`` statistics come from text the model samples, generated once, reproducibly,
    and kept as a JSONL corpus in the cache."""
    monkeypatch.setenv("REMEDI_CACHE", str(tmp_path))
    lm = tiny_model("llama")
    stats = second_moment.collect(lm, [1], "sampled", n_tokens=300, chunk_len=32, progress=False)
    assert stats[1].n_tokens == 300 and not stats[1].exhausted
    (sampled,) = (tmp_path / "corpora").iterdir()
    text = sampled.read_text()
    assert sampled.suffix == ".jsonl" and text.count("\n") >= 300 // second_moment.SAMPLE_LENGTH
    sampled.unlink()
    assert second_moment.sampled_corpus(lm, 300, progress=False).read_text() == text


def test_jsonl_corpus_reads_the_text_field(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "first line\\nstill first"}\n\n{"text": "second"}\n')
    assert list(second_moment._documents(path)) == ["first line\nstill first", "second"]
    path.write_text('{"body": "no text"}\n')
    with pytest.raises(ValueError, match="line 1 is not a JSON object with 'text'"):
        list(second_moment._documents(path))


def test_default_source_is_the_python_documentation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a corpus the statistics come from the Python documentation every Python ships:
    enough text for the default 100,000 tokens, read without a model pass or a download."""
    monkeypatch.setenv("REMEDI_CACHE", str(tmp_path))
    lm = tiny_model("gpt2")
    docs = second_moment.python_docs()
    assert sum(len(lm.tokenizer(d)["input_ids"]) for d in docs) > second_moment.DEFAULT_TOKENS
    stats = second_moment.collect(lm, [0], None, n_tokens=500, chunk_len=64, progress=False)
    named = second_moment.collect(lm, [0], "python-docs", n_tokens=500, chunk_len=64)
    assert named[0].from_cache and torch.equal(stats[0].matrix, named[0].matrix)
    assert "Python documentation" in second_moment.source_line(stats, None)


@pytest.mark.parametrize("batch_chunks", [1, 3, 8])
def test_batched_chunks_match_one_float64_pass(corpus: Path, batch_chunks: int) -> None:
    """Chunks stacked ``batch_chunks`` per forward pass (the corpus's short last chunk alone)
    give the mean of k kᵀ of one float64 pass over every key, one chunk at a time."""
    lm = tiny_model("llama")
    n_tokens = 100  # 6 chunks of 15 keys after the BOS, and a short one of 10
    stats = second_moment.collect(
        lm, [0, 2], corpus, n_tokens, chunk_len=16, progress=False, batch_chunks=batch_chunks
    )
    chunks = list(second_moment.token_chunks(lm, corpus, n_tokens, 16))
    assert len({ids.shape[1] for ids, _ in chunks}) == 2
    keys: dict[int, list[torch.Tensor]] = {0: [], 2: []}
    sites = [Site("mlp_in", 0), Site("mlp_in", 2)]
    for ids, skip in chunks:
        with torch.no_grad(), intervene(lm.arch, record=sites) as states:
            lm.model(input_ids=ids)
        for site in sites:
            keys[site.layer].append(states[site][0, skip:].double())
    for layer in (0, 2):
        k = torch.cat(keys[layer])
        assert stats[layer].n_tokens == len(k) == n_tokens
        matrix = stats[layer].matrix
        assert matrix.dtype == torch.float64 and matrix.device.type == "cpu"
        torch.testing.assert_close(stats[layer].matrix, k.T @ k / len(k), rtol=1e-6, atol=1e-9)


@pytest.fixture
def docs_stats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> second_moment.SecondMoment:
    """Cached statistics of a tiny Llama's layer 1 (width 48) over 400 tokens: well conditioned."""
    monkeypatch.setenv("REMEDI_CACHE", str(tmp_path / "cache"))
    second_moment.release_inverses()
    lm = tiny_model("llama")
    return second_moment.collect(lm, [1], None, n_tokens=400, chunk_len=64, progress=False)[1]


def test_inverse_is_cached_beside_the_statistics(docs_stats: second_moment.SecondMoment) -> None:
    stats = docs_stats
    inv = stats.inverse("cpu")
    assert stats.path is not None
    path = second_moment.inverse_path(stats.path)
    assert path.is_file() and path.parent == stats.path.parent
    assert inv.dtype == torch.float64
    eye = torch.eye(stats.matrix.shape[0], dtype=torch.float64)
    torch.testing.assert_close(stats.matrix @ inv, eye, rtol=0, atol=1e-9)
    assert second_moment.inverse(None, "cpu") is None


def test_second_call_reuses_the_device_copy(
    docs_stats: second_moment.SecondMoment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A later :func:`collect` of the same statistics (a new object, read from disk) gets the
    inverse already held for the device: nothing is factorised or read again."""
    first = docs_stats.inverse("cpu")
    again = second_moment.collect(tiny_model("llama"), [1], None, 400, 64, progress=False)[1]
    assert again.from_cache and again is not docs_stats

    def fail(*_: object, **__: object) -> None:
        raise AssertionError("the inverse was computed or read again")

    monkeypatch.setattr(second_moment, "factorise", fail)
    monkeypatch.setattr(second_moment, "_load_inverse", fail)
    assert second_moment.inverse(again, "cpu", width=48) is first


def _damage_truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _damage_garbage(path: Path) -> None:
    path.write_bytes(b"not a torch file at all" * 10)


def _damage_values(path: Path) -> None:
    """A well-formed file whose matrix is no longer the inverse (a flipped sign)."""
    data = torch.load(path, weights_only=True)
    data["inverse"][3, 5] = -data["inverse"][3, 5] + 1.0
    torch.save(data, path)


@pytest.mark.parametrize("damage", [_damage_truncate, _damage_garbage, _damage_values])
def test_damaged_inverse_file_is_rebuilt(
    docs_stats: second_moment.SecondMoment,
    damage: Callable[[Path], None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = docs_stats.inverse("cpu").clone()
    assert docs_stats.path is not None
    path = second_moment.inverse_path(docs_stats.path)
    damage(path)
    second_moment.release_inverses()
    with caplog.at_level("WARNING", logger="remedi.methods.second_moment"):
        rebuilt = docs_stats.inverse("cpu")
    assert "unusable" in caplog.text
    torch.testing.assert_close(rebuilt, good, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(torch.load(path, weights_only=True)["inverse"], good)


def test_damaged_statistics_file_is_collected_again(
    corpus: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lm = tiny_model("gpt2")
    first = second_moment.collect(lm, [0], corpus, n_tokens=60, chunk_len=16, progress=False)
    assert first[0].path is not None
    first[0].path.write_bytes(b"\0" * 64)
    with caplog.at_level("WARNING", logger="remedi.methods.second_moment"):
        again = second_moment.collect(lm, [0], corpus, n_tokens=60, chunk_len=16, progress=False)
    assert "unreadable" in caplog.text and not again[0].from_cache
    torch.testing.assert_close(again[0].matrix, first[0].matrix)
    assert second_moment._load(first[0].path) is not None


def test_inverse_of_a_bare_matrix_and_a_wrong_width() -> None:
    torch.manual_seed(0)
    a = torch.randn(6, 30, dtype=torch.float64)
    c = a @ a.T / 30
    torch.testing.assert_close(second_moment.inverse(c, "cpu", width=6), torch.linalg.inv(c))
    with pytest.raises(ValueError, match=r"expected \(7, 7\)"):
        second_moment.inverse(c, "cpu", width=7)
    with pytest.raises(ValueError, match="singular"):
        second_moment.factorise(torch.zeros(4, 4, dtype=torch.float64))
