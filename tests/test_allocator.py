"""The glibc allocator setting used by the command-line entry points."""

from __future__ import annotations

import ctypes.util
import sys

import pytest

from remedi.allocator import release_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_release_freed_memory_applies_on_glibc() -> None:
    assert release_freed_memory() is (ctypes.util.find_library("c") is not None)
