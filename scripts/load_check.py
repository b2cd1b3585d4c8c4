"""A load simulation of many batched engines on one study: their storage writers, driven by
synthetic curves at a GPU's pace, with no training.

    python scripts/load_check.py --engines 4 --slots 1024 --seconds 60 --storage URL

Each engine is a process running the batched engine's writer (study.run.batched.writer's `_Sink`:
bulk starts with the duplicate checks, value flushes, finishes with their TensorBoard runs,
heartbeats from its thread, the sync, the stale-trial sweep), fed what a GPU engine hands it:
`--slots` running trials, each with an epoch every 1/`--epochs-per-s` s (default 2.5: an H200's
eager pace at 1,024 default-space models, docs/results.md), flushed once a second as the engine
flushes them, ending after 1/27, 1/9, 1/3 or all of `--epochs` (Hyperband's rungs, weighted so
that 83% are pruned, as in the H200 study) and replaced at once. The writer's loop runs in the
engine's process, so its calls are timed where they happen. At the end each engine ends its
running trials (their last values with them) and the storage is checked against what the
engines handed over.

The last line: `lag p95 X s, sync p95 Y s, lost Z`
  lag   how far a trial's stored curve is behind its engine: from when the engine has an epoch's
        value (trial start + epoch / pace) to the commit that stores it (a flush each second,
        so at least ~1 s)
  sync  seconds of one sync call (one every SYNC_S), p95 over all engines
  lost  trials the engines started that are not in storage as they ended them, plus values
        missing from stored curves
Before it: per-engine counts, the database's connections (peak, PostgreSQL's pg_stat_activity)
and the CPU the database server used (PostgreSQL on this machine: its processes' CPU seconds
over the wall time). Without --storage, a throw-away database on $SINSTUDY_TEST_PG's server
(default postgresql://postgres@127.0.0.1:5432/postgres) is created and dropped; with one, the
study `load-<random>` is created in it and deleted at the end.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_check import pg_database  # noqa: E402

FLUSH_S = 1.0  # as the engine (study.run.batched.engine.FLUSH_S)
# Hyperband's rungs as fractions of --epochs, weighted as the H200 study ended (83% pruned)
RUNGS = ((1 / 27, 0.50), (1 / 9, 0.22), (1 / 3, 0.11), (1.0, 0.17))


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", type=int, default=4)
    p.add_argument("--slots", type=int, default=1024, help="running trials per engine")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--storage", default=None, help="an RDB URL (default: a throw-away database)")
    p.add_argument("--epochs", type=int, default=200, help="a complete trial's epochs")
    p.add_argument("--epochs-per-s", type=float, default=2.5, help="each trial's pace")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--tensorboard",
        action="store_true",
        help="write each trial's TensorBoard run too (each engine's own disk and CPU on a real "
        "deployment; here every engine shares this machine's cores with the database)",
    )
    a = p.parse_args(argv)
    for name in ("engines", "slots", "epochs"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be at least 1 (got {getattr(a, name)})")
    for name in ("seconds", "epochs_per_s"):
        if not getattr(a, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be above 0 (got {getattr(a, name)})")
    if a.storage is not None and not a.storage.startswith(("postgresql", "sqlite")):
        p.error(f"--storage must be a PostgreSQL or SQLite URL (got {a.storage!r})")
    return a


# ------------------------------------------------------------------------- one engine


@dataclass
class _Trial:
    start: float  # monotonic time of its start: epoch e exists at start + e / pace
    length: int  # epochs until it ends
    base: float  # its curve's scale
    pruned: bool
    flushed: int = 0  # epochs handed to the writer


def _draw(dist, rng: random.Random):
    import optuna.distributions as d

    if isinstance(dist, d.CategoricalDistribution):
        return rng.choice(dist.choices)
    lo, hi = dist.low, dist.high
    x = math.exp(rng.uniform(math.log(lo), math.log(hi))) if dist.log else rng.uniform(lo, hi)
    if isinstance(dist, d.IntDistribution):
        return min(hi, max(lo, round(x)))
    return x


def _curve(t: _Trial, epoch: int) -> float:
    return t.base * math.exp(-epoch / 30) + t.base / 100


@dataclass
class _Report:
    engine: int
    lags: list[float] = field(default_factory=list)
    syncs: list[float] = field(default_factory=list)
    ended: dict[int, tuple[str, int]] = field(default_factory=dict)  # number -> (state, epochs)
    started: int = 0
    error: str | None = None


class _NoTensorBoard:
    """The writer's TrialLogger, writing nothing (without --tensorboard)."""

    def __init__(self, *args):
        pass

    def log_epoch(self, *args, **kwargs) -> None:
        pass

    def close(self, *args) -> None:
        pass


class _Box:
    """The writer's results queue, read in the same process."""

    def __init__(self):
        self.msgs: list = []

    def put(self, msg) -> None:
        self.msgs.append(msg)


def _engine(i: int, cfg, a: argparse.Namespace, go: float, out: mp.Queue) -> None:
    report = _Report(i)
    try:
        _simulate(i, cfg, a, go, report)
    except BaseException as e:  # a writer error ends the check with its line
        report.error = f"engine {i}: {type(e).__name__}: {e}"
    out.put(report)


def _simulate(i: int, cfg, a: argparse.Namespace, go: float, report: _Report) -> None:
    import optuna
    from optuna.trial import FrozenTrial, TrialState

    from study.run.batched import writer as writer_mod
    from study.run.batched.messages import Finish, Known, Start, Started
    from study.run.batched.writer import _Sink
    from study.run.budget import Claims
    from study.run.opening import open_study_store
    from study.trial.attrs import start_attrs
    from study.trial.space import suggest
    from study.trial.train import EpochLog

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if not a.tensorboard:
        writer_mod.TrialLogger = _NoTensorBoard
    rng = random.Random(a.seed * 1000 + i)
    box = _Box()
    sink = _Sink(cfg, open_study_store(cfg), Known(-1, {}), box, Claims(None))
    sink.warm_up.start()
    sink.warm_up.wait()  # TensorBoard's imports, before the clock starts
    timed_sync = sink.keeper.sync

    def sync() -> None:
        t0 = time.perf_counter()
        timed_sync()
        report.syncs.append(time.perf_counter() - t0)

    sink.keeper.sync = sync
    probe = optuna.create_study()
    t = probe.ask()
    suggest(t, cfg.space, cfg.train, seed=0)
    dists = t.distributions
    pace, live, numbers = a.epochs_per_s, {}, {}
    fracs, weights = zip(*RUNGS, strict=True)

    def fill(n: int) -> None:
        starts = []
        for _ in range(n):
            key = report.started
            report.started += 1
            params = {name: _draw(dist, rng) for name, dist in dists.items()}
            seed = i * 10_000_000 + key
            tcfg = suggest(optuna.trial.FixedTrial(params), cfg.space, cfg.train, seed=seed)
            frac = rng.choices(fracs, weights)[0]
            length = max(1, round(a.epochs * frac))
            live[key] = _Trial(time.monotonic(), length, rng.uniform(0.01, 1), frac < 1)
            starts.append(
                Start(
                    key,
                    FrozenTrial(
                        number=key,
                        state=TrialState.RUNNING,
                        value=None,
                        datetime_start=datetime.now(),
                        datetime_complete=None,
                        params=params,
                        distributions=dists,
                        user_attrs=start_attrs("batched", tcfg, params),
                        system_attrs={},
                        intermediate_values={},
                        trial_id=0,
                    ),
                    seed=seed,
                )
            )
        sink.start(starts)

    def ending(key: int, state, epochs: int) -> Finish:
        t = live.pop(key)
        curve = {e: _curve(t, e) for e in range(1, epochs + 1)}
        report.ended[key] = (state.name, epochs)
        return Finish(
            handle=key,
            state=state,
            value=min(curve.values()) if state == TrialState.COMPLETE else curve[epochs],
            values={e: v for e, v in curve.items() if e > t.flushed},
            attrs={},
            system_attrs={},
            completed=datetime.now(),
            epochs=[(EpochLog(e, v, v, 1e-3), time.time()) for e, v in curve.items()],
            metrics={"val_mse": min(curve.values())},
        )

    time.sleep(max(0.0, go - time.time()))
    end = time.monotonic() + a.seconds
    fill(a.slots)
    last_flush = time.monotonic()
    while (now := time.monotonic()) < end:
        done = [k for k, t in live.items() if (now - t.start) * pace >= t.length]
        if done:  # handed over together, as an engine does at the end of an epoch
            sink.finish_all(
                [
                    ending(
                        k,
                        TrialState.PRUNED if live[k].pruned else TrialState.COMPLETE,
                        live[k].length,
                    )
                    for k in done
                ]
            )
            fill(len(done))
        if now - last_flush >= FLUSH_S:
            last_flush = now
            values, first = {}, {}
            for k, t in live.items():
                reached = min(t.length, int((now - t.start) * pace))
                if reached > t.flushed:
                    values[k] = {e: _curve(t, e) for e in range(t.flushed + 1, reached + 1)}
                    first[k] = t.start + (t.flushed + 1) / pace
                    t.flushed = reached
            sink.values(values)
            committed = time.monotonic()
            report.lags += [committed - at for at in first.values()]
        sink.periodic()
        time.sleep(0.01)
    now = time.monotonic()
    # the run ends: its trials end with what they reached
    reached = {k: max(1, min(t.length, int((now - t.start) * pace))) for k, t in live.items()}
    sink.finish_all([ending(k, TrialState.PRUNED, e) for k, e in reached.items()])
    for msg in box.msgs:
        if isinstance(msg, Started):
            numbers[msg.handle] = msg.number
    report.ended = {numbers[k]: v for k, v in report.ended.items() if k in numbers}


# ------------------------------------------------------------------------- the check


def _postgres_cpu() -> float | None:
    """CPU seconds of this machine's PostgreSQL server processes (None: not local)."""
    total, found = 0, False
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if "(postgres)" not in stat:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of proc(5))
        found = True
    return total / os.sysconf("SC_CLK_TCK") if found else None


class _Connections(threading.Thread):
    """The peak of the database's connections, sampled every half second."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.peak, self.stop = url, None, threading.Event()

    def run(self) -> None:
        if not self.url.startswith("postgresql"):
            return
        import psycopg

        url = self.url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(url, autocommit=True) as con:
            while not self.stop.wait(0.5):
                n = con.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                ).fetchone()[0]
                self.peak = max(self.peak or 0, n - 1)  # not this one


def _p95(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=20)[-1] if len(xs) > 1 else (xs[0] if xs else math.nan)


def _lost(storage, name: str, reports: list[_Report]) -> int:
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=name, storage=storage)
    stored = {t.number: t for t in study.get_trials(deepcopy=False)}
    lost = 0
    for r in reports:
        for number, (state, epochs) in r.ended.items():
            t = stored.get(number)
            if t is None or t.state != TrialState[state]:
                lost += 1
            else:
                lost += epochs - len(t.intermediate_values)
    return lost


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    import optuna

    from study import config, store
    from study.run.opening import open_study

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    drop = None
    url = a.storage
    if url is None:
        url, drop = pg_database("load")
    name = f"load-{uuid.uuid4().hex[:8]}"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = config.build(
                None,
                storage=url,
                study=name,
                max_epochs=a.epochs,
                log_dir=f"{tmp}/tensorboard",
                artifact_dir=f"{tmp}/artifacts",
            )
            storage = store.load(url)
            open_study(cfg, storage)
            ctx = mp.get_context("spawn")
            out = ctx.Queue()
            go = time.time() + 5 + a.engines  # every engine imported and warmed up by then
            procs = [
                ctx.Process(target=_engine, args=(i, cfg, a, go, out)) for i in range(a.engines)
            ]
            for p in procs:
                p.start()
            time.sleep(max(0.0, go - time.time()))
            cpu0, t0 = _postgres_cpu(), time.monotonic()
            conns = _Connections(url)
            conns.start()
            reports = [out.get() for _ in procs]
            wall = time.monotonic() - t0
            cpu1 = _postgres_cpu()
            conns.stop.set()
            for p in procs:
                p.join()
            errors = [r.error for r in reports if r.error]
            if errors:
                print("\n".join(errors), file=sys.stderr)
                return 1
            lost = _lost(storage, name, reports)
            for r in sorted(reports, key=lambda r: r.engine):
                print(
                    f"engine {r.engine}: {r.started} trials started, {len(r.ended)} ended, "
                    f"{len(r.syncs)} syncs (median {statistics.median(r.syncs or [0]):.3f} s), "
                    f"lag median {statistics.median(r.lags or [0]):.2f} s"
                )
            db_cpu = (
                "n/a (not a local PostgreSQL)"
                if cpu0 is None or cpu1 is None
                else (f"{(cpu1 - cpu0) / wall:.2f} cores")
            )
            peak = "n/a" if conns.peak is None else str(conns.peak)
            print(f"database: {peak} connections at peak, CPU {db_cpu} over {wall:.0f} s")
            lags = [x for r in reports for x in r.lags]
            syncs = [x for r in reports for x in r.syncs]
            print(f"lag p95 {_p95(lags):.2f} s, sync p95 {_p95(syncs):.3f} s, lost {lost}")
            if a.storage is not None:
                optuna.delete_study(study_name=name, storage=storage)
            return 0 if lost == 0 else 1
    finally:
        if drop is not None:
            drop()


if __name__ == "__main__":
    sys.exit(main())
