"""The trained editors shipped under checkpoints/pretrained/: small, readable, the default
model's, and each made by a committed config named in its README."""

from __future__ import annotations

from pathlib import Path

import pytest

from remedi import checkpoints, registry

SHIPPED = sorted(p for p in (Path(__file__).parents[1] / "checkpoints" / "pretrained").glob("*"))
LIMIT = 25 * 2**20


@pytest.mark.parametrize("folder", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_editor_is_small_readable_and_made_by_a_committed_config(folder: Path) -> None:
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size <= LIMIT, f"{folder.name}: {size / 2**20:.1f} MiB"
    saved = checkpoints.read(folder)
    method = saved["remedi"]["method"]
    assert folder.name == f"{method}-gemma3-270m"
    assert method in registry.trained_names()
    assert saved["remedi"]["model"] == "gemma3-270m"
    assert saved["editor_state"] and not any(k.startswith("model.") for k in saved["editor_state"])
    readme = (folder / "README.md").read_text(encoding="utf-8")
    configs = [w.strip("`") for w in readme.split() if w.strip("`").startswith("configs/")]
    assert configs and all((Path(__file__).parents[1] / c).is_file() for c in configs), configs
