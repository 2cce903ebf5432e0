"""SIGINT and SIGTERM to the driver: stop the run cleanly instead of dying mid-write.

What the driver does then: docs/faults-and-resume.md, "Ctrl-C or SIGTERM to the driver". The
first signal raises ``Interrupted`` in the main thread, where the driver waits on Ray; later
ones are only logged, so that cleanup (bounded by timeouts) is never cut short. Inside ``deferred()``
(starting or stopping Ray) a signal is recorded and raised when the block ends, because an
exception in the middle of either would leave half-started processes.
"""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager
from typing import Iterator, Optional

from orchestrator.errors import Interrupted

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _State:
    active = False  # handlers installed by handle_signals()
    received: Optional[int] = None  # the first signal, once it came
    defer_depth = 0


def _handler(signum, frame) -> None:
    if _State.received is not None:
        log.warning("received %s again; already stopping the run", signal.Signals(signum).name)
        return
    _State.received = signum
    # Only what is true now: whether a checkpoint exists is said per variant once its workers stop.
    log.warning("received %s: stopping the run", signal.Signals(signum).name)
    if _State.defer_depth == 0:
        raise Interrupted(signum)


def received() -> Optional[int]:
    return _State.received


def as_interrupted(e: KeyboardInterrupt) -> Interrupted:
    """``e`` with its signal: Ray turns our exception into a plain KeyboardInterrupt in ray.get."""
    return e if isinstance(e, Interrupted) else Interrupted(_State.received or signal.SIGINT)


@contextmanager
def handle_signals() -> Iterator[None]:
    """For the length of a command: SIGINT/SIGTERM raise Interrupted (main thread only)."""
    if threading.current_thread() is not threading.main_thread() or _State.active:
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    _State.active, _State.received, _State.defer_depth = True, None, 0
    try:
        for s in SIGNALS:
            signal.signal(s, _handler)
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _State.active = False


@contextmanager
def deferred() -> Iterator[None]:
    """Hold a signal until the block ends, then raise it (unless one is already being handled)."""
    already = _State.received
    _State.defer_depth += 1
    try:
        yield
    finally:
        _State.defer_depth -= 1
    if _State.defer_depth == 0 and already is None and _State.received is not None:
        raise Interrupted(_State.received)
