"""Ctrl-C and SIGTERM, turned into a clean stop at the next epoch boundary.

A signal handler that raises can lose its exception: when the signal lands while Python runs a
finaliser or weakref callback (SQLAlchemy has many), the exception is printed and dropped, and
the trial runs on. So the first SIGINT/SIGTERM only records itself; the objective calls
`check()` after every epoch and the worker loop before every trial, and those raise
`Interrupted` from ordinary code, which Optuna turns into a FAIL trial. A second signal raises
at once, for a user who does not want to wait for the epoch to end.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

_received = 0  # the first signal's number, 0 while none
REDELIVER_S = 0.05  # after a finaliser dropped a stop, when its signal is sent again


class Interrupted(KeyboardInterrupt):
    """Raised for SIGINT/SIGTERM; a KeyboardInterrupt, so Optuna marks the running trial FAIL."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def requested() -> int:
    return _received


def check() -> None:
    if _received:
        raise Interrupted(_received)


def _handler(signum: int, frame: object) -> None:
    global _received
    if _received:
        raise Interrupted(signum)
    _received = signum


def redeliver_from_finalisers() -> None:
    """A stop raised while Python runs a finaliser (a signal handler's KeyboardInterrupt or
    Interrupted, landed in one of SQLAlchemy's weakref callbacks, say) is printed as "Exception
    ignored ... Traceback" and dropped, and the command runs on. Instead: inside an engine (this
    module's handler) the stop is recorded, as the first signal is, and the engine stops at its
    next epoch; elsewhere the signal is sent again from a thread, to land in ordinary code and
    end the command. Idempotent."""
    previous = sys.unraisablehook
    if getattr(previous, "redelivers", False):
        return

    def hook(unraisable) -> None:
        global _received
        exc = unraisable.exc_value
        if not isinstance(exc, KeyboardInterrupt):
            previous(unraisable)
            return
        signum = getattr(exc, "signum", signal.SIGINT)
        if signal.getsignal(signum) is _handler:
            _received = _received or signum
            return
        # a moment later: sent at once, it lands in this hook, which drops it in turn
        again = threading.Timer(REDELIVER_S, os.kill, (os.getpid(), signum))
        again.daemon = True
        again.start()

    hook.redelivers = True
    sys.unraisablehook = hook


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    global _received
    _received = 0
    redeliver_from_finalisers()
    old = {s: signal.signal(s, _handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
