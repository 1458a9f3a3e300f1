"""Atomic, durable file writes: a temporary file (or folder) beside the target, flushed to disk and
renamed over it when complete, so that an interrupted run or a power cut never leaves a
half-written output or cache entry under its final name.

Temporary files are created private (``mkstemp`` uses mode 0600, ``mkdtemp`` 0700); what is
renamed into place gets the mode of an ordinary file the user writes (0666 / 0777 less the umask),
so results on a shared server are readable by whoever could read the user's other files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from remedi.signals import deferred


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file or a folder's entries) to disk; a no-op where not supported."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() and hasattr(os, "O_DIRECTORY") else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish_mode(path: Path) -> None:
    """Give ``path`` (and, for a folder, everything in it) the umask's ordinary modes."""
    mask = _umask()
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
        os.chmod(path, 0o777 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``: it replaces ``path`` on success, else is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        publish_mode(Path(tmp))
        _fsync(Path(tmp))
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(path: str | Path, replace: bool = True, update: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it becomes ``path``.

    With ``update``, the entries of an existing ``path`` that the caller did not write are
    carried over (hard links), so the result is the old folder with the new files in it, and
    an interruption leaves the old folder whole (an appended file is read from ``path``).
    An existing ``path`` is replaced when ``replace`` (moved aside first, removed after the swap);
    otherwise a folder that appeared meanwhile (a concurrent writer's finished copy) is kept and
    the temporary one dropped. On failure the temporary folder is removed and ``path`` untouched.
    SIGINT and SIGTERM wait until the swap is done: between its two renames there is no ``path``.
    """
    path = Path(os.path.abspath(path))  # "." has no name to put beside it
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp-", dir=path.parent))
    old: Path | None = None
    try:
        yield tmp
        publish_mode(tmp)
        if update:  # after publish_mode: the linked files keep their modes
            link_entries(path, tmp, skip=set(os.listdir(tmp)))
        for root, _, files in os.walk(tmp):
            for name in files:
                _fsync(Path(root) / name)
            _fsync(Path(root))
        with deferred():
            old = _swap_in(tmp, path, replace)
        _fsync(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _swap_in(tmp: Path, path: Path, replace: bool) -> Path | None:
    """Rename ``tmp`` to ``path``; return the previous ``path``, moved aside, for removal. When
    the rename fails, the previous folder is put back (never removed with the new one)."""
    old = None
    if path.exists() and replace:
        old = path.with_name(path.name + ".old-" + tmp.name.rsplit("-", 1)[-1])
        path.rename(old)
    try:
        tmp.rename(path)
    except OSError:
        if old is not None and not path.exists():
            old.rename(path)
        if replace or not path.exists():
            raise
    return old


def link_entries(source: Path, target: Path, skip: Collection[str] = ()) -> None:
    """Hard-link (copy, where a link fails) the entries of ``source`` not named in ``skip`` into
    ``target`` (what :func:`atomic_dir` carries over with ``update``)."""
    if not source.is_dir():
        return
    for entry in source.iterdir():
        if entry.name in skip:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, target / entry.name, symlinks=True, copy_function=_link)
        else:
            _link(entry, target / entry.name)


def _link(source: str | Path, target: str | Path) -> None:
    if os.path.islink(source):
        os.symlink(os.readlink(source), target)
        return
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: Any, indent: int | None = 2) -> None:
    """Write ``data`` as JSON to ``path`` atomically."""
    write_text(path, json.dumps(data, indent=indent) + "\n")


def write_jsonl(path: str | Path, records: list[dict[str, Any]]) -> None:
    """Write one JSON object per line to ``path`` atomically."""
    write_text(path, "".join(json.dumps(r) + "\n" for r in records))
