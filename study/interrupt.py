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
import signal
from collections.abc import Iterator

_received = 0  # the first signal's number, 0 while none


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


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    global _received
    _received = 0
    old = {s: signal.signal(s, _handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
