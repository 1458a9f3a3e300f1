"""Small fixtures shared by the tests of REMEDI's own evaluations: a tiny McRae table, a tiny Bias
in Bios pickle, and a tiny saved model with a REMEDI checkpoint trained for one step on it."""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

from conftest import COUNTERFACT_RECORDS, lightning_trainer, tiny_model

MCRAE_ROWS = {
    "apple": ["a_fruit", "is_red", "is_edible", "grows_on_trees", "is_round"],
    "cherry": ["a_fruit", "is_red", "is_edible", "grows_on_trees", "is_small"],
    "plum": ["a_fruit", "is_edible", "grows_on_trees", "is_round", "is_small"],
    "robin": ["a_bird", "has_wings", "beh_-_flies", "has_feathers", "is_small"],
    "crow": ["a_bird", "has_wings", "beh_-_flies", "has_feathers", "is_black"],
    "eagle": ["a_bird", "has_wings", "beh_-_flies", "has_feathers", "has_a_beak"],
    "hammer": ["a_tool", "made_of_metal", "used_for_pounding", "is_heavy"],
    "wrench": ["a_tool", "made_of_metal", "used_for_turning", "is_heavy"],
    "knife": ["a_utensil", "made_of_metal", "is_sharp", "used_for_cutting"],
    "car": ["has_wheels", "made_of_metal", "is_heavy", "used_for_transportation"],
    "truck": ["has_wheels", "made_of_metal", "is_heavy", "is_large"],
    "chair": ["furniture", "made_of_wood", "has_legs", "used_for_sitting"],
}
"""Invented concept-feature pairs in McRae's labelling style (not McRae's data)."""


def write_mcrae(path: Path) -> Path:
    """A tab-separated table with McRae's ``Concept``, ``Feature`` and ``Prod_Freq`` columns."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["Concept", "Feature", "Prod_Freq"])
        for concept, features in MCRAE_ROWS.items():
            for k, feature in enumerate(features):
                writer.writerow([concept, feature, 5 + 6 * k])  # 5, 11, 17, ... of 30
    return path


BIOS = [
    ("nurse", "She cares for patients at the hospital every night."),
    ("nurse", "She gives patients their medicine and checks on them."),
    ("nurse", "He works with doctors to care for sick patients."),
    ("architect", "He designs houses and office buildings in the city."),
    ("architect", "She draws plans for new buildings and bridges."),
    ("architect", "He designs buildings with large windows."),
    ("professor", "She teaches students at the university and writes papers."),
    ("professor", "He teaches physics to students at the university."),
    ("professor", "She lectures at the university and supervises students."),
]
FIRST = ["Ann", "Bob", "Cara", "Dan", "Eve", "Finn", "Gail", "Hugo", "Iris"]
LAST = ["Smith", "Jones", "Brown", "Lee", "Clark", "Young", "King", "Hill", "Ward"]


def write_bios(path: Path) -> Path:
    """A pickle in the layout of the official biosbias scripts: name, raw, start_pos, title."""
    records = []
    for (title, rest), first, last in zip(BIOS, FIRST, LAST, strict=True):
        opening = f"{first} {last} is a {title}. "
        records.append(
            {
                "name": (first, "", last),
                "raw": opening + rest + " More text follows.",
                "start_pos": len(opening),
                "title": title,
            }
        )
    with open(path, "wb") as f:
        pickle.dump(records, f)
    return path


def trained_setup(root: Path, layer: int = 1) -> dict[str, Path]:
    """A tiny saved model, a REMEDI checkpoint (one training step on the tiny McRae table) and
    the shared CounterFact records as a data file."""
    from datamodules import McRaeDataModule
    from lightning_modules import RemediModule, register_model
    from remedi.models import load_model

    lm = tiny_model("llama")
    model_dir = root / "model"
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    loaded = load_model(str(model_dir))
    register_model(loaded)
    mcrae = write_mcrae(root / "mcrae.tsv")
    data = McRaeDataModule(str(mcrae), examples_per_concept=1, n_val=2, n_test=4, batch_size=4)
    module = RemediModule(model=loaded.spec, layer=layer, lambda_u=0.0)
    run = root / "run"
    lightning_trainer(run, max_epochs=1, limit_train_batches=1).fit(module, data)
    data = root / "cf.json"
    data.write_text(json.dumps(COUNTERFACT_RECORDS))
    return {"model": model_dir, "checkpoint": run / "last.ckpt", "mcrae": mcrae, "data": data}
