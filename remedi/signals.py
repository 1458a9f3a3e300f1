"""Interruptions: SIGTERM handled like Ctrl-C, and both held off while outputs are committed.

A command wrapped in :func:`interruptible` turns SIGTERM into :class:`Interrupted` (as Python
turns SIGINT into ``KeyboardInterrupt``), so ``finally`` blocks remove temporary files either
way; it then ends with one line and exit code 128 + the signal's number. :func:`deferred` holds
both signals back for the few system calls that publish a finished output (the renames of
:func:`remedi.atomic.atomic_dir`), so an interruption lands before or after them, never between.
"""

from __future__ import annotations

import functools
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ParamSpec

P = ParamSpec("P")
HELD = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or SIGINT), raised where the program was; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise(signum: int, _frame: Any) -> None:
    raise Interrupted(signum)


def _in_main_thread() -> bool:
    """Whether handlers can be set here (Python runs them in the main thread only)."""
    return threading.current_thread() is threading.main_thread()


@contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then deliver the first that came (to the
    handler that was in place before). Outside the main thread, the block runs unprotected."""
    held = [s for s in HELD if signal.getsignal(s) is not None] if _in_main_thread() else []
    received: list[int] = []
    previous = {s: signal.signal(s, lambda n, _f: received.append(n)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if received:
            signal.raise_signal(received[0])


def interruptible(main: Callable[P, int]) -> Callable[P, int]:
    """``main`` with SIGTERM raised like SIGINT; after either, one ``error:`` line on stderr and
    exit code 128 + the signal's number instead of a traceback."""

    @functools.wraps(main)
    def run(*args: P.args, **kwargs: P.kwargs) -> int:
        previous = signal.getsignal(signal.SIGTERM) if _in_main_thread() else None
        if previous is not None:
            signal.signal(signal.SIGTERM, _raise)
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt as err:
            signum = int(getattr(err, "signum", signal.SIGINT))
            name = signal.Signals(signum).name
            print(
                f"error: interrupted by {name}; every output is whole or absent (earlier "
                "outputs are kept until a new one replaces them complete)",
                file=sys.stderr,
            )
            return 128 + signum
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return run
