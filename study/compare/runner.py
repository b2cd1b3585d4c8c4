"""`sinstudy compare FACTOR`: the course report's comparisons, redone with repeats.

Each factor is a small grid study (`compare-<factor>-e<epochs>-s<seeds>` in the same storage):
one trial per cell of the factor, with `seeds` repeats (different weights and batch order; the
same seeds in every cell), everything else held at BASE. All cells and seeds train at once in
the batched engine (enqueued trials, no pruning), so curves land in TensorBoard and the
dashboard like any trial's, and an interrupted comparison resumes with the cells it lacks.
The table gives mean ± std over seeds, the ranking every cell against the best, each verdict its
test, its uncertainty and what it found, and one line sums up what held
(study.compare.evidence).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from study import config
from study.compare import evidence
from study.compare.evidence import LEVEL, Spread
from study.compare.factors import (
    FACTORS,
    SETUPS,
    Factor,
    Setup,
    cell_config,
    cell_data,
    never_acts,
    study_name,
)
from study.compare.verdicts import (
    LEARNED,
    SETTLE_WITHIN,
    CellStats,
    _mean_std,
    settled,
    summary,
    verdicts,
)
from study.config import ConfigError, DataConfig, TrainConfig
from study.run import interrupt
from study.run.batched.engine import run_batched
from study.run.opening import Run, name_metric, open_study_store
from study.store import Store

# Candidate causes of the gap between the report's numbers and sinstudy's: each a setting
# the report leaves open (optimizer, learning rate, input scaling, training-set size).


def _train(study: optuna.Study, opened: Store, plan: list, device: torch.device, on_trial) -> None:
    """Train the cells not done yet, one data set at a time (`plan`: its config, its cells and
    what a cell's trial trains), in a fixed order: queued trials (from an interrupted run)
    always belong to the first data set with cells left, so each engine takes only its own."""
    trials = study.get_trials(deepcopy=False)
    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    done = {t.params.get("cell") for t in trials if t.state in finished}
    queued = {t.params.get("cell") for t in trials if t.state == TrialState.WAITING}
    for cfg, cells, configure in plan:
        todo = [c for c in cells if c not in done]
        if not todo:
            continue
        for cell in todo:
            if cell not in queued:
                study.enqueue_trial({"cell": cell})
        with interrupt.handle_signals():
            run_batched(
                Run.queued(cfg, opened, device, len(todo)),
                seed=0,
                on_trial=on_trial,
                configure=configure,
                publish=False,  # the note is the comparison's table (cli), not a study summary
            )
        if interrupt.requested():
            raise KeyboardInterrupt


def _known(name: str, setup: str) -> None:
    if name not in FACTORS:
        raise ConfigError(f"unknown comparison {name!r}; choose one of: {', '.join(FACTORS)}")
    if setup not in SETUPS:
        raise ConfigError(f"unknown setup {setup!r}; choose one of: {', '.join(SETUPS)}")


def _cell_config(base: dict[str, Any], data: DataConfig, slots: int) -> config.StudyConfig:
    """The study config one data set's cells train under: a grid without pruning, batched."""
    toml = {"data": asdict(data)}
    return config.build(toml, **base, pruner="none", engine="batched", slots=slots)


def _configure(factor: Factor, cells: list[str], epochs: int, seeds: int, fixed: Setup):
    """What a queued cell's trial trains: `seeds` repeats of its cell's config."""

    def configure(trial: optuna.Trial, first_seed: int) -> list[TrainConfig]:
        cell = trial.suggest_categorical("cell", list(factor.cells))
        if cell not in cells:
            raise RuntimeError(f"queued cell {cell!r} belongs to another data set")
        return [cell_config(factor, cell, seed, epochs, fixed) for seed in range(seeds)]

    return configure


def _open_comparison(opened: Store, study: str, name: str, factor: Factor) -> optuna.Study:
    """The factor's grid study in the store (created on first use), refused if it is not one of
    compare's (two objectives) or holds other cells (an older sinstudy)."""
    study = optuna.create_study(
        study_name=study,
        storage=opened.optuna,
        load_if_exists=True,
        pruner=optuna.pruners.NopPruner(),
    )
    if len(study.directions) > 1:
        raise ConfigError(
            f"study {study.study_name!r} in this storage has {len(study.directions)} objectives; "
            "compare's studies have one (the validation MSE); delete it (optuna delete-study) or "
            "use another --storage"
        )
    trials = study.get_trials(deepcopy=False)
    stored = next((t.distributions["cell"] for t in trials if "cell" in t.distributions), None)
    if stored is not None and list(stored.choices) != list(factor.cells):
        raise ConfigError(
            f"study {study.study_name!r} in this storage holds other cells than `compare {name}` "
            "has now (an older sinstudy); delete it (optuna delete-study) or use another --storage"
        )
    return study


def run(
    name: str,
    url: str,
    *,
    epochs: int,
    seeds: int,
    device: str,
    log_dir: str,
    artifact_dir: str,
    setup: str = "default",
    progress: Callable[[int], None] | None = None,
) -> list[CellStats]:
    """Train the missing cells of one factor and return its statistics. A cell is one trial of a
    grid study with `seeds` repeats (seeds 0..seeds-1, the same in every cell, so the cells differ
    only in what they vary); the cells x seeds of one data set train at once in the batched
    engine (one engine run per data set), no pruning. `progress(n)`: n cells finished, first
    called once every check has passed."""
    _known(name, setup)
    factor, fixed = FACTORS[name](epochs), SETUPS[setup]
    by_data: dict[DataConfig, list[str]] = {}
    for cell in factor.cells:
        by_data.setdefault(cell_data(factor, cell, fixed), []).append(cell)
    base = dict(study=study_name(name, epochs, seeds, setup), storage=url, max_epochs=epochs)
    base |= dict(device=device, log_dir=log_dir, artifact_dir=artifact_dir, repeats=seeds)
    cfgs = {data: _cell_config(base, data, len(cells) * seeds) for data, cells in by_data.items()}
    opened = open_study_store(next(iter(cfgs.values())))
    study = _open_comparison(opened, study_name(name, epochs, seeds, setup), name, factor)
    ended = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    done = {t.params.get("cell") for t in ended}
    name_metric(study)
    finished = [len(done & set(factor.cells))]
    if progress:
        progress(finished[0])  # everything checked: training starts

    def on_trial(number: int, state: TrialState, value: float | None) -> None:
        finished[0] += 1
        if progress:
            progress(finished[0])

    Path(artifact_dir).mkdir(parents=True, exist_ok=True)
    plan = [
        (cfgs[data], cells, _configure(factor, cells, epochs, seeds, fixed))
        for data, cells in by_data.items()
    ]
    _train(study, opened, plan, torch.device(device), on_trial)
    if "base" not in study.user_attrs:
        train = asdict(replace(fixed.train, max_epochs=epochs))
        study.set_user_attr("base", json.dumps({"train": train, "data": asdict(fixed.data)}))
    return stats(study, factor, epochs, fixed)


def stats(
    study: optuna.Study,
    factor: Factor,
    epochs: int,
    setup: Setup = SETUPS["default"],
) -> list[CellStats]:
    """Each cell's per-seed values, from the attrs its trial stores."""
    rows = []
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    for cell in factor.cells:
        t = next(
            (
                t
                for t in trials
                if t.params.get("cell") == cell and "test_mse_per_seed" in t.user_attrs
            ),
            None,
        )

        def per_seed(key: str, t=t) -> tuple[float, ...]:
            return tuple(float(v) for v in t.user_attrs[f"{key}_per_seed"]) if t else ()

        rows.append(
            CellStats(
                cell,
                per_seed("test_mse"),
                per_seed("final_test_mse"),
                per_seed("val_mse"),
                per_seed("final_val_mse"),
                factor.report.get(cell, ""),
                settled(t.intermediate_values) if t else None,
                never_acts(cell_config(factor, cell, 0, epochs, setup)),
            )
        )
    return rows


def describe_base(epochs: int, setup: str = "default") -> str:
    fixed = SETUPS[setup]
    b = replace(fixed.train, max_epochs=epochs)
    opt = f"SGD (momentum {b.momentum:g})" if b.optimizer == "sgd" else b.optimizer
    schedule = {
        "none": "no schedule",
        "step": f"lr x{b.gamma:g} every {b.step_size} epochs",
        "cosine": "cosine schedule",
        "exponential": f"lr x{b.gamma:g} per epoch",
    }[b.scheduler]
    idle = never_acts(b)
    return (
        f"held fixed unless the cell varies it: depth {b.depth}, width {b.width}, {b.activation}, "
        f"{opt} lr {b.lr:g}, {schedule}, batch {b.batch_size}, {epochs} epochs; {fixed.about}"
        + (f" ({idle})" if idle else "")
    )


def table(rows: list[CellStats]) -> str:
    def ms(values: tuple[float, ...]) -> str:
        mean, sd = _mean_std(values)
        return f"{mean:.2e} ± {sd:.1e}" if values else ""

    def when(r: CellStats) -> str:
        return "" if not r.n else "never" if r.settled is None else str(r.settled)

    lines = [
        "| cell | seeds | test MSE (best epoch) | test MSE (final) | val MSE (best) | val MSE "
        "(final) | settled (epoch) | report |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.cell}{' (*)' if r.note else ''} | {r.n} | {ms(r.test)} | {ms(r.final_test)} | "
        f"{ms(r.val)} | {ms(r.final_val)} | {when(r)} | {r.report} |"
        for r in rows
    ]
    lines += [
        "",
        "Mean ± standard deviation over seeds. Settled: the epoch from which the mean validation "
        f"curve stays within {SETTLE_WITHIN:g}x of its best; never: it ends above that, or its "
        f"best is not {LEARNED:g}x below its first epoch's (it did not learn).",
    ]
    lines += [f"(*) {r.cell}: {r.note}." for r in rows if r.note]
    return "\n".join(lines)


def ranking(rows: list[CellStats]) -> str:
    """Every cell by its geometric-mean test MSE, each against the best (Welch's interval on
    log10 MSE) and whether the seeds tell it from the best."""
    places = evidence.rank({r.cell: Spread.of(r.test) for r in rows})
    lines = [
        "| place | cell | test MSE (geometric mean; log10 mean ± sd) | vs the best "
        f"({LEVEL:.0%} CI, Welch) | told from the best |",
        "|---|---|---|---|---|",
    ]
    for p in places:
        vs = "best" if p.to_best is None else p.to_best.ratio()
        told = "" if p.to_best is None else "not yet: undecided" if p.tied_with_best else "yes"
        lines.append(
            f"| {p.place} | {p.cell} | {10**p.spread.mean:.2e} ({p.spread.mean:.2f} ± "
            f"{p.spread.sd:.2f}) | {vs} | {told} |"
        )
    tied = [p.cell for p in places if p.tied_with_best]
    seeds = max(r.n for r in rows)
    if len(tied) > 1:
        lines += [
            "",
            f"Not told from the best at {seeds} seeds (undecided, not shown equal): "
            f"{', '.join(tied)}.",
        ]
    elif len(places) > 1:
        lines += ["", f"At {seeds} seeds every other cell is told from the best, {tied[0]}."]
    return "\n".join(lines)


def body(name: str, rows: list[CellStats], *, epochs: int, seeds: int, setup: str) -> str:
    """The comparison's text below its heading: table, ranking, verdicts and the summary line
    (what the CLI prints, saves as markdown and leaves as the dashboard's note)."""
    found = verdicts(name, rows, epochs=epochs, setup=setup)
    return "\n".join(
        [
            table(rows),
            "",
            ranking(rows),
            "",
            *[f"- {v.text}" for v in found],
            "",
            f"**{summary(found, seeds, epochs)}**",
        ]
    )


def markdown(
    name: str, epochs: int, seeds: int, setup: str, rows: list[CellStats], *, device: str
) -> str:
    """The comparison as Markdown: its question, what was held fixed, the table and verdicts."""
    return "\n".join(
        [
            f"## compare {name}: {FACTORS[name](epochs).question}",
            "",
            describe_base(epochs, setup) + f"; {seeds} seeds per cell, device {device}",
            "",
            body(name, rows, epochs=epochs, seeds=seeds, setup=setup),
        ]
    )


def save(name: str, epochs: int, seeds: int, setup: str, text: str, url: str) -> Path:
    """Keep the Markdown in storage/compare/ and as the study's note in optuna-dashboard;
    returns the file."""
    from optuna_dashboard import save_note

    study = study_name(name, epochs, seeds, setup)
    out = Path(f"storage/compare/{study.removeprefix('compare-')}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    save_note(optuna.load_study(study_name=study, storage=url), text)
    return out
