"""Shared fixtures: tiny tokenizers and tiny randomly initialised models of every architecture."""

from __future__ import annotations

import math
import os

# The suite runs offline: set before transformers and huggingface_hub read them at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import ipaddress
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    GPTJConfig,
    GPTNeoConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from remedi.models import LoadedModel, wrap_model

CORPUS = [
    "The Eiffel Tower is located in Paris, the capital of France.",
    "Toyota is headquartered in Japan and makes cars.",
    "Michael Jordan plays basketball and Lionel Messi plays soccer.",
    "The official language of Brazil is Portuguese.",
    "Berlin is the capital of Germany; Rome is the capital of Italy.",
    "Apple makes the iPhone, and Microsoft makes Windows.",
] * 20

VOCAB = 320
HIDDEN = 32
LAYERS = 3


@cache
def _tokenizer(with_bos: bool) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a few sentences; optionally prepends ``<bos>`` like Gemma."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    if with_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", tok.token_to_id("<bos>"))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )


@pytest.fixture(autouse=True)
def _threads(request: pytest.FixtureRequest) -> Iterator[None]:
    """Tiny models run fastest on one thread; tests of the real model get every core."""
    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1 if "gemma" in request.fixturenames else 1)
    yield
    torch.set_num_threads(before)


class NetworkBlockedError(RuntimeError):
    """A test connected a socket to a non-local address; the suite must run offline."""


@dataclass
class NetworkGuard:
    """Refuses socket connections except over Unix sockets and loopback (which Lightning's DDP
    tests use between processes), and records each refusal so that the test fails even when the
    code under test swallows the error."""

    blocked: list[str] = field(default_factory=list)

    def check(self, sock: socket.socket, address: object) -> None:
        """Raise :class:`NetworkBlockedError` unless ``address`` is local."""
        if sock.family == getattr(socket, "AF_UNIX", None) or _is_local(address):
            return
        self.blocked.append(repr(address))
        raise NetworkBlockedError(f"network access in a test: connect to {address!r} refused")


def _is_local(address: object) -> bool:
    """Whether an AF_INET/AF_INET6 ``address`` is loopback (or unspecified, which is local)."""
    if not isinstance(address, tuple) or not address or not isinstance(address[0], str):
        return False
    host = address[0]
    if host in ("", "localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_unspecified


@pytest.fixture(autouse=True)
def network_guard(monkeypatch: pytest.MonkeyPatch) -> Iterator[NetworkGuard]:
    """No test reaches the network: a non-local ``connect`` raises and fails the test."""
    guard = NetworkGuard()
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex

    def guarded_connect(sock: socket.socket, address: object) -> None:
        guard.check(sock, address)
        connect(sock, address)  # type: ignore[arg-type]

    def guarded_connect_ex(sock: socket.socket, address: object) -> int:
        guard.check(sock, address)
        return connect_ex(sock, address)  # type: ignore[arg-type]

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", guarded_connect_ex)
    yield guard
    if guard.blocked:
        pytest.fail(f"test tried to reach the network: {', '.join(guard.blocked)}", pytrace=False)


@pytest.fixture(params=[False, True], ids=["plain", "bos"])
def tiny_tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerFast:
    return _tokenizer(request.param)


def _llama_kwargs() -> dict[str, int]:
    return dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=48,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )


TINY_CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "gpt2": lambda: GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=128
    ),
    "gptj": lambda: GPTJConfig(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, rotary_dim=4, n_positions=128
    ),
    "gpt_neox": lambda: GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=128,
    ),
    "gpt_neo": lambda: GPTNeoConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_layers=LAYERS,
        num_heads=4,
        attention_types=[[["global", "local"], 1], [["global"], 1]],
        max_position_embeddings=128,
        window_size=8,
    ),
    "llama": lambda: LlamaConfig(**_llama_kwargs()),
    "mistral": lambda: MistralConfig(**_llama_kwargs()),
    "qwen2": lambda: Qwen2Config(**_llama_kwargs()),
    "gemma2": lambda: Gemma2Config(**_llama_kwargs(), head_dim=8),
    "gemma3_text": lambda: Gemma3TextConfig(**_llama_kwargs(), head_dim=8, sliding_window=8),
}
MODEL_TYPES = sorted(TINY_CONFIGS)


def tiny_model(model_type: str, with_bos: bool = True, seed: int = 0) -> LoadedModel:
    """A frozen, randomly initialised model of ``model_type`` with the tiny tokenizer."""
    torch.manual_seed(seed)
    config = TINY_CONFIGS[model_type]()
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 0
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return wrap_model(model, _tokenizer(with_bos), spec=f"tiny-{model_type}")


@pytest.fixture(params=MODEL_TYPES)
def any_tiny(request: pytest.FixtureRequest) -> LoadedModel:
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def gemma() -> LoadedModel:
    """The real default model (slow: dequantises once, ~40 s, then loads from cache)."""
    from remedi.models import load_model

    return load_model()


COUNTERFACT_RECORDS = [
    {
        "case_id": 7,
        "requested_rewrite": {
            "prompt": "{} is located in",
            "subject": "The Eiffel Tower",
            "target_new": {"str": "Japan"},
            "target_true": {"str": "France"},
        },
        "paraphrase_prompts": ["The Eiffel Tower stands in"],
        "neighborhood_prompts": ["Paris is located in", "Berlin is the capital of"],
        "attribute_prompts": ["Toyota is located in", "Tokyo is in"],
        "generation_prompts": ["The Eiffel Tower is", "The Eiffel Tower is"],
    },
    {
        "case_id": 8,
        "requested_rewrite": {
            "prompt": "{} makes",
            "subject": "Toyota",
            "target_new": {"str": "phones"},
            "target_true": {"str": "cars"},
        },
        "paraphrase_prompts": ["Toyota is famous, and it makes"],
        "neighborhood_prompts": ["Microsoft makes"],
        "attribute_prompts": ["Apple makes"],
        "generation_prompts": ["Toyota makes"],
    },
]
"""Two ROME-layout CounterFact records for command-line tests on tiny models."""


def lightning_trainer(root: Path, **kwargs: object) -> L.Trainer:
    """A quiet CPU Trainer for module tests: ``last.ckpt`` in ``root``, no logger, no
    validation unless asked (``limit_val_batches=None``), gradients allowed in validation."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    defaults: dict[str, object] = dict(
        default_root_dir=str(root),
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        inference_mode=False,
        callbacks=[ModelCheckpoint(dirpath=str(root), save_last=True, save_top_k=0)],
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)  # type: ignore[arg-type]


def forbid_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any load of a model fail the test: for mistakes that must stop before loading."""

    def no_load(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr("remedi.models.load_model", no_load)


def score_method(
    lm: Any,
    method: str,
    cases: Any,
    layer: int | None = None,
    hparams: Any = None,
    progress: bool = False,
    editor: Any = None,
    pool: Any = None,
    batch_size: int = 32,
) -> Any:
    """Score a registered ``method`` through :func:`remedi.evaluation.runner.run_method` (what
    ``remedi.evaluate`` runs) with identity statistics; ``layer`` and ``hparams`` set its
    settings, ``editor`` (a per-case function returning an edit handle) replaces its edit."""
    import dataclasses

    from remedi import registry
    from remedi.evaluation.runner import run_method

    if editor is not None:

        class PerCase(registry.Method):
            name = method

            def edit(self, lm: Any, requests: Any) -> Any:
                cases = registry.as_cases(requests)
                return registry.weight_edit(lm, cases, registry.sequential_handles(cases, editor))

        chosen: Any = PerCase()
    else:
        chosen = registry.editor(method)
        if hparams is not None:
            chosen.settings = hparams
        if layer is not None:
            chosen.settings = dataclasses.replace(chosen.settings, layer=layer)
    chosen.environment = registry.Environment(
        statistics=registry.Statistics(enabled=False),
        pool=pool or (),
        batch_size=batch_size,
        progress=progress,
    )
    return run_method(lm, chosen, cases)


def target_probability(lm: Any, prompt: str, target: str) -> float:
    """P(target | prompt) computed without remedi's scoring: the model's full forward on
    ``prompt + " " + target``, the target's tokens found by character offsets, exp of their
    mean log-probability (an independent check of the metrics)."""
    text = f"{prompt} {target}"
    encoded = lm.tokenizer(text, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    first = next(j for j, (start, end) in enumerate(offsets) if start >= len(prompt) and end > 0)
    with torch.no_grad():
        logprobs = torch.log_softmax(lm.model(torch.tensor([ids])).logits[0].float(), -1)
    picked = [float(logprobs[j - 1, ids[j]]) for j in range(first, len(ids))]
    return math.exp(sum(picked) / len(picked))
