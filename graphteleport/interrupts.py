"""SIGINT and SIGTERM held back over a block that must not be cut in half.

Used where an interruption halfway would do harm: the commit of an output (a file
renamed, its data file not yet), and the import of a compiled module (numpy, onnx,
onnxruntime: an exception raised by a signal handler while their initialisation runs
Python code can come out of it as an ``ImportError``, leaving a half-imported module and
an internal error where the user asked for a clean interrupted exit).  Light on purpose:
the CLI takes it before importing anything heavy.
"""

from __future__ import annotations

import contextlib
import importlib
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType

__all__ = ["import_held", "signals_held"]


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back for the duration; the first one caught is handled
    on exit, as its handler at that time would have.

    A blocked signal mask (``signal.pthread_sigmask``) would not do: it covers the
    calling thread only, and any other thread (onnxruntime's, BLAS's, ours) takes the
    signal and makes the main thread run the handler at once.  So the Python-level
    handlers are swapped for one that records the signal, and the original handler runs
    when the block ends (the default action, for SIG_DFL).  Python runs signal handlers
    in the main thread only; elsewhere nothing can interrupt the block and nothing is
    swapped.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[tuple[int, FrameType | None]] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        caught.append((signum, frame))

    held = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, hold) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for signum, frame in caught[:1]:
            _deliver(previous[signal.Signals(signum)], signum, frame)


def _deliver(handler: object, signum: int, frame: FrameType | None) -> None:
    """Run what *handler* (as :func:`signal.signal` returned it) does for *signum*."""
    if callable(handler):
        handler(signum, frame)
    elif handler != signal.SIG_IGN:  # SIG_DFL, or a handler set outside Python
        signal.raise_signal(signum)


def import_held(name: str) -> None:
    """Import module ``name`` with SIGINT and SIGTERM held (:func:`signals_held`) unless
    it is imported already: ``import_held("onnxruntime")`` before ``import onnxruntime as
    ort`` where a signal may come (its import takes 0.1-0.3 s, most of it in compiled
    code)."""
    if name not in sys.modules:
        with signals_held():
            importlib.import_module(name)
