"""Return freed CPU tensor memory to the operating system (glibc only).

glibc serves large allocations from its heap once a few big blocks have been freed (it raises
its mmap threshold dynamically); freed logits and activations then stay mapped and fragment, and
a training run's resident memory creeps up by hundreds of MB. Fixing the threshold keeps every
large tensor in its own mapping, released the moment it is freed. The command-line entry points
call :func:`release_freed_memory`; it is a no-op where glibc is absent.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3
DEFAULT_THRESHOLD = 128 * 1024
"""glibc's own starting value: allocations of 128 KiB and up are mapped separately."""


def release_freed_memory(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Pin glibc's mmap threshold at ``threshold`` bytes; returns whether it was applied."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False
