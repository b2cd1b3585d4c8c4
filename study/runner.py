"""Create or load the study, check it matches the config, run the trials, summarise.

Order matters: config and device are validated, then the storage is checked (read-only), and
only then is anything written. A study that exists is continued, but only with the same search
space and data: mixing trials of two spaces would make its importances and best trial meaningless.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from . import interrupt, recovery, workers
from . import storage as storage_mod
from .analysis import Counts, params_text
from .config import ConfigError, StudyConfig, to_dict
from .space import grid
from .writer import Written

VERSION_ATTR = "sinstudy_version"


def resolve_device(name: str, *, say: Callable[[str], None] = print) -> torch.device:
    """auto -> cuda if available (saying once when it is not), else check the named device."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        say("note: no GPU found (torch.cuda.is_available() is False); training on the CPU")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ConfigError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} is not available (no CUDA GPU visible); use --device cpu or auto")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(
            f"device {name!r} does not exist: {torch.cuda.device_count()} GPU(s) visible; use cuda:0..cuda:{torch.cuda.device_count() - 1}"
        )
    return dev


def make_sampler(cfg: StudyConfig) -> optuna.samplers.BaseSampler:
    s = cfg.sampler
    if s == "tpe":
        return optuna.samplers.TPESampler(seed=cfg.seed)
    if s == "random":
        return optuna.samplers.RandomSampler(seed=cfg.seed)
    if s == "grid":
        if cfg.space.per_layer_width:
            raise ConfigError("the grid sampler cannot search per-layer widths; set per_layer_width = false")
        return optuna.samplers.GridSampler(grid(cfg.space), seed=cfg.seed)
    if s == "gp":
        return optuna.samplers.GPSampler(seed=cfg.seed)
    return optuna.samplers.CmaEsSampler(seed=cfg.seed, warn_independent_sampling=False)


def make_pruner(cfg: StudyConfig) -> optuna.pruners.BasePruner:
    epochs = cfg.train.max_epochs
    if cfg.pruner == "hyperband":
        # Optuna's benchmarks recommend Hyperband with TPE. Rungs from max_epochs/27 upward.
        return optuna.pruners.HyperbandPruner(min_resource=max(1, epochs // 27), max_resource=epochs, reduction_factor=3)
    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=max(1, epochs // 10))
    if cfg.pruner == "sha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, epochs // 27), reduction_factor=3)
    return optuna.pruners.NopPruner()


def _identity(cfg: StudyConfig) -> dict[str, Any]:
    """What must match for two runs to share a study: the search space and the data."""
    d = to_dict(cfg)
    return {"search_space": d["space"], "data": d["data"]}


def check_study(cfg: StudyConfig, storage: optuna.storages.BaseStorage) -> None:
    """An existing study must minimise and have been made with the same space and data."""
    if cfg.study not in optuna.get_all_study_names(storage):
        return
    existing = optuna.load_study(study_name=cfg.study, storage=storage)
    if existing.direction != optuna.study.StudyDirection.MINIMIZE:
        raise ConfigError(f"study {cfg.study!r} maximises its value; sinstudy minimises MSE; use another --study name")
    stored = existing.user_attrs.get("identity")
    if stored is None:
        raise ConfigError(f"study {cfg.study!r} was not made by sinstudy; use another --study name")
    stored, identity = json.loads(stored), json.loads(json.dumps(_identity(cfg)))
    diff = [k for k in identity if stored.get(k) != identity[k]]
    if diff:
        raise ConfigError(
            f"study {cfg.study!r} was created with another {' and '.join(diff)}; run with the "
            f"config it was created with, or start a new study with --study NAME"
        )


def open_study(cfg: StudyConfig, storage: optuna.storages.BaseStorage, sampler: optuna.samplers.BaseSampler) -> optuna.Study:
    """Create the study, or load it (after check_study), recording the config on creation."""
    identity = _identity(cfg)
    study = optuna.create_study(
        study_name=cfg.study, storage=storage, direction="minimize",
        sampler=sampler, pruner=make_pruner(cfg), load_if_exists=True,
    )
    if "identity" not in study.user_attrs:
        from . import __version__

        study.set_user_attr("identity", json.dumps(identity))
        study.set_user_attr("config", json.dumps(to_dict(cfg)))
        study.set_user_attr(VERSION_ATTR, __version__)
    return study


@dataclass
class Summary:
    study: str
    storage: str
    device: str
    this_run: Counts
    total: Counts
    wall_seconds: float
    log_dir: str
    artifact_dir: str
    best: FrozenTrial | None = None
    signum: int = 0  # the signal that interrupted the run, or 0
    bookkeeping_seconds: float | None = None  # sampler, pruner, storage, TensorBoard (one process)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


class _Progress:
    """tqdm bar over this run's finished trials with the best value so far (stderr)."""

    def __init__(self, total: int, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="trial", disable=not enabled, dynamic_ncols=True)
        self.best: tuple[float, int] | None = None  # (value, number), batched engine only

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Optuna callback (one worker in this process): one more trial finished."""
        self.bar.update(1)
        self._best(study)

    def written(self, w: "Written") -> None:
        """The batched engine's writer stored one more trial."""
        self.bar.update(1)
        if w.state == TrialState.COMPLETE and w.value is not None and (self.best is None or w.value < self.best[0]):
            self.best = (w.value, w.number)
        if self.best is not None:
            self.bar.set_postfix_str(f"best val MSE {self.best[0]:.3g} (trial {self.best[1]})")

    def to(self, n: int, study: optuna.Study) -> None:
        """Move to n finished trials (the parent of several workers polls the storage)."""
        if n != self.bar.n:
            self.bar.update(n - self.bar.n)
            self._best(study)

    def _best(self, study: optuna.Study) -> None:
        try:
            self.bar.set_postfix_str(f"best val MSE {study.best_value:.3g} (trial {study.best_trial.number})")
        except ValueError:  # no complete trial yet
            pass

    def close(self) -> None:
        self.bar.close()


def run(cfg: StudyConfig, *, progress: bool = True, say: Callable[[str], None] = _stderr) -> Summary:
    # The bar and summary replace per-trial logs; a failing trial re-raises and the CLI prints one
    # line (SINSTUDY_DEBUG=1: traceback), so Optuna's own failure log with a traceback is noise.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    notes: list[str] = []
    device = resolve_device(cfg.device, say=notes.append) if cfg.devices is None else check_devices(cfg.devices)
    if device.type == "cuda":  # full float32 matmuls: the engines must agree with train.py
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    sampler = make_sampler(cfg)
    parsed = storage_mod.check(cfg.storage)  # read-only: nothing is written before all checks pass
    storage = workers.open_study_storage(cfg, parsed)
    check_study(cfg, storage)
    notes += storage_advice(parsed.kind, cfg.workers)
    for note in notes:  # only once every check has passed, so a refusal stays one line
        say(note)
    study = open_study(cfg, storage, sampler)
    Path(cfg.artifact_dir).mkdir(parents=True, exist_ok=True)
    for n in recovery.sweep_stale(study, grace_period=cfg.grace_period, max_retries=cfg.max_retries):
        say(f"trial #{n} of an earlier run had no heartbeat for {cfg.grace_period} s: marked FAIL and queued for retry")

    before = {t.number for t in study.get_trials(deepcopy=False)}
    bar = _Progress(cfg.n_trials, progress)
    start = time.perf_counter()
    signum = 0
    placements = workers.worker_devices(cfg, str(device))
    book = None
    try:
        if cfg.engine == "batched":
            signum, book = _run_batched(cfg, study, device, bar)
        elif len(placements) == 1 and not cfg.devices:
            signum, book = _run_here(cfg, storage, str(device), bar, start)
        else:
            pool = workers.Pool(cfg, study, placements, say=say, on_progress=lambda: bar.to(workers.finished_since(study, before), study))
            signum = pool.run()
    finally:
        bar.close()
    if not signum and cfg.engine != "batched":  # the batched engine's writer has done it
        from .dashboard import publish

        publish(study)
    summary = summarize(study, cfg, device=_where(placements), since=before, wall=time.perf_counter() - start, signum=signum)
    summary.bookkeeping_seconds = book
    return summary


def _run_batched(cfg: StudyConfig, study: optuna.Study, device: torch.device, bar: "_Progress") -> tuple[int, float]:
    """Returns (interrupting signal or 0, bookkeeping seconds)."""
    from .engine import DEFAULT_SLOTS, BatchedEngine

    slots = cfg.slots or DEFAULT_SLOTS[device.type]
    engine = BatchedEngine(cfg, study, device, slots=slots, on_trial=bar.written)
    if engine.best_value < math.inf:
        bar.best = (engine.best_value, study.best_trial.number)
    with interrupt.handle_signals():
        # its writer process also writes the study note (publish), off the training process
        signum = engine.run(workers.Budget(cfg.n_trials, cfg.timeout))
    return signum, engine.stats.book_seconds


def _run_here(cfg: StudyConfig, storage: optuna.storages.BaseStorage, device: str, bar: "_Progress", start: float) -> tuple[int, float | None]:
    """One worker in this process. Returns (interrupting signal or 0, bookkeeping seconds)."""
    budget = workers.Budget(cfg.n_trials, cfg.timeout)
    current = workers._CTX.Array("i", [-1])
    try:
        with interrupt.handle_signals():
            objective = workers.worker_loop(cfg, 0, budget, current, device=device, callbacks=[bar], storage=storage)
            # everything outside the objective (ask, tell, sampler) plus its reporting and pruning
            book = (time.perf_counter() - start) - objective.seconds_inside + objective.seconds_reporting
            return interrupt.requested(), book
    except interrupt.Interrupted as e:  # Optuna has already marked the running trial FAIL
        return e.signum, None
    except KeyboardInterrupt:
        return signal.SIGINT, None


def check_devices(devices: tuple[int, ...]) -> torch.device:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ConfigError("--devices needs CUDA GPUs, but none is visible; drop --devices or use --workers N")
    bad = [d for d in devices if d >= count]
    if bad:
        raise ConfigError(f"--devices {bad[0]} does not exist: {count} GPU(s) visible (ids 0..{count - 1})")
    return torch.device("cuda")


# Measured (README "Scaling out"): SQLite with a 60 s busy timeout held 4 and 8 workers with no
# "database is locked", but a journal file was faster per trial from 4 workers up.
def storage_advice(kind: str, n_workers: int) -> list[str]:
    if kind == "sqlite" and n_workers >= 4:
        return [f"note: {n_workers} workers on SQLite work, but --storage journal:///storage/sinstudy.log is faster (README: Scaling out)"]
    return []


def _where(placements: list[tuple[str, dict[str, str]]]) -> str:
    if len(placements) == 1:
        return placements[0][0]
    gpus = sorted({env["CUDA_VISIBLE_DEVICES"] for _, env in placements if env})
    return f"{len(placements)} workers on " + (f"GPUs {','.join(gpus)}" if gpus else placements[0][0])


def summarize(study: optuna.Study, cfg: StudyConfig, *, device: str, since: set[int], wall: float, signum: int = 0) -> Summary:
    trials = study.get_trials(deepcopy=False)
    best = None
    if any(t.state == TrialState.COMPLETE for t in trials):
        best = study.best_trial
    return Summary(
        study=study.study_name, storage=cfg.storage, device=device,
        this_run=Counts.of([t for t in trials if t.number not in since]), total=Counts.of(trials),
        wall_seconds=wall, log_dir=str(Path(cfg.log_dir) / study.study_name),
        artifact_dir=cfg.artifact_dir, best=best, signum=int(signum),
    )


def describe_trial(t: FrozenTrial) -> list[str]:
    """Lines that describe a finished trial: params, value, test MSE and the key attrs."""
    params = params_text(t.params)
    ua = t.user_attrs
    lines = [
        f"best trial     #{t.number}: {params}",
        f"val MSE        {t.value:.3e}  (best epoch {ua.get('best_epoch', '?')} of {ua.get('epochs', '?')})",
        f"test MSE       {ua.get('test_mse', float('nan')):.3e}  (report's best: 1.418e-03)",
        f"parameters     {ua.get('n_params', '?')}, trained in {ua.get('seconds', float('nan')):.1f} s on {ua.get('device', '?')}",
    ]
    if "model_artifact" in ua:
        lines.append(f"model artifact {ua['model_artifact']}")
    return lines


def format_summary(s: Summary) -> str:
    r, tot = s.this_run, s.total
    lines = [
        f"study          {s.study}  ({'interrupted by ' + signal.Signals(s.signum).name + ', ' if s.signum else ''}{s.wall_seconds:.1f} s on {s.device})",
        f"this run       {r.complete} complete, {r.pruned} pruned, {r.failed} failed",
        f"whole study    {tot.complete} complete, {tot.pruned} pruned, {tot.failed} failed",
    ]
    lines += describe_trial(s.best) if s.best else ["best trial     none complete yet"]
    lines += [
        f"storage        {s.storage}",
        f"tensorboard    tensorboard --logdir {s.log_dir}",
        f"dashboard      optuna-dashboard {dashboard_target(s.storage)} --artifact-dir {s.artifact_dir}",
    ]
    return "\n".join(lines)


def dashboard_target(url: str) -> str:
    """optuna-dashboard takes RDB URLs as they are and a journal file by its path."""
    return url[len("journal:///"):] if url.startswith("journal:///") else url
