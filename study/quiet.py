"""Optuna's ExperimentalWarning, silenced where sinstudy uses an experimental feature on purpose
(heartbeats, the journal's lock, PED-ANOVA, some plots): the user did not choose it, so the
warning would only be noise."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import optuna


@contextlib.contextmanager
def experimental() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def ignore_experimental() -> None:
    """For the rest of this process (a command that only reads and draws)."""
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
