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


@contextlib.contextmanager
def importances() -> Iterator[None]:
    """Optuna's importances as sinstudy computes them: PED-ANOVA is experimental, and it warns,
    whenever a target is given (a study of two objectives), that it ranks low values first;
    every sinstudy objective is minimised, so both warnings are noise. The in-memory studies
    the intervals resample (study.views.importance) are not announced either."""
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(max(level, optuna.logging.WARNING))
    try:
        with experimental(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="PedAnovaImportanceEvaluator computes")
            yield
    finally:
        optuna.logging.set_verbosity(level)
