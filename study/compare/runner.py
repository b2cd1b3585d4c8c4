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
import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from study import config
from study.compare import evidence
from study.compare.evidence import LEVEL, Gap, Spread
from study.config import ConfigError, DataConfig, TrainConfig
from study.run import interrupt
from study.run.batched.engine import run_batched
from study.run.opening import Run, name_metric, open_study_store
from study.store import Store
from study.trial.course import TEST_MSE as REPORT_TEST_MSE

# Held fixed unless a factor varies it: the report trained with ReLU and no schedule; it named
# no optimizer (Adam here) and no widths (32 here).
BASE = TrainConfig(
    depth=2,
    width=32,
    activation="relu",
    lr=1e-3,
    optimizer="adam",
    scheduler="none",
    max_epochs=1000,
)


@dataclass(frozen=True)
class Setup:
    """What a comparison holds fixed: the training defaults and the data."""

    train: TrainConfig
    data: DataConfig
    about: str


SETUPS = {
    "default": Setup(BASE, DataConfig(), "data as `sinstudy run`"),
    # The report's setting as measured (`sinstudy compare report`; docs/results.md): plain SGD
    # whose rate decays, on raw x over 4,800 training points (75 steps per epoch at batch 64,
    # its "30k steps by epoch 400").
    "report": Setup(
        replace(
            BASE,
            optimizer="sgd",
            momentum=0.0,
            lr=3e-3,
            scheduler="step",
            step_size=100,
            gamma=0.5,
        ),
        DataConfig(n_train=4800, input_scaling="raw"),
        "raw x, 4,800 training points (the report's setting, as measured)",
    ),
}


@dataclass(frozen=True)
class Factor:
    # cell name -> TrainConfig fields it changes (and "data": DataConfig fields)
    cells: dict[str, dict[str, Any]]
    report: dict[str, str]  # cell name -> what the report found for it
    question: str


def _step(epochs: int) -> dict[str, Any]:
    return {"scheduler": "step", "step_size": max(1, epochs // 4), "gamma": 0.3}


NETS = {"shallow": {"depth": 1}, "deep": {"depth": 4}}  # at the base width, as `compare depth`
# Candidate causes of the gap between the report's numbers and sinstudy's: each a setting
# the report leaves open (optimizer, learning rate, input scaling, training-set size).
_RAW, _RAW_4800 = {"input_scaling": "raw"}, {"input_scaling": "raw", "n_train": 4800}
_SGD = {"optimizer": "sgd", "momentum": 0.0}
_HALVED = {"scheduler": "step", "step_size": 100, "gamma": 0.5}
HYPOTHESES: dict[str, dict[str, Any]] = {
    "sinstudy's setting": {},
    "raw x": {"data": _RAW},
    "raw x, 4800 points": {"data": _RAW_4800},
    "SGD 1e-3": {**_SGD, "lr": 1e-3},
    "raw x, SGD 1e-3": {**_SGD, "lr": 1e-3, "data": _RAW},
    "raw x, 4800 points, SGD 1e-3": {**_SGD, "lr": 1e-3, "data": _RAW_4800},
    "raw x, 4800 points, SGD 1e-4": {**_SGD, "lr": 1e-4, "data": _RAW_4800},
    "raw x, 4800 points, SGD 1e-2": {**_SGD, "lr": 1e-2, "data": _RAW_4800},
    "raw x, 4800 points, SGD 3e-3": {**_SGD, "lr": 3e-3, "data": _RAW_4800},
    # "converged after about 400 epochs": a learning rate that decays by then
    "raw x, 4800 points, SGD 1e-2 halved every 100 epochs": {
        **_SGD,
        **_HALVED,
        "lr": 1e-2,
        "data": _RAW_4800,
    },
    "raw x, 4800 points, SGD 3e-3 halved every 100 epochs": {
        **_SGD,
        **_HALVED,
        "lr": 3e-3,
        "data": _RAW_4800,
    },
    "raw x, 4800 points, SGD 1e-2 x0.1 every 250 epochs": {
        **_SGD,
        "scheduler": "step",
        "step_size": 250,
        "gamma": 0.1,
        "lr": 1e-2,
        "data": _RAW_4800,
    },
    "raw x, 4800 points, Adam 1e-4": {"lr": 1e-4, "data": _RAW_4800},
    # the report's networks are unnamed: its shallow one wider (1 x 128), its deep one 4 x 32
    "raw x, 4800 points, SGD 3e-3 halved every 100 epochs, shallow 1 x 128": {
        **_SGD,
        **_HALVED,
        "lr": 3e-3,
        "data": _RAW_4800,
    },
}
# Which networks each hypothesis trains as "shallow" and "deep" (default: NETS).
NETS_OF = {
    "raw x, 4800 points, SGD 3e-3 halved every 100 epochs, shallow 1 x 128": {
        "shallow": {"depth": 1, "width": 128},
        "deep": {"depth": 4},
    }
}

FACTORS: dict[str, Callable[[int], Factor]] = {
    "depth": lambda e: Factor(
        {
            "shallow (1 layer)": {"depth": 1},
            "2 layers": {"depth": 2},
            "deep (4 layers)": {"depth": 4},
        },
        {
            "shallow (1 layer)": f"test MSE {REPORT_TEST_MSE['shallow']:.3e}",
            "deep (4 layers)": f"test MSE {REPORT_TEST_MSE['deep']:.3e}",
        },
        "does the deeper network fit better (lower test MSE)?",
    ),
    "width": lambda e: Factor(
        {"narrow (8)": {"width": 8}, "32": {"width": 32}, "wide (128)": {"width": 128}},
        {},
        "does the wider network fit better (lower test MSE)?",
    ),
    "lr": lambda e: Factor(
        {"lr 1e-4": {"lr": 1e-4}, "lr 1e-2": {"lr": 1e-2}},
        {"lr 1e-4": "correct loss curve", "lr 1e-2": "MSE rose again near the end"},
        "does constant lr 1e-2 end above its best (the rise the report saw) while 1e-4 does not?",
    ),
    "scheduler": lambda e: Factor(
        {"no schedule": {}, "step schedule": _step(e), "cosine schedule": {"scheduler": "cosine"}},
        {"no schedule": "", "step schedule": "larger test MSE, smaller validation MSE"},
        "is a schedule worse on test but better on validation, as the report found?",
    ),
    "report": lambda e: Factor(
        {
            f"{h} / {net}": {**cell, **arch}
            for h, cell in HYPOTHESES.items()
            for net, arch in NETS_OF.get(h, NETS).items()
        },
        {
            f"{h} / {net}": f"test MSE {REPORT_TEST_MSE[net]:.3e}"
            for h in HYPOTHESES
            for net in NETS
        },
        f"which setting gives the report's test MSE (deep {REPORT_TEST_MSE['deep']:.1e}, shallow "
        f"{REPORT_TEST_MSE['shallow']:.1e}) within 2x?",
    ),
    "activation": lambda e: Factor(
        {
            "relu": {},
            "tanh": {"activation": "tanh"},
            "none (identity)": {"activation": "identity"},
        },
        {"relu": "converged and fit", "none (identity)": "did not converge or fit"},
        "does the network fit sin(x) only with an activation?",
    ),
}


SETTLE_WITHIN = 2.0  # "settled": the mean validation curve stays within this factor of its best
LEARNED = 10.0  # ... and its best is this many times below its first epoch's (it learned)


@dataclass(frozen=True)
class CellStats:
    """One cell's values, one per seed (its trial's `*_per_seed` attrs)."""

    cell: str
    test: tuple[float, ...]  # test MSE on the best epoch's weights
    final_test: tuple[float, ...]  # on the last epoch's weights
    val: tuple[float, ...]  # best validation MSE
    final_val: tuple[float, ...]
    report: str
    settled: int | None = None  # settled(): None = never (or no curve: n == 0)
    note: str = ""  # what the reader must know to read the row (a schedule that never acts)

    @property
    def n(self) -> int:
        return len(self.test)


def settled(curve: dict[int, float]) -> int | None:
    """The epoch from which the (mean) validation curve stays within SETTLE_WITHIN of its best:
    where a loss plot on a log scale stops visibly falling, what the report calls converged.
    None (never) where it ends above that, or where its best is not LEARNED times below its first
    epoch's value (a curve that never fell has not converged, it has not learned)."""
    finite = sorted((e, v) for e, v in curve.items() if math.isfinite(v))
    if not finite:
        return None
    best = min(v for _, v in finite)
    if best * LEARNED > finite[0][1] or finite[-1][1] > SETTLE_WITHIN * best:
        return None
    out = finite[-1][0]
    for e, v in reversed(finite):
        if v > SETTLE_WITHIN * best:
            break
        out = e
    return out


def never_acts(cfg: TrainConfig) -> str:
    """Words for a schedule that cannot change the learning rate within the cell's epochs, or ''.
    A step schedule decays after `step_size` epochs: at step_size >= max_epochs it never does, and
    the cell is its constant-lr twin."""
    if cfg.scheduler == "step" and cfg.step_size >= cfg.max_epochs:
        return (
            f"its schedule (lr x{cfg.gamma:g} every {cfg.step_size} epochs) never acts within "
            f"{cfg.max_epochs} epochs: give --max-epochs above {cfg.step_size} for it to"
        )
    return ""


def _mean_std(values: tuple[float, ...] | list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def cell_config(
    factor: Factor, cell: str, seed: int, epochs: int, setup: Setup = SETUPS["default"]
) -> TrainConfig:
    fields = {k: v for k, v in factor.cells[cell].items() if k != "data"}
    return replace(setup.train, max_epochs=epochs, seed=seed, **fields)


def cell_data(factor: Factor, cell: str, setup: Setup = SETUPS["default"]) -> DataConfig:
    return replace(setup.data, **factor.cells[cell].get("data", {}))


def study_name(name: str, epochs: int, seeds: int, setup: str = "default") -> str:
    return f"compare-{name}-e{epochs}-s{seeds}" + ("" if setup == "default" else f"-{setup}")


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


HELD, FAILED, UNDECIDED = "held", "did not hold", "undecided"


@dataclass(frozen=True)
class Verdict:
    claim: str  # what is tested, in a few words: the summary names it
    outcome: str  # HELD, FAILED or UNDECIDED, at evidence.LEVEL
    text: str  # the comparison made, its numbers and their uncertainty


def _how(gap: Gap) -> str:
    return f"Welch on log10 MSE, {gap.n_a} and {gap.n_b} seeds"


def _hint(a: Spread, b: Spread, cmd: str) -> str:
    n = evidence.seeds_to_settle(a, b)
    if n is None:
        return "no number of seeds would settle it: the two do not differ"
    if n > config.MAX_REPEATS:
        return (
            f"more than {config.MAX_REPEATS} seeds per cell (the most --seeds takes) would be "
            "needed for a gap this small at this spread"
        )
    return f"about {n} seeds per cell would settle a gap this size: {cmd} --seeds {n}"


def _direction(
    a: str, a_vals, b: str, b_vals, what: str, cmd: str
) -> tuple[Gap, str, Spread, Spread]:
    """a's values against b's: the gap and one sentence with its ratio, interval and test."""
    sa, sb = Spread.of(a_vals), Spread.of(b_vals)
    gap = evidence.welch(sa, sb)
    text = f"{a}'s {what} is {gap.ratio()} {b}'s ({_how(gap)})"
    if gap.decided:
        text += f": clearly {'lower' if gap.diff < 0 else 'higher'}"
    else:
        text += f": undecided at this many seeds; {_hint(sa, sb, cmd)}"
    return gap, text, sa, sb


def _claim_lower(claim: str, a: str, a_vals, b: str, b_vals, what: str, cmd: str) -> Verdict:
    """Verdict on "a's `what` is lower than b's"."""
    gap, text, _, _ = _direction(a, a_vals, b, b_vals, what, cmd)
    outcome = UNDECIDED if not gap.decided else HELD if gap.diff < 0 else FAILED
    return Verdict(claim, outcome, text)


def _both(claim: str, text: str, gaps: list[tuple[Gap, bool]]) -> Verdict:
    """Held where every gap is decided the claimed way (True: a lower); failed where one is
    decided against it."""
    if any(g.decided and (g.diff < 0) != lower for g, lower in gaps):
        return Verdict(claim, FAILED, text)
    if all(g.decided for g, _ in gaps):
        return Verdict(claim, HELD, text)
    return Verdict(claim, UNDECIDED, text)


def _geo(s: Spread) -> str:
    return f"{10**s.mean:.2e}" if s.n else "no values"


def _within(s: Spread, target: float, factor: float) -> str:
    """HELD where the geometric mean's interval lies within `factor` of target, FAILED where it
    lies wholly outside, UNDECIDED otherwise."""
    lo, hi = s.interval()
    t, f = math.log10(target), math.log10(factor)
    if t - f <= lo and hi <= t + f:
        return HELD
    if hi < t - f or lo > t + f:
        return FAILED
    return UNDECIDED


def _side(s: Spread, bound: float, *, below: bool) -> str:
    """HELD where the geometric mean's interval lies wholly below (above) `bound`, FAILED where
    wholly on the other side, UNDECIDED where it straddles it."""
    lo, hi = s.interval()
    b = math.log10(bound)
    if (hi < b) if below else (lo > b):
        return HELD
    if (lo > b) if below else (hi < b):
        return FAILED
    return UNDECIDED


def _ratio_interval(s: Spread, target: float) -> str:
    lo, hi = s.interval()
    t = math.log10(target)
    low = "0" if lo == -math.inf else f"{10 ** (lo - t):.2g}x"
    high = "inf" if hi == math.inf else f"{10 ** (hi - t):.2g}x"
    return f"{10 ** (s.mean - t):.2g}x the report's, {LEVEL:.0%} CI {low}-{high}"


def command(name: str, epochs: int, setup: str = "default") -> str:
    return f"sinstudy compare {name} --max-epochs {epochs}" + (
        "" if setup == "default" else f" --setup {setup}"
    )


def verdicts(
    name: str, rows: list[CellStats], *, epochs: int, setup: str = "default"
) -> list[Verdict]:
    """What the comparison says about its question, each verdict with its test and uncertainty
    (at evidence.LEVEL): "clearly" only where the interval excludes no difference. Each
    factor's hypothesis is judged by its rule in JUDGES."""
    return JUDGES[name]({row.cell: row for row in rows}, command(name, epochs, setup))


def _judge_depth(r: dict[str, CellStats], cmd: str) -> list[Verdict]:
    s, d = r["shallow (1 layer)"], r["deep (4 layers)"]
    v = _claim_lower(
        "deep fits better than shallow", "deep", d.test, "shallow", s.test, "test MSE", cmd
    )
    report = (
        f"report: deep better ({REPORT_TEST_MSE['deep']:.1e} vs {REPORT_TEST_MSE['shallow']:.1e})"
    )
    return [replace(v, text=f"deep vs shallow, the report's pair: {v.text} ({report})")]


def _judge_width(r: dict[str, CellStats], cmd: str) -> list[Verdict]:
    n, w = r["narrow (8)"], r["wide (128)"]
    return [
        _claim_lower(
            "wide fits better than narrow", "wide", w.test, "narrow", n.test, "test MSE", cmd
        )
    ]


def _judge_lr(r: dict[str, CellStats], cmd: str) -> list[Verdict]:
    lo, hi = r["lr 1e-4"], r["lr 1e-2"]

    def rise(c: CellStats) -> list[float]:  # final / best validation MSE, per seed
        return [f / b for f, b in zip(c.final_val, c.val, strict=True) if b > 0]

    gap, text, sh, sl = _direction(
        "lr 1e-2", rise(hi), "lr 1e-4", rise(lo), "rise at the end (final / best val MSE)", cmd
    )
    first = _both(
        "lr 1e-2 ends above its best more than lr 1e-4 (the report's rise)",
        f"lr 1e-2 ends at {10**sh.mean:.2g}x its best validation MSE, lr 1e-4 at "
        f"{10**sl.mean:.2g}x (geometric means): {text} (report: 1e-2 rose again)",
        [(gap, False)],
    )
    second = _claim_lower(
        "lr 1e-4 ends with a lower test MSE than lr 1e-2",
        "lr 1e-4",
        lo.final_test,
        "lr 1e-2",
        hi.final_test,
        "test MSE on its final weights",
        cmd,
    )
    return [first, second]


def _judge_scheduler(r: dict[str, CellStats], cmd: str) -> list[Verdict]:
    none = r["no schedule"]
    out = []
    for cell in ("step schedule", "cosine schedule"):
        c = r[cell]
        g_test, t_test, _, _ = _direction(
            cell, c.final_test, "no schedule", none.final_test, "final test MSE", cmd
        )
        g_val, t_val, _, _ = _direction(
            cell, c.final_val, "no schedule", none.final_val, "final val MSE", cmd
        )
        note = f" ({c.note})" if c.note else ""
        out.append(
            _both(
                f"{cell}: worse on test, better on validation",
                f"{cell} vs none, final weights{note}: {t_test}; {t_val} (report: a schedule "
                "was worse on test and better on validation)",
                [(g_test, False), (g_val, True)],
            )
        )
    return out


_REPRODUCES = {
    HELD: "reproduces",
    FAILED: "does not reproduce",
    UNDECIDED: "undecided whether it reproduces",
}


def _judge_report(r: dict[str, CellStats], cmd: str) -> list[Verdict]:
    out = []
    for h in HYPOTHESES:
        got = {net: Spread.of(r[f"{h} / {net}"].test) for net in NETS}
        outcomes = [_within(got[net], REPORT_TEST_MSE[net], 2.0) for net in NETS]
        outcome = FAILED if FAILED in outcomes else UNDECIDED if UNDECIDED in outcomes else HELD
        when = " / ".join(
            "never" if r[f"{h} / {net}"].settled is None else str(r[f"{h} / {net}"].settled)
            for net in ("deep", "shallow")
        )
        notes = {r[f"{h} / {net}"].note for net in NETS} - {""}
        vs = {net: _ratio_interval(got[net], REPORT_TEST_MSE[net]) for net in NETS}
        out.append(
            Verdict(
                h,
                outcome,
                f"{h}: deep {_geo(got['deep'])} ({vs['deep']}), shallow "
                f"{_geo(got['shallow'])} ({vs['shallow']}), settled (deep / shallow) "
                f"{when} -> {_REPRODUCES[outcome]} the report within 2x"
                + (f" ({'; '.join(sorted(notes))})" if notes else ""),
            )
        )
    return out


def _judge_activation(r: dict[str, CellStats], cmd: str) -> list[Verdict]:
    act, lin = Spread.of(r["relu"].test), Spread.of(r["none (identity)"].test)
    fits, flat = _side(act, 1e-2, below=True), _side(lin, 0.1, below=False)
    outcome = HELD if fits == flat == HELD else FAILED if FAILED in (fits, flat) else UNDECIDED
    return [
        Verdict(
            "only with an activation does the network fit sin(x)",
            outcome,
            f"relu test MSE {_geo(act)}, no activation {_geo(lin)} (geometric means over "
            f"{act.n} and {lin.n} seeds; held where relu's {LEVEL:.0%} interval lies below 1e-2 "
            "and the identity's above 0.1) (report: only with the activation did it converge)",
        )
    ]


# each factor's hypothesis, judged from its cells' statistics (by cell name) and the command
# that reruns it (named in a verdict that needs more seeds)
JUDGES = {
    "depth": _judge_depth,
    "width": _judge_width,
    "lr": _judge_lr,
    "scheduler": _judge_scheduler,
    "report": _judge_report,
    "activation": _judge_activation,
}


def summary(found: list[Verdict], seeds: int) -> str:
    """One line: which claims held, which did not, which are undecided at this many seeds."""
    parts = []
    for outcome in (HELD, FAILED, UNDECIDED):
        claims = [v.claim for v in found if v.outcome == outcome]
        if not claims:
            continue
        many = len(claims) > 4 and outcome == FAILED
        named = f"{len(claims)} claims (listed above)" if many else "; ".join(claims)
        parts.append(f"{outcome}: {named}")
    return f"Summary ({seeds} seeds per cell, {LEVEL:.0%} level): " + ". ".join(parts) + "."


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
        told = "" if p.to_best is None else "no: tied" if p.tied_with_best else "yes"
        lines.append(
            f"| {p.place} | {p.cell} | {10**p.spread.mean:.2e} ({p.spread.mean:.2f} ± "
            f"{p.spread.sd:.2f}) | {vs} | {told} |"
        )
    tied = [p.cell for p in places if p.tied_with_best]
    seeds = max(r.n for r in rows)
    if len(tied) > 1:
        lines += ["", f"Indistinguishable from the best at {seeds} seeds: {', '.join(tied)}."]
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
            f"**{summary(found, seeds)}**",
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
