"""CounterFact datamodule: splits, examples, batches and the resumable shuffle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from datamodules import (
    BiasInBiosDataModule,
    CaseBatch,
    CounterFactDataModule,
    EpochShuffleSampler,
    McRaeDataModule,
)
from datamodules.attribute_data import (
    co_probabilities,
    concept_text,
    feature_phrase,
    indefinite,
)
from remedi.data import load_builtin

FACTS = [
    ("France", "Paris", "Rome"),
    ("Germany", "Berlin", "Paris"),
    ("Italy", "Rome", "Berlin"),
    ("Japan", "Tokyo", "Paris"),
    ("Brazil", "Brasilia", "Rome"),
    ("Toyota", "Japan", "France"),
    ("Apple", "iPhone", "Windows"),
    ("Microsoft", "Windows", "iPhone"),
    ("Messi", "soccer", "basketball"),
    ("Jordan", "basketball", "soccer"),
]


def rome_records() -> list[dict[str, Any]]:
    """Small CounterFact records in ROME's layout (case ids in reverse file order)."""
    records = []
    for i, (subject, true, new) in enumerate(FACTS):
        records.append(
            {
                "case_id": len(FACTS) - 1 - i,
                "requested_rewrite": {
                    "prompt": "The place of {} is",
                    "relation_id": "P1",
                    "subject": subject,
                    "target_true": {"str": true},
                    "target_new": {"str": new},
                },
                "paraphrase_prompts": [f"{subject} is tied to", f"We know {subject} for"],
                "neighborhood_prompts": ["The capital of Italy is", "Toyota makes"],
                "attribute_prompts": [],
                "generation_prompts": [],
            }
        )
    return records


def write_rome(path: Path) -> Path:
    path.write_text(json.dumps(rome_records()))
    return path


def write_mend(path: Path) -> Path:
    rows = [
        {
            "case_id": i,
            "prompt": f"The place of {s} is",
            "subject": s,
            "target_new": n,
            "ground_truth": t,
            "rephrase_prompt": f"{s} is tied to",
            "locality_prompt": "The capital of Italy is",
            "locality_ground_truth": "Rome",
        }
        for i, (s, t, n) in enumerate(FACTS)
    ]
    path.write_text(json.dumps(rows))
    return path


def test_builtin_splits_and_examples() -> None:
    dm = CounterFactDataModule(n_val=5, prompts_per_case=1)
    dm.setup("fit")
    assert len(dm.train_cases) == len(load_builtin("train"))
    assert len(dm.val_cases) == 5
    assert len(dm.train_examples) == len(dm.train_cases)
    example = dm.train_examples[0]
    case = dm.train_cases[0]
    assert example.prompt == case.paraphrase_prompts[0]
    assert example.context == f"{case.rewrite_prompt} {case.target_new}"
    assert example.target_mediated == case.target_new
    assert example.target_unmediated == case.target_true


def test_path_ordered_split_by_case_id(tmp_path: Path) -> None:
    dm = CounterFactDataModule(
        path=str(write_rome(tmp_path / "cf.json")), n_train=6, n_val=2, n_test=2, split="ordered"
    )
    dm.setup("fit")
    assert [c.case_id for c in dm.train_cases] == list(range(6))
    assert [c.case_id for c in dm.val_cases] == [6, 7]
    assert [c.case_id for c in dm.test_cases] == [8, 9]
    assert len(dm.train_examples) == 12  # two paraphrase prompts per case


def test_seeded_split_is_reproducible_and_disjoint(tmp_path: Path) -> None:
    path = str(write_mend(tmp_path / "mend.json"))
    ids = []
    for _ in range(2):
        dm = CounterFactDataModule(path=path, n_train=6, n_val=2, n_test=2, seed=3)
        dm.setup("fit")
        ids.append([c.case_id for c in dm.train_cases + dm.val_cases + dm.test_cases])
    assert ids[0] == ids[1]
    assert sorted(ids[0]) == list(range(10))
    assert ids[0] != list(range(10))


def test_separate_test_file(tmp_path: Path) -> None:
    dm = CounterFactDataModule(
        path=str(write_rome(tmp_path / "a.json")),
        test_path=str(write_mend(tmp_path / "b.json")),
        n_train=8,
        n_val=2,
        n_test=3,
        split="ordered",
    )
    dm.setup("test")
    assert [c.case_id for c in dm.test_cases] == [0, 1, 2]
    assert dm.test_cases[0].paraphrase_prompts == ["France is tied to"]


def test_bad_inputs_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="path"):
        CounterFactDataModule(path=str(tmp_path / "missing.json"))
    dm = CounterFactDataModule(path=str(write_rome(tmp_path / "cf.json")), n_train=20, n_val=2)
    with pytest.raises(ValueError, match="exceeds"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="batch_size"):
        CounterFactDataModule(batch_size=0)


def test_loaders_batches(tmp_path: Path) -> None:
    dm = CounterFactDataModule(
        path=str(write_rome(tmp_path / "cf.json")),
        n_train=6,
        n_val=3,
        n_test=1,
        batch_size=4,
        eval_batch_size=2,
    )
    dm.setup("fit")
    train = list(dm.train_dataloader())
    assert [len(b) for b in train] == [4, 4, 4]
    val = list(dm.val_dataloader())
    assert all(isinstance(b, CaseBatch) for b in val)
    assert [len(b.cases) for b in val] == [2, 1]
    assert len(val[0].examples) == 4


def test_epoch_shuffle_depends_only_on_seed_and_epoch() -> None:
    a, b = EpochShuffleSampler(20, seed=1), EpochShuffleSampler(20, seed=1)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert sorted(a) == list(range(20))
    b.set_epoch(1)
    assert list(a) == list(b)


def write_bios(path: Path) -> Path:
    """A tiny pickle in the layout of the official biosbias scripts."""
    import pickle

    bios = []
    for i, (first, last, title) in enumerate(
        [("Ann", "Lee", "nurse"), ("Bob", "Kim", "software_engineer"), ("Cy", "Ray", "dj")] * 4
    ):
        first_sentence = f"{first} {last} is a {title.replace('_', ' ')}."
        raw = f"{first_sentence} {first} works in Paris. {first} likes tea."
        bios.append(
            {
                "name": (first, "", f"{last}{i}"),
                "raw": raw,
                "start_pos": len(first_sentence) + 1,
                "title": title,
                "gender": "F",
                "URI": f"http://x/{i}",
            }
        )
    path.write_bytes(pickle.dumps(bios))
    return path


MCRAE_ROWS = [
    ("robin", "has_wings"),
    ("robin", "has_feathers"),
    ("robin", "beh_-_flies"),
    ("sparrow", "has_wings"),
    ("sparrow", "has_feathers"),
    ("sparrow", "beh_-_flies"),
    ("airplane", "has_wings"),
    ("airplane", "used_for_transportation"),
    ("airplane", "beh_-_flies"),
    ("apple_(fruit)", "is_red"),
    ("apple_(fruit)", "a_fruit"),
    ("apple_(fruit)", "eg_-_granny_smith"),
    ("cherry", "is_red"),
    ("cherry", "a_fruit"),
    ("knife", "made_of_metal"),
    ("knife", "is_sharp"),
    ("boots", "eg_-_cowboy"),
    ("boots", "made_of_leather"),
]
"""A small McRae-like file (the real norms are not needed): wings, feathers and flying co-occur;
so do red and fruit."""


def _features() -> dict[str, set[str]]:
    features: dict[str, set[str]] = {}
    for concept, feature in MCRAE_ROWS:
        features.setdefault(concept, set()).add(feature)
    return features


def write_mcrae(path: Path) -> Path:
    header = "Concept\tFeature\tWB_Label\tProd_Freq\n"
    path.write_text(header + "".join(f"{c}\t{f}\tx\t10\n" for c, f in MCRAE_ROWS))
    return path


def test_bias_in_bios_examples(tmp_path: Path) -> None:
    dm = BiasInBiosDataModule(path=str(write_bios(tmp_path / "bios.pkl")), n_val=2, n_test=2)
    dm.setup("fit")
    assert len(dm.train_examples) == 8 and len(dm.val_examples) == 2
    example = next(e for e in dm.train_examples if e.entity.startswith("Bob"))
    assert example.context == f"{example.entity} Bob works in Paris."
    assert example.prompt == f"{example.entity} has the occupation of"
    assert example.target_mediated == "software engineer"
    assert example.target_unmediated is None
    (batch,) = list(dm.val_dataloader())
    assert batch.cases == [] and len(batch.examples) == 2
    with pytest.raises(FileNotFoundError, match="path"):
        BiasInBiosDataModule(path=str(tmp_path / "none.pkl"))


def test_mcrae_feature_labels_are_cleaned() -> None:
    assert feature_phrase("has_wings") == "has wings"
    assert feature_phrase("a_fruit") == "is a fruit"
    assert feature_phrase("beh_-_flies") == "flies"
    assert feature_phrase("inbeh_-_floats") == "floats"
    assert feature_phrase("eg_-_cowboy") == "has kinds such as cowboy"
    assert feature_phrase("has_units_-_cm") == "has units such as cm"
    assert feature_phrase("used_for_transportation") == "is used for transportation"
    assert feature_phrase("made_of_metal") == "is made of metal"
    assert feature_phrase("is_furry/fuzzy") == "is furry or fuzzy"
    assert feature_phrase("eaten_as_prunes_(dried)") == "is eaten as prunes"
    assert feature_phrase("different_colours") == "comes in different colours"
    assert concept_text("apple_(fruit)") == "apple"
    assert indefinite("apple") == "an apple" and indefinite("robin") == "a robin"


def test_mcrae_co_probabilities() -> None:
    co = co_probabilities(_features(), min_co_concepts=1)
    assert co["has_wings", "beh_-_flies"] == 1.0  # every winged concept flies
    assert co["has_wings", "has_feathers"] == pytest.approx(2 / 3)
    assert co["has_feathers", "has_wings"] == 1.0
    assert ("has_wings", "is_red") not in co
    assert ("a_fruit", "eg_-_granny_smith") in co
    assert ("a_fruit", "eg_-_granny_smith") not in co_probabilities(_features())  # one concept


def test_mcrae_examples_pair_a_context_feature_with_another_co_occurring_one(
    tmp_path: Path,
) -> None:
    """REMEDI's task: the context states one feature, the prompt asks for a different feature
    that co-occurs with it, of a concept that has neither; never the context's own words."""
    path = str(write_mcrae(tmp_path / "mcrae.txt"))
    dm = McRaeDataModule(path=path, examples_per_concept=3, n_val=1, n_test=1)
    examples = dm.read_examples()
    features, co = _features(), co_probabilities(_features())
    assert len(examples) > len(features)
    for e in examples:
        concept, context, prompt = str(e.case_id).split("|")
        assert context != prompt and co[context, prompt] >= 0.1
        assert context not in features[concept] and prompt not in features[concept]
        article = indefinite(e.entity).capitalize()
        assert e.entity == concept_text(concept)
        assert e.context == f"{article} {feature_phrase(context)}."
        assert f"{e.prompt} {e.target_mediated}" == f"{article} {feature_phrase(prompt)}"
        assert e.target_mediated not in e.context.split()
        assert e.target_unmediated is None
        assert " - " not in e.context and "_" not in e.context + e.prompt
    every = McRaeDataModule(path=path, examples_per_concept=100).read_examples()
    knife = {tuple(str(e.case_id).split("|")[1:]) for e in every if e.entity == "knife"}
    birds = ("has_wings", "has_feathers", "beh_-_flies")
    assert knife == {(a, b) for a in birds for b in birds if a != b} | {
        ("is_red", "a_fruit"),
        ("a_fruit", "is_red"),
    }
    airplane = [e for e in every if e.entity == "airplane"]
    assert sorted((e.context, e.prompt, e.target_mediated) for e in airplane) == [
        ("An airplane is a fruit.", "An airplane is", "red"),
        ("An airplane is red.", "An airplane is a", "fruit"),
    ]
    dm.setup("fit")
    # whole concepts per split: no concept is trained on and tested (REMEDI's held-out concepts)
    splits = [dm.train_examples, dm.val_examples, dm._test]
    assert sum(len(x) for x in splits) == len(examples) and all(splits)
    concepts = [{e.entity for e in x} for x in splits]
    assert not (concepts[0] & concepts[1] or concepts[0] & concepts[2] or concepts[1] & concepts[2])
    bad = tmp_path / "bad.txt"
    bad.write_text("Word\tThing\n")
    with pytest.raises(ValueError, match="Concept"):
        McRaeDataModule(path=str(bad)).setup("fit")
