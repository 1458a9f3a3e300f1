"""Generation entropy, TF-IDF reference score, seeded sampling and ``evaluate --generation``."""

from __future__ import annotations

import json
import math
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
import torch
from conftest import COUNTERFACT_RECORDS as RECORDS
from conftest import tiny_model
from sklearn.feature_extraction.text import TfidfVectorizer

from remedi import evaluate
from remedi.data import EditCase, load_cases
from remedi.editors.apply import apply_direction, apply_editor
from remedi.editors.modules import AffineEditor
from remedi.evaluation import compare
from remedi.metrics import (
    GenerationEdit,
    generate_samples,
    generation_metrics,
    ngram_entropy,
    reference_corpus,
    reference_texts,
    reference_vectorizer,
    summarize_generation,
    text_entropy,
    tfidf_cosine,
)
from remedi.metrics.generation import words
from remedi.registry import Edited
from remedi.tokens import PromptBatch, encode_prompts


def _h(*probabilities: float) -> float:
    return -sum(p * math.log2(p) for p in probabilities)


def test_identical_tokens_have_zero_entropy() -> None:
    assert ngram_entropy(["a"] * 20) == 0.0
    assert ngram_entropy([]) == 0.0 and ngram_entropy([7]) == 0.0


def test_ngram_entropy_of_small_known_distributions() -> None:
    # bigrams ab, ba, ab -> (2/3, 1/3); trigrams aba, bab -> (1/2, 1/2)
    expected = (2 / 3 * _h(2 / 3, 1 / 3) + 4 / 3 * 1.0) / 2
    assert ngram_entropy(["a", "b", "a", "b"]) == pytest.approx(expected)
    # five distinct tokens: 4 equiprobable bigrams (2 bits), 3 trigrams (log2 3 bits)
    assert ngram_entropy(list(range(5))) == pytest.approx((2 / 3 * 2 + 4 / 3 * math.log2(3)) / 2)
    assert ngram_entropy(list(range(5)), orders=(1,), weights=(1.0,)) == pytest.approx(math.log2(5))
    with pytest.raises(ValueError, match="must pair up"):
        ngram_entropy([1, 2], orders=(2, 3), weights=(1.0,))


def test_text_entropy_counts_words_and_punctuation() -> None:
    assert words("Paris, France's capital!") == ["Paris", ",", "France", "'", "s", "capital", "!"]
    assert text_entropy("go go go go go") == 0.0
    assert text_entropy("one two three four five") == pytest.approx(ngram_entropy(list("abcde")))


def test_tfidf_cosine_of_tiny_texts() -> None:
    vec = TfidfVectorizer().fit(["cat dog", "cat fish", "bird"])
    idf = dict(zip(vec.get_feature_names_out(), vec.idf_, strict=True))
    assert idf["cat"] == pytest.approx(math.log(4 / 3) + 1)
    assert idf["dog"] == pytest.approx(math.log(4 / 2) + 1)
    assert tfidf_cosine("cat dog", "Dog CAT", vec) == pytest.approx(1.0)
    assert tfidf_cosine("cat dog", "bird fish", vec) == 0.0
    assert tfidf_cosine("a b c", "cat", vec) == 0.0  # no known term of two letters or more
    wc, wd = idf["cat"], idf["dog"]
    assert tfidf_cosine("cat dog", "cat fish", vec) == pytest.approx(wc * wc / (wc**2 + wd**2))


def test_reference_vectorizer_is_fixed_and_fitted_on_the_builtin_statements() -> None:
    vec = reference_vectorizer()
    assert isinstance(vec, TfidfVectorizer) and vec is reference_vectorizer()
    corpus = reference_corpus()
    assert len(vec.idf_) == len(TfidfVectorizer().fit(corpus).idf_)
    assert "The capital of China is Beijing" in corpus  # a built-in fact, stated
    assert {"seoul", "beijing", "capital"} <= set(vec.vocabulary_)


def _case(attribute_prompts: list[str]) -> EditCase:
    return EditCase(
        case_id=1,
        subject="Angola",
        prompt="{} is located in",
        target_true="Africa",
        target_new=" Antarctica",
        attribute_prompts=attribute_prompts,
        generation_prompts=["Angola's surroundings include"],
    )


def test_generation_metrics_per_case() -> None:
    cases = [_case(["Ross Island is located in", "Vostok Station, in"]), _case([])]
    assert reference_texts(cases[0]) == [
        "Ross Island is located in Antarctica",
        "Vostok Station, in Antarctica",
    ]
    samples = [["Angola is in Antarctica, near Ross Island"], ["Angola Angola Angola"]]
    per_case = generation_metrics(cases, samples, TfidfVectorizer().fit(reference_texts(cases[0])))
    assert per_case[0]["generation_entropy"] == pytest.approx(text_entropy(samples[0][0]))
    assert 0.0 < per_case[0]["reference_score"] < 1.0
    assert per_case[1] == {"generation_entropy": 0.0}
    assert generation_metrics(cases[:1], [[]]) == [{}]
    summary = summarize_generation(per_case)
    assert summary["generation_entropy"] == pytest.approx(per_case[0]["generation_entropy"] / 2)
    assert summary["reference_score"] == per_case[0]["reference_score"]
    assert summarize_generation([{}]) == {"generation_entropy": None, "reference_score": None}


PROMPTS = ["The Eiffel Tower is in", "The Eiffel Tower makes"]


def test_reference_score_of_a_method_does_not_depend_on_its_samples_corpus() -> None:
    """One fixed vectoriser: a case's RS depends on its own samples and references only, not on
    what the method sampled for the other cases (an idf fitted on them would change)."""
    cases = [_case(["The capital of South Korea is"]), _case(["The capital of Norway is"])]
    mine = ["Angola's capital is Seoul, the capital of South Korea"]
    one = generation_metrics(cases, [mine, ["Oslo Oslo fjord Norway"]])
    two = generation_metrics(cases, [mine, ["something else entirely about cars"]])
    assert one[0]["reference_score"] == two[0]["reference_score"] > 0.0


def _tokens(lm, text: str) -> int:
    return len(lm.tokenizer(text, add_special_tokens=False)["input_ids"])


def test_samples_are_capped_in_all_by_default_or_get_new_tokens() -> None:
    """ROME's protocol: the text, prompt included, is max_tokens tokens; ``new`` adds them."""
    lm = tiny_model("llama")
    prompts = ["The Eiffel Tower is in", "The Eiffel Tower makes a lot of cars in"]
    n_prompt = [_tokens(lm, p) for p in prompts]
    total = generate_samples(lm, prompts, ["Eiffel Tower"] * 2, 30, seed=1)
    new = generate_samples(lm, prompts, ["Eiffel Tower"] * 2, 30, seed=1, length="new")
    batch = encode_prompts(lm.tokenizer, prompts, ["Eiffel Tower"] * 2, padding_side="left")
    torch.manual_seed(1)
    out = lm.model.generate(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        max_new_tokens=30,
        min_new_tokens=30,
        do_sample=True,
        top_k=5,
        top_p=1.0,
        pad_token_id=lm.tokenizer.pad_token_id,
    )[:, batch.input_ids.shape[1] :]
    for i, prompt in enumerate(prompts):
        kept = lm.tokenizer.decode(out[i, : 30 - n_prompt[i]], skip_special_tokens=True)
        assert total[i] == prompt + kept
        assert new[i] == prompt + lm.tokenizer.decode(out[i], skip_special_tokens=True)
    assert generate_samples(lm, prompts, ["Eiffel Tower"] * 2, 3) == prompts  # prompts too long


def test_sampling_is_seeded_and_leaves_the_global_rng_alone() -> None:
    lm = tiny_model("llama")
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = generate_samples(lm, PROMPTS, ["Eiffel Tower"] * 2, max_tokens=24, seed=5)
    assert torch.equal(torch.rand(3), expected_next)
    again = generate_samples(lm, PROMPTS, ["Eiffel Tower"] * 2, max_tokens=24, seed=5)
    other = generate_samples(lm, PROMPTS, ["Eiffel Tower"] * 2, max_tokens=24, seed=6)
    assert first == again and first != other
    assert all(text.startswith(prompt) for text, prompt in zip(first, PROMPTS, strict=True))
    assert all(len(text) > len(prompt) for text, prompt in zip(first, PROMPTS, strict=True))


def test_sampling_under_an_edit_and_a_context() -> None:
    lm = tiny_model("llama")
    seen: list[PromptBatch] = []

    def edit(batch: PromptBatch) -> AbstractContextManager[object]:
        seen.append(batch)
        vector = torch.full((lm.arch.hidden_size,), 50.0)
        return apply_direction(lm, 1, batch.subject_last, vector, prompt_pass_only=True)

    plain = generate_samples(lm, PROMPTS, ["Eiffel Tower"] * 2, 10, length="new")
    edited = generate_samples(lm, PROMPTS, ["Eiffel Tower"] * 2, 10, edit=edit, length="new")
    assert edited != plain and len(seen) == 1
    batch = seen[0]
    subjects = [batch.input_ids[r, s.first : s.last + 1] for r, s in enumerate(batch.subject_spans)]
    assert [lm.tokenizer.decode(ids).strip() for ids in subjects] == ["Eiffel Tower"] * 2
    assert batch.attention_mask[:, -1].all()  # left padded: the prompts end together
    context = generate_samples(lm, PROMPTS, ["Eiffel Tower"] * 2, 24, context="Toyota makes. ")
    assert all(t.startswith(p) for t, p in zip(context, PROMPTS, strict=True))


def test_evaluate_cli_with_generation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REMEDI_CACHE", str(tmp_path / "cache"))
    lm = tiny_model("llama")
    lm.model.save_pretrained(tmp_path / "model")
    lm.tokenizer.save_pretrained(tmp_path / "model")
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(RECORDS))
    out = tmp_path / "out"
    methods = ["none", "prefix", "rome"]
    argv = ["--model", str(tmp_path / "model"), "--data", str(data), "--output", str(out)]
    argv += [x for m in methods for x in ("--method", m)]
    argv += ["--no-stats", "--layer", "1", "--steps", "2", "--generation", "--generation-tokens"]
    assert evaluate.main([*argv, "24"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for row in summary:
        assert row["generation_entropy"] > 0.0 and 0.0 <= row["reference_score"] <= 1.0
    records = [json.loads(line) for line in (out / "cases.jsonl").read_text().splitlines()]
    assert all({"generation_entropy", "reference_score"} <= r.keys() for r in records)
    samples = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [(s["method"], s["case_id"], len(s["samples"])) for s in samples[:2]] == [
        ("none", 7, 2),
        ("none", 8, 1),
    ]
    cases = load_cases(data)
    direct = generate_samples(lm, cases[0].generation_prompts, ["The Eiffel Tower"] * 2, 24)
    assert samples[0]["samples"] == direct  # method none is the unedited LM, seed = case index
    assert all(len(s) > len(p) for s, p in zip(direct, cases[0].generation_prompts, strict=True))
    assert "generation_entropy" in (out / "summary.md").read_text()
    assert evaluate.main([*argv, "0"]) == 2


def test_sampler_applies_a_remedi_direction_on_the_prompt_pass(tmp_path: Path) -> None:
    lm = tiny_model("llama")
    argv = ["--method", "none", "--data", "x", "--output", str(tmp_path)]
    args = evaluate.build_parser().parse_args([*argv, "--generation-tokens", "24"])
    cases = load_cases_from(RECORDS, tmp_path)
    options = evaluate.options(args)
    editor = AffineEditor(lm.arch.hidden_size)
    torch.nn.init.constant_(editor.linear.bias, 50.0)

    def edit_for(i: int) -> GenerationEdit:
        def apply(batch: PromptBatch) -> AbstractContextManager[object]:
            rows = torch.zeros(batch.input_ids.shape[0], lm.arch.hidden_size)
            return apply_editor(lm, 1, editor, rows, batch.subject_last, prompt_pass_only=True)

        return apply

    class Directed(Edited):
        def generation(self, index: int) -> tuple[str, GenerationEdit | None]:
            return "", edit_for(index)

    plain: list[list[str]] = [[] for _ in cases]
    compare._sampler(lm, "none", cases, options, plain)(range(len(cases)), Edited(lm, cases))
    directed: list[list[str]] = [[] for _ in cases]
    compare._sampler(lm, "remedi", cases, options, directed)(range(len(cases)), Directed(lm, cases))
    assert [len(s) for s in directed] == [2, 1] and directed != plain


def test_weight_edits_sample_under_the_edit_and_are_restored(tmp_path: Path) -> None:
    lm = tiny_model("gpt2")
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    argv = ["--method", "rome", "--data", "x", "--output", str(tmp_path), "--no-stats"]
    args = evaluate.build_parser().parse_args([*argv, "--layer", "1", "--steps", "2"])
    args.generation, args.generation_tokens = True, 24
    cases = load_cases_from(RECORDS, tmp_path)
    samples: dict[str, list[list[str]]] = {}
    args.method = ["rome", "none"]
    evaluate.evaluate(lm, evaluate.build_methods(args), cases, evaluate.options(args), samples)
    edited = samples["rome"]
    assert [len(s) for s in edited] == [2, 1] and edited != samples["none"]
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())


def load_cases_from(records: list[dict], tmp_path: Path) -> list[EditCase]:
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(records))
    return load_cases(path)
