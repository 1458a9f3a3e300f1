"""CounterFact generation metrics (METHODS.md §8): generation entropy GE and reference score RS.

Samples. Each of a case's ``generation_prompts`` is continued by ``max_new_tokens`` (100) tokens
sampled with top-k = 5 (temperature 1, no top-p, no repetition penalty; end-of-text suppressed so
every sample has the full length) from a fixed torch seed per case, so runs repeat and every method
draws from the same random stream. A case's prompts form one left-padded batch. The text of a
sample is its prompt followed by the continuation, as ROME's ``generate_fast`` returns it; text put
before the prompt only to condition the LM (the ``prefix`` baseline's context) is not part of it.

GE (fluency). A text is split into words and punctuation marks (``\\w+|[^\\w\\s]``, close to
``nltk.word_tokenize``); for n = 2 and 3, H_n is the entropy in bits of the text's n-gram frequency
distribution, and GE = mean(2/3 * H_2, 4/3 * H_3), ROME's ``n_gram_entropy`` (ROME's tables print
100 x this). A case's GE is the mean over its samples; the reported GE the mean over cases.

RS (consistency). ROME compares the samples with Wikipedia snippets about target_new, which are
not available offline; here a case's reference texts are ``f"{prompt} {target_new}"`` for each of
its ``attribute_prompts`` (prompts about other subjects whose true object is target_new), i.e.
statements of target_new as an attribute. TF-IDF as scikit-learn's default ``TfidfVectorizer``:
lower-cased words of two or more word characters, raw counts times the smoothed idf
ln((1 + N) / (1 + df)) + 1, L2-normalised; words outside the fitted vocabulary are ignored. The idf
is fitted on a corpus whose documents are every reference text and every sample of the evaluated
cases (of one method, so a method's RS does not depend on which other methods ran). A case's RS is
the cosine between the tf-idf vector of all its samples joined and of all its references joined
(ROME's ``tfidf_similarity``); cases without attribute prompts have no RS.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

import torch

from remedi.data.cases import EditCase
from remedi.tokens import PromptBatch, encode_prompts, generate_continuations

if TYPE_CHECKING:
    from remedi.models import LoadedModel

GENERATION_METRIC_NAMES = ("generation_entropy", "reference_score")

GenerationEdit = Callable[[PromptBatch], AbstractContextManager[object]]
"""Given the left-padded prompts about to be continued, a context under which the LM is edited."""

_WORD_OR_MARK = re.compile(r"\w+|[^\w\s]")
_TFIDF_WORD = re.compile(r"\b\w\w+\b")


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


def tfidf_terms(text: str) -> list[str]:
    """Lower-cased words of two or more word characters (scikit-learn's default analyser)."""
    return _TFIDF_WORD.findall(text.lower())


def fit_idf(documents: Iterable[str]) -> dict[str, float]:
    """Smoothed inverse document frequency ln((1 + N) / (1 + df)) + 1 of every term."""
    df: Counter[str] = Counter()
    n = 0
    for document in documents:
        n += 1
        df.update(set(tfidf_terms(document)))
    return {term: math.log((1 + n) / (1 + count)) + 1 for term, count in df.items()}


def tfidf_vector(text: str, idf: dict[str, float]) -> dict[str, float]:
    """L2-normalised tf-idf of ``text`` as a sparse dict (empty when no term is in ``idf``)."""
    counts = Counter(t for t in tfidf_terms(text) if t in idf)
    vector = {t: c * idf[t] for t, c in counts.items()}
    norm = math.sqrt(sum(v * v for v in vector.values()))
    return {t: v / norm for t, v in vector.items()} if norm > 0 else {}


def tfidf_cosine(text_a: str, text_b: str, idf: dict[str, float]) -> float:
    """Cosine similarity of the tf-idf vectors of two texts (0 when either has no known term)."""
    a, b = tfidf_vector(text_a, idf), tfidf_vector(text_b, idf)
    return sum(v * b[t] for t, v in a.items() if t in b)


def reference_texts(case: EditCase) -> list[str]:
    """Texts stating target_new as an attribute: each attribute prompt completed with it."""
    if case.target_new is None:
        raise ValueError(f"case {case.case_id}: target_new is None; RS needs a new object")
    target = str(case.target_new).strip()
    return [f"{prompt} {target}" for prompt in case.attribute_prompts]


@torch.no_grad()
def generate_samples(
    lm: LoadedModel,
    prompts: Sequence[str],
    subjects: Sequence[str],
    max_new_tokens: int = 100,
    top_k: int = 5,
    seed: int = 0,
    edit: GenerationEdit | None = None,
    context: str = "",
) -> list[str]:
    """``prompt + continuation`` for each prompt, sampled top-k from the LM under ``edit``.

    ``context`` is put before every prompt to condition the LM and left out of the returned
    texts; ``subjects`` (one per prompt) locate the subject tokens that ``edit`` may act on. The
    global RNG is left as it was.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if not prompts:
        return []
    batch = encode_prompts(
        lm.tokenizer, [context + p for p in prompts], subjects, padding_side="left"
    ).to(lm.device)
    devices = [lm.device] if lm.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), edit(batch) if edit else nullcontext():
        torch.manual_seed(seed)
        continuations = generate_continuations(
            lm.model,
            lm.tokenizer,
            batch,
            max_new_tokens,
            do_sample=True,
            top_k=top_k,
            top_p=1.0,
            temperature=1.0,
            repetition_penalty=1.0,
            min_new_tokens=max_new_tokens,
        )
    return [p + c for p, c in zip(prompts, continuations, strict=True)]


def case_samples(
    lm: LoadedModel,
    case: EditCase,
    max_new_tokens: int = 100,
    seed: int = 0,
    edit: GenerationEdit | None = None,
    context: str = "",
) -> list[str]:
    """Samples of all of ``case``'s generation prompts (which must mention its subject)."""
    prompts = list(case.generation_prompts)
    return generate_samples(
        lm,
        prompts,
        [case.subject] * len(prompts),
        max_new_tokens=max_new_tokens,
        seed=seed,
        edit=edit,
        context=context,
    )


def generation_metrics(
    cases: Sequence[EditCase],
    samples: Sequence[Sequence[str]],
    corpus: Iterable[str] | None = None,
) -> list[dict[str, float]]:
    """Per case ``generation_entropy`` and ``reference_score`` of its ``samples``.

    The idf is fitted on ``corpus`` (default: every reference text and sample given). A case with
    no samples gets neither metric; one without reference texts gets no reference_score.
    """
    if len(cases) != len(samples):
        raise ValueError(f"{len(cases)} cases but {len(samples)} lists of samples")
    references = [reference_texts(case) for case in cases]
    if corpus is None:
        corpus = [text for group in (*references, *samples) for text in group]
    idf = fit_idf(corpus)
    per_case: list[dict[str, float]] = []
    for texts, refs in zip(samples, references, strict=True):
        metrics: dict[str, float] = {}
        if texts:
            metrics["generation_entropy"] = sum(map(text_entropy, texts)) / len(texts)
            if refs:
                metrics["reference_score"] = tfidf_cosine(" ".join(texts), " ".join(refs), idf)
        per_case.append(metrics)
    return per_case


def summarize_generation(per_case: Sequence[dict[str, float]]) -> dict[str, float | None]:
    """Mean of each generation metric over the cases that have it (None when none has)."""
    summary: dict[str, float | None] = {}
    for name in GENERATION_METRIC_NAMES:
        values = [m[name] for m in per_case if name in m]
        summary[name] = sum(values) / len(values) if values else None
    return summary
