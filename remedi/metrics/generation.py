"""CounterFact generation metrics (METHODS.md §8): generation entropy GE and reference score RS.

Samples. Each of a case's ``generation_prompts`` is continued by tokens sampled with top-k = 5
(temperature 1, no top-p, no repetition penalty; end-of-text suppressed so every sample has the
full length) from a fixed torch seed per case, so runs repeat and every method draws from the same
random stream. A case's prompts form one left-padded batch. The text of a sample is its prompt
followed by the continuation, as ROME's ``generate_fast`` returns it; text put before the prompt
only to condition the LM (the ``prefix`` baseline's context) is not part of it. Length
(:data:`GenerationLength`): ``total`` (the default, ROME's protocol: ``generate_fast(...,
max_out_len=100)`` caps the whole text, prompt included, at 100 tokens, so a prompt of n tokens
gets 100 - n new ones) or ``new`` (100 new tokens after every prompt, whatever its length). Prompt
tokens are counted without special tokens such as ``<bos>``.

GE (fluency). A text is split into words and punctuation marks (``\\w+|[^\\w\\s]``, close to
``nltk.word_tokenize``); for n = 2 and 3, H_n is the entropy in bits of the text's n-gram frequency
distribution, and GE = mean(2/3 * H_2, 4/3 * H_3), ROME's ``n_gram_entropy`` (ROME's tables print
100 x this). A case's GE is the mean over its samples; the reported GE the mean over cases.

RS (consistency). ROME compares the samples with Wikipedia snippets about target_new, which are
not available offline; here a case's reference texts are ``f"{prompt} {target_new}"`` for each of
its ``attribute_prompts`` (prompts about other subjects whose true object is target_new), i.e.
statements of target_new as an attribute. A case's RS is the cosine between the tf-idf vector of
all its samples joined and of all its references joined (ROME's ``tfidf_similarity``); cases
without attribute prompts have no RS. The tf-idf vectoriser is one fixed scikit-learn
``TfidfVectorizer`` (default settings: lower-cased words of two or more word characters, smoothed
idf, L2-normalised rows; words outside its vocabulary are ignored), the same for every method and
every run: see :func:`reference_vectorizer` for its corpus.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from contextlib import AbstractContextManager, nullcontext
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from sklearn.feature_extraction.text import TfidfVectorizer

from remedi.data.cases import EditCase
from remedi.tokens import PromptBatch, decode_rows, encode_prompts, generate_new_tokens

if TYPE_CHECKING:
    from remedi.models import LoadedModel

GENERATION_METRIC_NAMES = ("generation_entropy", "reference_score")
GenerationLength = Literal["total", "new"]
"""``total``: the sample, prompt included, is at most ``max_tokens`` tokens long (ROME's
protocol, the default for CounterFact tables); ``new``: ``max_tokens`` new tokens per prompt."""
GENERATION_LENGTHS: tuple[GenerationLength, ...] = ("total", "new")

GenerationEdit = Callable[[PromptBatch], AbstractContextManager[object]]
"""Given the left-padded prompts about to be continued, a context under which the LM is edited."""

_WORD_OR_MARK = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Words and punctuation marks of ``text``, the tokens whose n-grams GE counts."""
    return _WORD_OR_MARK.findall(text)


def ngram_entropy(
    tokens: Sequence[Hashable],
    orders: Sequence[int] = (2, 3),
    weights: Sequence[float] = (2 / 3, 4 / 3),
) -> float:
    """Mean over ``orders`` of weight x entropy (bits) of the n-gram frequencies of ``tokens``.

    A sequence shorter than n has no n-grams and contributes entropy 0 for that order.
    """
    if len(orders) != len(weights) or not orders:
        raise ValueError(f"orders {list(orders)} and weights {list(weights)} must pair up")
    weighted = []
    for n, weight in zip(orders, weights, strict=True):
        if n < 1:
            raise ValueError(f"n-gram order must be positive, got {n}")
        counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        total = sum(counts.values())
        entropy = -sum(c / total * math.log2(c / total) for c in counts.values())
        weighted.append(weight * entropy)
    return sum(weighted) / len(weighted)


def text_entropy(text: str) -> float:
    """GE of one generated text: :func:`ngram_entropy` of its :func:`words`."""
    return ngram_entropy(words(text))


def reference_corpus() -> list[str]:
    """The documents the reference vectoriser is fitted on: every statement the built-in facts
    make (all splits), one document each: each rewrite, paraphrase and neighborhood prompt
    completed with its true object, and each case's :func:`reference_texts`."""
    from remedi.data.builtin_facts import load_builtin

    documents: list[str] = []
    for case in load_builtin():
        truths = case.neighborhood_targets or [case.target_true] * len(case.neighborhood_prompts)
        documents += [
            f"{p} {case.target_true}" for p in (case.rewrite_prompt, *case.paraphrase_prompts)
        ]
        documents += [f"{p} {t}" for p, t in zip(case.neighborhood_prompts, truths, strict=True)]
        documents += reference_texts(case)
    return documents


@cache
def reference_vectorizer(corpus: str | None = None) -> TfidfVectorizer:
    """The one tf-idf vectoriser of the reference score: scikit-learn's ``TfidfVectorizer``
    with its default settings, fitted once per process and corpus.

    ``corpus`` names a text file (one document per non-blank line, e.g. WikiText or Wikipedia
    articles, as the ROME paper fits its idf on Wikipedia), the same for every method of a
    table and named in its protocol. None (the default, offline and shipped) fits it on
    :func:`reference_corpus`, the statements of the built-in facts: facts of the same kind RS
    compares samples with, whose vocabulary holds the default data's subjects and objects; words
    of other datasets outside it are ignored, so RS on them rests on the shared words. The
    Python documentation (the statistics' default corpus) is not used: its vocabulary lacks most
    entity names, the very words RS must notice.
    """
    vectorizer = TfidfVectorizer()
    if corpus is None:
        vectorizer.fit(reference_corpus())
    else:
        text = Path(corpus).read_text(encoding="utf-8", errors="replace")
        vectorizer.fit([line for line in text.splitlines() if line.strip()])
    return vectorizer


def tfidf_cosine(text_a: str, text_b: str, vectorizer: TfidfVectorizer | None = None) -> float:
    """Cosine similarity of the tf-idf vectors of two texts (0 when either has no known word);
    default vectoriser: :func:`reference_vectorizer`."""
    vec = vectorizer if vectorizer is not None else reference_vectorizer()
    rows = vec.transform([text_a, text_b])
    return float(rows[0].multiply(rows[1]).sum())


def reference_texts(case: EditCase) -> list[str]:
    """Texts stating target_new as an attribute: each attribute prompt completed with it."""
    if case.target_new is None:
        raise ValueError(f"case {case.case_id}: target_new is None; RS needs a new object")
    target = str(case.target_new).strip()
    return [f"{prompt} {target}" for prompt in case.attribute_prompts]


def new_token_counts(
    lm: LoadedModel, prompts: Sequence[str], max_tokens: int, length: GenerationLength
) -> list[int]:
    """New tokens each prompt's sample gets (see :data:`GenerationLength`); 0 when a prompt
    alone reaches ``max_tokens`` under ``total``."""
    if length not in GENERATION_LENGTHS:
        raise ValueError(f"length {length!r} must be one of {', '.join(GENERATION_LENGTHS)}")
    if length == "new":
        return [max_tokens] * len(prompts)
    sizes = [len(lm.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    return [max(0, max_tokens - n) for n in sizes]


@torch.no_grad()
def generate_samples(
    lm: LoadedModel,
    prompts: Sequence[str],
    subjects: Sequence[str],
    max_tokens: int = 100,
    top_k: int = 5,
    seed: int = 0,
    edit: GenerationEdit | None = None,
    context: str = "",
    length: GenerationLength = "total",
) -> list[str]:
    """``prompt + continuation`` for each prompt, sampled top-k from the LM under ``edit``, each
    ``max_tokens`` tokens long in all (``length="total"``, ROME's protocol) or with
    ``max_tokens`` new tokens (``length="new"``).

    ``context`` is put before every prompt to condition the LM and left out of the returned
    texts and of the token count; ``subjects`` (one per prompt) locate the subject tokens that
    ``edit`` may act on. Prompts of one call are sampled as one batch for as many steps as the
    shortest needs, each then cut to its own count. The global RNG is left as it was.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    if not prompts:
        return []
    counts = new_token_counts(lm, prompts, max_tokens, length)
    steps = max(counts)
    if steps == 0:
        return list(prompts)
    batch = encode_prompts(
        lm.tokenizer, [context + p for p in prompts], subjects, padding_side="left"
    ).to(lm.device)
    devices = [lm.device] if lm.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), edit(batch) if edit else nullcontext():
        torch.manual_seed(seed)
        new_ids = generate_new_tokens(
            lm.model,
            lm.tokenizer,
            batch,
            steps,
            do_sample=True,
            top_k=top_k,
            top_p=1.0,
            temperature=1.0,
            repetition_penalty=1.0,
            min_new_tokens=steps,
        )
    continuations = decode_rows(lm.tokenizer, new_ids, counts)
    return [p + c for p, c in zip(prompts, continuations, strict=True)]


def case_samples(
    lm: LoadedModel,
    case: EditCase,
    max_tokens: int = 100,
    seed: int = 0,
    edit: GenerationEdit | None = None,
    context: str = "",
    length: GenerationLength = "total",
) -> list[str]:
    """Samples of all of ``case``'s generation prompts (which must mention its subject)."""
    prompts = list(case.generation_prompts)
    return generate_samples(
        lm,
        prompts,
        [case.subject] * len(prompts),
        max_tokens=max_tokens,
        seed=seed,
        edit=edit,
        context=context,
        length=length,
    )


def generation_metrics(
    cases: Sequence[EditCase],
    samples: Sequence[Sequence[str]],
    vectorizer: TfidfVectorizer | None = None,
) -> list[dict[str, float]]:
    """Per case ``generation_entropy`` and ``reference_score`` of its ``samples``.

    The tf-idf vectoriser defaults to :func:`reference_vectorizer`, the same for every method.
    A case with no samples gets neither metric; one without reference texts gets no
    reference_score.
    """
    if len(cases) != len(samples):
        raise ValueError(f"{len(cases)} cases but {len(samples)} lists of samples")
    vec = vectorizer if vectorizer is not None else reference_vectorizer()
    per_case: list[dict[str, float]] = []
    for case, texts in zip(cases, samples, strict=True):
        refs = reference_texts(case)
        metrics: dict[str, float] = {}
        if texts:
            metrics["generation_entropy"] = sum(map(text_entropy, texts)) / len(texts)
            if refs:
                metrics["reference_score"] = tfidf_cosine(" ".join(texts), " ".join(refs), vec)
        per_case.append(metrics)
    return per_case


def summarize_generation(per_case: Sequence[dict[str, float]]) -> dict[str, float | None]:
    """Mean of each generation metric over the cases that have it (None when none has)."""
    summary: dict[str, float | None] = {}
    for name in GENERATION_METRIC_NAMES:
        values = [m[name] for m in per_case if name in m]
        summary[name] = sum(values) / len(values) if values else None
    return summary


UNRELATED_PROMPTS = (
    "The best way to bake bread at home is",
    "On a quiet morning in the village, the children",
    "The history of the railway began when",
    "To keep a garden healthy through the winter,",
)
"""Prompts about nothing any benchmark edits: what an edited model writes after them shows
whether the edit damaged its generation elsewhere."""


def unrelated_entropy(lm: LoadedModel, tokens: int = 40, context: str = "", seed: int = 0) -> float:
    """Mean generation entropy (:func:`text_entropy`) of ``tokens`` new tokens sampled after each
    of :data:`UNRELATED_PROMPTS` (seeded; ``context``: text an input-side edit puts first)."""
    prompts = list(UNRELATED_PROMPTS)
    texts = generate_samples(
        lm,
        prompts,
        [p.split()[0] for p in prompts],
        max_tokens=tokens,
        seed=seed,
        context=context,
        length="new",
    )
    new = [text[len(prompt) :] for text, prompt in zip(texts, prompts, strict=True)]
    return sum(text_entropy(t) for t in new) / len(new)
