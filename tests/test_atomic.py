"""Atomic writes: complete or absent, and readable like any file the user writes."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from remedi.atomic import atomic_dir, atomic_path, write_json


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_and_folders_follow_the_umask(tmp_path: Path, umask_022: None) -> None:
    """The temporary file's private 0600 (and folder's 0700) do not survive the rename."""
    write_json(tmp_path / "out" / "summary.json", {"a": 1})
    assert _mode(tmp_path / "out" / "summary.json") == 0o644
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "weights.bin").write_bytes(b"0")
        (tmp / "sub").mkdir(mode=0o700)
    assert _mode(tmp_path / "model") == 0o755
    assert _mode(tmp_path / "model" / "weights.bin") == 0o644
    assert _mode(tmp_path / "model" / "sub") == 0o755
    os.umask(0o077)
    write_json(tmp_path / "private.json", {})
    assert _mode(tmp_path / "private.json") == 0o600


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["out.txt"]


def test_atomic_dir_replaces_or_keeps_an_existing_folder(tmp_path: Path) -> None:
    target = tmp_path / "edited"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    with atomic_dir(target, replace=False) as tmp:
        (tmp / "other.txt").write_text("a concurrent writer's copy")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited"]
