"""`sinstudy run`: validate and open the study, run its engine(s), summarise.

One engine in this process (the default), or a pool of worker processes, one engine each
(`--workers N`, `--devices ...`). The batched engine is the default everywhere; `--engine
standard` runs Optuna's `study.optimize` instead.
"""

from __future__ import annotations

import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

from study import store as store_mod
from study.config import StudyConfig, models_at_once
from study.run import interrupt
from study.run.batched import kernels
from study.run.budget import Budget
from study.run.opening import (
    check_devices,
    check_folders,
    check_memory,
    check_study,
    check_tensorboard_owner,
    claim_tensorboard_folder,
    open_study,
    open_study_store,
    resolve_device,
)
from study.run.pool import Pool, finished_since, run_engine, worker_devices
from study.store import Store, recovery
from study.trial import attrs as trial_attrs
from study.trial.attrs import WORKER
from study.views.dashboard import publish
from study.views.summary import Progress, Summary, summarize


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def run(
    cfg: StudyConfig, *, progress: bool = True, say: Callable[[str], None] = _stderr
) -> Summary:
    # The bar and summary replace per-trial logs; a failing trial re-raises and the CLI prints one
    # line (SINSTUDY_DEBUG=1: traceback), so Optuna's own failure log with a traceback is noise.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    notes: list[str] = []
    device = (
        resolve_device(cfg.device, say=notes.append)
        if cfg.devices is None
        else check_devices(cfg.devices)
    )
    if device.type == "cuda":  # full float32 matmuls: the engines must agree with train.py
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if cfg.engine == "batched":
        kernels.check(device.type)
    placements = worker_devices(cfg, str(device))
    # models held at once on one device: every CPU worker shares this machine, GPU workers their
    # card
    per_worker = models_at_once(cfg, device.type)
    sharing = Counter(env.get("CUDA_VISIBLE_DEVICES") for _, env in placements)
    # each worker is a process, and a batched engine's writer another
    processes = len(placements) * (2 if cfg.engine == "batched" else 1)
    check_memory(cfg, device, per_worker * max(sharing.values()), processes=processes)
    parsed = store_mod.check(cfg.storage)  # read-only: nothing is written before all checks pass
    check_folders(cfg)
    if (new_file := parsed.missing_file()) is not None:
        check_tensorboard_owner(cfg, None, new_file)  # before the file is created
    store = open_study_store(cfg, parsed)
    storage = store.optuna
    check_study(cfg, storage)
    check_tensorboard_owner(cfg, storage)
    notes += store.advice(len(placements))
    notes += store.opening_notes()
    for note in notes:  # only once every check has passed, so a refusal stays one line
        say(note)
    study = open_study(cfg, storage)
    Path(cfg.artifact_dir).mkdir(parents=True, exist_ok=True)
    claim_tensorboard_folder(cfg, study)
    recovered = recovery.sweep_stale(
        store, study, grace_period=cfg.grace_period, max_retries=cfg.max_retries
    )
    for n, why in recovered.items():
        retry = " and queued for retry" if cfg.max_retries else ""
        say(f"trial #{n} of an earlier run: {why}; marked FAIL{retry}")

    run_name = trial_attrs.new_run()  # every trial this run's processes start carries it
    # what the study held before this run (queued trials it may take are not among them)
    stored = study.get_trials(deepcopy=False)
    before = {t.number for t in stored if t.state != TrialState.WAITING}
    running_before = {t.number for t in stored if t.state == TrialState.RUNNING}
    bar = Progress(cfg.n_trials, progress)
    start = time.perf_counter()
    signum, book, workers = 0, None, {WORKER}
    try:
        if len(placements) == 1 and not cfg.devices:
            signum, book = _run_here(cfg, store, device, bar)
        else:
            pool = Pool(
                cfg,
                study,
                placements,
                say=say,
                on_progress=lambda: bar.to(finished_since(study, before), study),
            )
            signum = pool.run()
            workers = pool.workers
    finally:
        bar.close()
    if not signum and cfg.engine == "standard":  # the batched engine's writer has done it
        publish(study)
    summary = summarize(
        study,
        cfg,
        device=_where(placements),
        since=before,
        workers=workers,
        wall=time.perf_counter() - start,
        signum=signum,
        recovered=recovered,
        running_before=running_before,
        run=run_name,
    )
    summary.bookkeeping_seconds = book
    return summary


def _run_here(
    cfg: StudyConfig, store: Store, device: torch.device, bar: Progress
) -> tuple[int, float | None]:
    """One engine in this process. Returns (interrupting signal or 0, bookkeeping seconds)."""
    budget = Budget(cfg.n_trials, cfg.timeout)
    on_trial = bar.written if cfg.engine == "batched" else bar
    try:
        with interrupt.handle_signals():
            book = run_engine(
                cfg, budget, seed=cfg.seed, device=str(device), on_trial=on_trial, store=store
            )
            return interrupt.requested(), book
    except interrupt.Interrupted as e:  # Optuna has already marked the running trial FAIL
        return e.signum, None
    except KeyboardInterrupt:
        return signal.SIGINT, None


def _where(placements: list[tuple[str, dict[str, str]]]) -> str:
    if len(placements) == 1 and not placements[0][1]:
        return placements[0][0]
    gpus = sorted({env["CUDA_VISIBLE_DEVICES"] for _, env in placements if env})
    return f"{len(placements)} workers on " + (
        f"GPUs {','.join(gpus)}" if gpus else placements[0][0]
    )
