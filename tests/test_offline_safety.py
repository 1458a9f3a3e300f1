"""Offline and safe by default: no network in tests, weights-only checkpoints, no remote code
unless opted in, and pickles read only from paths the user named or remedi wrote."""

from __future__ import annotations

import json
import os
import pickle
import socket
import sys
from pathlib import Path

import pytest
import torch
from conftest import NetworkBlockedError, NetworkGuard, tiny_model

from remedi.models import load_model, loading

RAN = "payload-ran"
"""The file a pickled payload writes when unpickling runs it."""


def _record_run(directory: str) -> str:
    """What a malicious pickle calls while it is being read: leaves a trace to look for."""
    (Path(directory) / RAN).write_text("ran")
    return "ran"


class _Payload:
    """An object whose unpickling calls :func:`_record_run`, like a pickled exploit would."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return _record_run, (str(self.directory),)


def test_suite_runs_offline() -> None:
    """The Hugging Face libraries were imported with their offline switches on."""
    import huggingface_hub
    from transformers.utils.hub import is_offline_mode

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        assert os.environ[name] == "1"
    assert huggingface_hub.constants.HF_HUB_OFFLINE
    assert is_offline_mode()


def test_network_guard_refuses_public_addresses(network_guard: NetworkGuard) -> None:
    """A connect to a public address raises before any packet is sent, and is recorded so that
    the test would fail at teardown even if the code under test caught the error."""
    with pytest.raises(
        NetworkBlockedError, match=r"network access in a test: connect to \('1\.1\.1\.1', 443\)"
    ):
        socket.create_connection(("1.1.1.1", 443), timeout=1)
    with (
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock,
        pytest.raises(NetworkBlockedError, match=r"example\.org"),
    ):
        sock.connect_ex(("example.org", 80))
    assert network_guard.blocked == ["('1.1.1.1', 443)", "('example.org', 80)"]
    network_guard.blocked.clear()


def test_network_guard_allows_loopback_and_unix_sockets(tmp_path: Path) -> None:
    """Lightning's DDP tests talk over loopback TCP; Unix sockets never leave the machine."""
    with (
        socket.create_server(("127.0.0.1", 0)) as server,
        socket.create_connection(server.getsockname(), timeout=5),
    ):
        server.accept()[0].close()
    if hasattr(socket, "AF_UNIX"):
        path = str(tmp_path / "s")
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(path)
            server.listen()
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(path)


def test_checkpoint_pickling_an_object_is_refused_not_run(tmp_path: Path) -> None:
    """``load_trained`` reads checkpoints with ``weights_only=True``: a pickled object is refused
    in one line that names it, and its code never runs."""
    from lightning_modules.trained import load_trained

    checkpoint = tmp_path / "evil.ckpt"
    torch.save(
        {"state_dict": {}, "remedi": {"method": "remedi"}, "x": _Payload(tmp_path)}, checkpoint
    )
    with pytest.raises(ValueError) as caught:
        load_trained("remedi", checkpoint, tiny_model("gpt2"))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"checkpoint {checkpoint}: refused: it pickles ")
    assert "_record_run, not only tensors and plain data" in message
    assert "weights_only=True" in message
    assert not (tmp_path / RAN).exists()


def _remote_code_model(directory: Path) -> Path:
    """A local model directory whose ``config.json`` names its own code (``auto_map``); the code
    leaves a trace if it is ever imported."""
    directory.mkdir()
    config = {
        "model_type": "remedi_custom",
        "architectures": ["CustomForCausalLM"],
        "auto_map": {
            "AutoConfig": "custom_model.CustomConfig",
            "AutoModelForCausalLM": "custom_model.CustomForCausalLM",
        },
    }
    (directory / "config.json").write_text(json.dumps(config))
    trace = directory / RAN
    (directory / "custom_model.py").write_text(f"open({str(trace)!r}, 'w').write('ran')\n")
    return directory


def test_remote_code_is_refused_without_opt_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(loading.TRUST_REMOTE_CODE_ENV, raising=False)
    directory = _remote_code_model(tmp_path / "custom")
    with pytest.raises(ValueError) as caught:
        load_model(str(directory))
    message = str(caught.value)
    assert "\n" not in message
    assert message == (
        f"model {str(directory)!r} needs its own code (auto_map), which remedi runs only with "
        "trust_remote_code=True or REMEDI_TRUST_REMOTE_CODE=1"
    )
    assert not (directory / RAN).exists()
    assert not any("custom_model" in name for name in sys.modules)


@pytest.mark.parametrize(
    ("env", "argument", "expected"),
    [(None, None, False), ("0", None, False), ("1", None, True), ("1", False, False)],
)
def test_trust_remote_code_is_passed_explicitly(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    env: str | None,
    argument: bool | None,
    expected: bool,
) -> None:
    """``from_pretrained`` always gets ``trust_remote_code`` spelled out: False unless the caller
    or ``$REMEDI_TRUST_REMOTE_CODE=1`` (the command-line tools' opt-in) says otherwise."""
    if env is None:
        monkeypatch.delenv(loading.TRUST_REMOTE_CODE_ENV, raising=False)
    else:
        monkeypatch.setenv(loading.TRUST_REMOTE_CODE_ENV, env)
    seen: list[object] = []

    def record(source: str, **kwargs: object) -> None:
        seen.append(kwargs.get("trust_remote_code", "missing"))
        raise RuntimeError("recorded")

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", record)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(RuntimeError, match="recorded"):
        load_model(str(tmp_path), trust_remote_code=argument)
    assert seen == [expected]


def _own_model_dir(cache: Path, name: str = "tiny-0123456789abcdef") -> Path:
    """A directory laid out as remedi's dequantised copies are: under ``models``, marked."""
    directory = cache / "models" / name
    directory.mkdir(parents=True)
    (directory / loading.SOURCE_FILE).write_text("packaged test\n")
    tiny_model("gemma3_text").tokenizer.save_pretrained(directory)
    return directory


def test_tokenizer_pickle_is_kept_only_in_remedis_own_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """remedi's marked folders under ``cache_dir()/"models"`` keep their built tokenizer (read
    back without rebuilding; a bad pickle is rebuilt); any other folder is refused."""
    monkeypatch.setenv("REMEDI_CACHE", str(tmp_path / "cache"))
    own = _own_model_dir(tmp_path / "cache")
    first = loading.load_tokenizer(str(own), keep_pickled=True)
    (pickled,) = own.glob("tokenizer-*.pkl")
    calls: list[str] = []
    real = loading.AutoTokenizer.from_pretrained

    def counted(source: str, **kwargs: object) -> object:
        calls.append(source)
        return real(source, **kwargs)

    monkeypatch.setattr(loading.AutoTokenizer, "from_pretrained", counted)
    text = "The Eiffel Tower is located in Paris"
    again = loading.load_tokenizer(str(own), keep_pickled=True)
    assert calls == [] and again(text)["input_ids"] == first(text)["input_ids"]
    pickled.write_bytes(b"not a pickle")
    rebuilt = loading.load_tokenizer(str(own), keep_pickled=True)
    assert calls == [str(own)] and rebuilt(text)["input_ids"] == first(text)["input_ids"]
    assert loading._is_own_model_dir(own)


def test_tokenizer_pickles_elsewhere_are_never_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pickle planted outside remedi's own folders (elsewhere, unmarked, or reached through a
    link) is never unpickled, and ``keep_pickled`` there is refused in one line."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("REMEDI_CACHE", str(cache))
    outside = _own_model_dir(tmp_path / "elsewhere")
    unmarked = _own_model_dir(cache, "unmarked-0123456789abcdef")
    (unmarked / loading.SOURCE_FILE).unlink()
    linked = cache / "models" / "linked-0123456789abcdef"
    linked.symlink_to(outside, target_is_directory=True)
    for directory in (outside, unmarked):
        versions = f"{loading.transformers.__version__}-{loading.tokenizers.__version__}"
        (directory / f"tokenizer-{versions}.pkl").write_bytes(pickle.dumps(_Payload(tmp_path)))
    for directory in (outside, unmarked, linked):
        assert not loading._is_own_model_dir(directory)
        with pytest.raises(ValueError, match=r"^tokenizer: .* is not a model directory remedi"):
            loading.load_tokenizer(str(directory), keep_pickled=True)
        assert loading.load_tokenizer(str(directory)).vocab_size > 0
    assert not (tmp_path / RAN).exists()


def test_bias_in_bios_pickle_is_read_as_plain_data_only(tmp_path: Path) -> None:
    """The Bias in Bios pickle at the user's path is read as plain data; one naming any class or
    function is refused in one line before that code runs."""
    from datamodules.attribute_data import BiasInBiosDataModule

    path = tmp_path / "bios.pkl"
    bio = {
        "name": ("Ann", "", "Lee"),
        "raw": "Ann Lee is a nurse. Ann likes tea.",
        "title": "nurse",
    }
    path.write_bytes(pickle.dumps([{**bio, "start_pos": 20, "tags": {"a"}}], protocol=2))
    (example,) = BiasInBiosDataModule(str(path)).read_examples()
    assert example.context == "Ann Lee Ann likes tea." and example.target_mediated == "nurse"
    path.write_bytes(pickle.dumps([{**bio, "start_pos": _Payload(tmp_path)}]))
    with pytest.raises(ValueError) as caught:
        BiasInBiosDataModule(str(path)).read_examples()
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"path: {path}: refused to unpickle ")
    assert "_record_run: only plain data" in message
    assert not (tmp_path / RAN).exists()
