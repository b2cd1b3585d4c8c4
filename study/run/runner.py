"""`sinstudy run`: open the run, run its engine(s), summarise.

One engine in this process (the default), or a pool of worker processes, one engine each
(`--workers N`, `--devices ...`). The batched engine is the default everywhere; `--engine
standard` runs Optuna's `study.optimize` instead.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable

import optuna

from study.config import StudyConfig, models_at_once
from study.run import interrupt
from study.run.opening import Run, open_run
from study.run.pool import Pool, finished_since, run_engine
from study.trial.attrs import WORKER
from study.views.summary import Progress, Summary, summarize


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def run(
    cfg: StudyConfig, *, progress: bool = True, say: Callable[[str], None] = _stderr
) -> Summary:
    # The bar and summary replace per-trial logs; a failing trial re-raises and the CLI prints one
    # line (SINSTUDY_DEBUG=1: traceback), so Optuna's own failure log with a traceback is noise.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    opened = open_run(cfg, say=say)
    with opened.store.naming_faults():
        return _run_opened(opened, progress, say)


def _run_opened(opened: Run, progress: bool, say: Callable[[str], None]) -> Summary:
    cfg = opened.cfg
    study = opened.load_study()
    at_once = models_at_once(cfg, opened.device.type) // cfg.repeats * len(opened.placements)
    bar = Progress(cfg.n_trials, progress, at_once=at_once)
    start = time.perf_counter()
    try:
        signum, book, workers = _execute(opened, study, bar, say)
    finally:
        bar.close()
    summary = summarize(
        study,
        cfg,
        device=opened.where(),
        since=set(opened.before),
        workers=workers,
        wall=time.perf_counter() - start,
        signum=signum,
        recovered=opened.recovered,
        running_before=set(opened.running_before),
        run=opened.name,
    )
    summary.bookkeeping_seconds = book
    return summary


def _execute(
    opened: Run, study: optuna.Study, bar: Progress, say: Callable[[str], None]
) -> tuple[int, float | None, set[str]]:
    """Run the engine(s) to the end of the budget. Returns (interrupting signal or 0,
    bookkeeping seconds where measured, the worker attrs of the run's processes)."""
    if opened.in_process:
        return (*_run_here(opened, bar), {WORKER})
    pool = Pool(
        opened,
        say=say,
        on_progress=lambda: bar.to(finished_since(study, opened.before), study),
    )
    return pool.run(), None, pool.workers


def _run_here(opened: Run, bar: Progress) -> tuple[int, float | None]:
    """One engine in this process. Returns (interrupting signal or 0, bookkeeping seconds)."""
    on_trial = bar.written if opened.cfg.engine == "batched" else bar
    try:
        with interrupt.handle_signals():
            book = run_engine(opened, seed=opened.cfg.seed, on_trial=on_trial)
            return interrupt.requested(), book
    except interrupt.Interrupted as e:  # Optuna has already marked the running trial FAIL
        return e.signum, None
    except KeyboardInterrupt:
        return signal.SIGINT, None
