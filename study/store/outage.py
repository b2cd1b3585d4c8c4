"""Waiting out a storage that cannot be reached: the rule every step of a store follows.

A step that fails because of the storage's environment (`Store.transient`: a database that
cannot be reached or is restarting, a full disk under SQLite) is tried again with a growing
pause, for at most `bound` seconds from the outage's first failure ([study] storage_outage).
Meanwhile the engines keep training: the batched engine's writer holds what it is handed and
stores it in order once a step succeeds; the standard engine's trial waits at its next write.
Past the bound the step raises StorageError with the cause and the bound (exit status 1).

A process prints one line when an outage starts and one when it ends. A step is tried again
only in a form that cannot store anything twice (study.store.rdb: a step whose commit was sent
but never answered first looks for what it wrote).

Heartbeats stop during an outage, everyone's alike; so a sweep (study.store.recovery) counts a
trial's silence only from the end of the last outage this process waited out (`quiet_since`),
and no trial is failed for a silence the outage caused.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from study.errors import StorageError

T = TypeVar("T")

FIRST_PAUSE_S = 0.5
LONGEST_PAUSE_S = 5.0  # a restarted server is found within this of its return


def seconds(s: float) -> str:
    s = round(s)
    return f"{s // 60} min {s % 60} s" if s >= 60 else f"{s} s"


class Outage:
    """One process's view of its storage's outages (thread-safe: a writer's heartbeat thread
    and its loop wait on the same one). `bound`: seconds an outage is waited out; 0: a failing
    step raises at once."""

    def __init__(
        self,
        bound: float = 0.0,
        say: Callable[[str], None] | None = None,
        *,
        meanwhile: str = "training goes on and its results wait",
        past: str = "stopped; the next run retries the trials left running",
    ):
        self.bound, self.meanwhile, self.past = bound, meanwhile, past
        self.give_up: Callable[[], object] = lambda: False  # the run was interrupted
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self.since: float | None = None  # when the current outage began (monotonic)
        self.ended = float("-inf")  # when the last one ended (wall clock, as heartbeats are)
        self.outages = 0
        self._lock = threading.Lock()

    def quiet_since(self) -> float:
        """Wall-clock time from which a heartbeat's silence counts: the end of the last outage
        (minus infinity when there was none)."""
        return self.ended

    def run(
        self, step: Callable[[bool], T], transient: Callable[[BaseException], str | None]
    ) -> T:
        """`step(again)` until it returns, waiting out failures `transient` names (its line
        says what failed). `again` is True on every try after such a failure: the step must
        then first look for what an unanswered commit may have stored."""
        again = False
        pause = FIRST_PAUSE_S
        while True:
            try:
                out = step(again)
            except Exception as e:
                line = transient(e)
                if line is None or self.bound <= 0:
                    raise
                self._failed(line, e)
                time.sleep(pause)
                pause = min(pause * 2, LONGEST_PAUSE_S)
                again = True
                continue
            if self.since is not None:
                self._back()
            return out

    def _failed(self, line: str, e: BaseException) -> None:
        with self._lock:
            now = time.monotonic()
            if self.since is None:
                self.since = now
                self.outages += 1
                self.say(
                    f"sinstudy: storage unavailable: {line}; {self.meanwhile}, for up to "
                    f"{seconds(self.bound)} ([study] storage_outage)"
                )
            elif now - self.since > self.bound:
                raise StorageError(
                    f"{line}; waited {seconds(now - self.since)}, past [study] storage_outage "
                    f"({seconds(self.bound)}): {self.past}",
                    exit_code=1,
                ) from e
            if self.give_up():
                raise StorageError(
                    f"{line}; interrupted while waiting for it: {self.past}", exit_code=1
                ) from e

    def _back(self) -> None:
        with self._lock:
            if self.since is None:
                return
            waited = time.monotonic() - self.since
            self.since, self.ended = None, time.time()
            self.say(f"sinstudy: storage back after {seconds(waited)}; storing what waited")
