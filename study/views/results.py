"""Read a finished (or running) study back from storage alone: never retrains, never writes."""

from __future__ import annotations

import json
import sys

import optuna
from optuna.trial import FrozenTrial

from study import store
from study.config import ConfigError
from study.views import analysis
from study.views.analysis import Counts
from study.views.summary import describe_trial, front_lines


def open_for_reading(url: str, *, read_only: bool = True) -> optuna.storages.BaseStorage:
    """Open a storage that must already exist (a missing file is a ConfigError, not created);
    `read_only` (readers): so that nothing can be written, which also reads a file or database
    this user may not write."""
    parsed = store.check(url, read_only=read_only)
    if (missing := parsed.missing_file()) is not None:
        raise ConfigError(
            f"no study storage at {str(missing)!r}; run `sinstudy run` first or fix --storage"
        )
    opened = store.open_store(parsed, read_only=read_only)
    for note in opened.reading_notes():  # lines of the file it skipped
        print(note, file=sys.stderr)
    return opened.optuna


def load_existing(study_name: str, url: str) -> optuna.Study:
    """Load a study that must already exist; a missing file or study is a ConfigError."""
    storage = open_for_reading(url)
    names = optuna.get_all_study_names(storage)
    if study_name not in names:
        known = ", ".join(repr(n) for n in names) or "none"
        raise ConfigError(
            f"no study {study_name!r} in {url} (studies there: {known}); fix --study"
        )
    return optuna.load_study(study_name=study_name, storage=storage)


def best_trial(study: optuna.Study) -> FrozenTrial:
    """The complete trial of lowest validation MSE (with two objectives: the front's most
    accurate)."""
    best = analysis.best_trial(study)
    if best is None:
        raise ConfigError(f"study {study.study_name!r} has no complete trial yet; run more trials")
    return best


def smallest_lines(study: optuna.Study) -> list[str]:
    """The smallest network reaching each test MSE level (analysis.LEVELS), as the report's
    table: one line per level."""
    lines = ["smallest network per test MSE level"]
    for level, t in analysis.smallest_reaching(study):
        if t is None:
            lines.append(f"  <= {level:.0e}  none yet")
        else:
            lines.append(
                f"  <= {level:.0e}  #{t.number} {t.user_attrs['n_params']} params, test MSE "
                f"{analysis.mse_texts(t)[1]}  {analysis.params_text(t.params)}"
            )
    return lines


def best_text(study_name: str, url: str) -> str:
    study = load_existing(study_name, url)
    trial = best_trial(study)
    c = Counts.of(study.get_trials(deepcopy=False))
    cfg = json.loads(study.user_attrs.get("config", "{}"))
    lines = [
        f"study          {study_name}  ({c.complete} complete, {c.pruned} pruned, {c.failed} "
        f"failed)"
    ]
    front = analysis.front(study)
    lines += describe_trial(trial, "most accurate" if front else "best trial")
    lines += front_lines(front, limit=None)
    if front:
        lines += smallest_lines(study)
    if cfg:
        lines.append(
            f"max epochs     {cfg['train']['max_epochs']}, sampler {cfg['sampler']}, pruner "
            f"{cfg['pruner']}"
        )
    return "\n".join(lines)
