"""A chaos harness for the shared study: random schedules of runs and faults, then invariants.

    python scripts/chaos.py --seed 1 --rounds 20
    python scripts/chaos.py --seed 7 --rounds 200 --storages sqlite,journal,postgresql

Each round picks a storage (SQLite, journal file, PostgreSQL from $SINSTUDY_TEST_PG, default
postgresql://postgres@127.0.0.1:5432/test) and a fresh study or the one an earlier round left on
it, then starts 1-3 runs of `sinstudy run` on it (both engines, `--workers 1|2`, the study's
`--repeats`), at the same instant or staggered, each in a session of its own as a terminal
starts a job. Some runs get a fault at a random moment: SIGINT or SIGTERM to the run's process
group or to its parent process, or SIGKILL to the group, the parent, a worker, a trainer or a
writer. A killed run is sometimes restarted at once with the same command. When every run has
ended, a recovery run on the study (as many trials as are queued or running, at least 1) stands
for "the
next run" where a fault was sent or a trial is left RUNNING or WAITING, and the invariants are
checked:

  count     a run that exited 0 finished exactly --n-trials trials (COMPLETE or PRUNED, by its
            `run` attr); a run interrupted or killed (or with a process killed) at most that many
  numbers   trial numbers are 0..n-1, each once
  twins     no parameter set trained twice (COMPLETE, PRUNED or RUNNING) except by a retry, no
            weight seed used twice (a trial's every repeat counted), and a retry trains with its
            trial's seed
  running   no RUNNING trial after a round whose runs all exited 0, nor after the recovery run
  waiting   no WAITING trial after a round whose runs all exited 0, nor after the recovery run
  artifact  the best trial's model artifact exists and loads
  curves    every stored curve's steps are 1..k without a gap
  exit      each run's exit status is the one its fault implies (0, 130, 143, or killed)
  traceback no "Traceback" on any run's stderr
  unreadable the study loads (a storage nothing can read ends the round; the next one starts
            on a fresh storage of that kind)

With --storage-faults (as root; otherwise it says which faults it skips) the storage fails too:
PostgreSQL rounds use a server the harness starts on a spare port and stops for a random span
(fast or immediate shutdown) before starting it again; SQLite rounds keep their file on a small
tmpfs that fills for a random span; and any round may stop a writer (SIGSTOP) past the grace
period before it goes on. Every run waits such outages out (storage_outage), so a storage fault
changes no run's expected exit status, except that an interrupt while a run waits ends it with
exit 1. Two more invariants:

  after end a finished trial gains no intermediate value (the harness reads the study while
            the runs go on and keeps each finished trial's count)
  retry     every FAIL trial has its retry queued or run while retries remain (those an
            interrupt ended, or that gave way to another engine's parameter set, excepted)

Each violation is printed as it is found (CHAOS_DEBUG=1: with the runs' last stderr lines and
the trials involved), then a table at the end and, last, `N violations`; the exit status is 1
when N > 0. The
suite runs a small fixed-seed schedule (tests/test_chaos.py); long runs are in docs/results.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import TrialState

from study import store as store_mod
from study.store.outage import LONGEST_PAUSE_S
from study.trial.space import param_set
from study.views.artifacts import load_model

PG_URL = os.environ.get("SINSTUDY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
STUDY = "chaos"
TOML = """
[data]
n_train = 128
n_val = 64
n_test = 256

[train]
batch_size = 32

[search_space]
depth = [1, 2]
width = [4, 16]
lr = [1e-3, 3e-2]
activation = ["tanh", "relu", "identity"]

[study]
heartbeat_interval = 1
grace_period = 4
storage_outage = 60
"""
FAULTS = [
    ("SIGINT", "group"),
    ("SIGINT", "parent"),
    ("SIGTERM", "group"),
    ("SIGTERM", "parent"),
    ("SIGKILL", "group"),
    ("SIGKILL", "parent"),
    ("SIGKILL", "worker"),
    ("SIGKILL", "trainer"),
    ("SIGKILL", "writer"),
]
RUN_TIMEOUT_S = 240
SCAN_S = 0.25  # how often a run's process tree is read (its processes live for seconds)


@dataclass
class Run:
    args: list[str]
    n_trials: int
    fault: tuple[str, str] | None = None
    fault_at: float = 0.0
    delay: float = 0.0
    proc: subprocess.Popen | None = None
    started: float = 0.0
    sent: str | None = None  # what was actually done ("SIGKILL writer 1234"), None if nothing
    out: str = ""
    err: str = ""
    run_prefix: str = ""  # the `run` attr of its trials starts with this
    pids: set[int] = field(default_factory=set)  # every process of the run seen so far
    stopped: bool = False  # a storage fault landed while it ran: an interrupt may end it 1

    @property
    def label(self) -> str:
        fault = f" {self.sent}" if self.sent else ""
        return f"{' '.join(self.args[1:])}{fault}"


@dataclass
class Store:
    kind: str
    url: str
    folder: Path
    repeats: int
    database: str | None = None
    admin: str = ""  # the server's maintenance database (PostgreSQL)

    @property
    def artifacts(self) -> Path:
        return self.folder / "artifacts"


class Faults:
    """The storage faults of --storage-faults: a PostgreSQL server of the harness's own on a
    spare port, a tmpfs for SQLite files, and what was skipped (not root, no PostgreSQL)."""

    def __init__(self, root: Path):
        self.skipped: list[str] = []
        self.pg: OwnServer | None = None
        self.disk: Path | None = None
        if os.geteuid() != 0:
            self.skipped = ["server outages (needs root)", "full disks (needs root)"]
            return
        try:
            self.pg = OwnServer()
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            self.skipped.append(f"server outages ({e})")
        disk = root / "disk"
        disk.mkdir()
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(disk)], capture_output=True
        )
        if mounted.returncode == 0:
            self.disk = disk
        else:
            self.skipped.append(f"full disks ({mounted.stderr.decode().strip()})")

    def close(self) -> None:
        if self.pg is not None:
            self.pg.remove()
        if self.disk is not None:
            subprocess.run(["umount", "-l", str(self.disk)], check=False)


def _as_postgres(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["runuser", "-u", "postgres", "--", *cmd], capture_output=True, text=True
    )


def _pg_bin(name: str) -> str:
    import glob

    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name)]
    if not found[-1]:
        raise RuntimeError(f"no {name}")
    return found[-1]


class OwnServer:
    """A PostgreSQL server on a spare port that the harness (and tests/test_storage_faults.py)
    may stop and start; `url`: its `postgres` database."""

    def __init__(self):
        self.data = tempfile.mkdtemp(prefix="sinstudy-chaos-pg-")
        shutil.chown(self.data, "postgres", "postgres")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        made = _as_postgres(_pg_bin("initdb"), "-D", self.data, "-A", "trust", "-U", "postgres")
        if made.returncode != 0:
            raise RuntimeError(made.stderr.strip()[-200:])
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.lock = threading.Lock()
        self.start()

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off"
        with self.lock:
            started = _as_postgres(
                _pg_bin("pg_ctl"), "-D", self.data, "-o", opts, "-w", "-l",
                f"{self.data}/log", "start",
            )  # fmt: skip
        if started.returncode != 0:
            raise RuntimeError(f"pg_ctl start: {started.stderr.strip()[-200:]}")

    def stop(self, mode: str = "fast") -> None:
        with self.lock:
            _as_postgres(_pg_bin("pg_ctl"), "-D", self.data, "-m", mode, "-w", "stop")

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.data, ignore_errors=True)


@dataclass
class Tally:
    rounds: int = 0
    runs: int = 0
    signals: Counter = field(default_factory=Counter)
    trials: int = 0
    violations: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)


# ---------------------------------------------------------------- processes


def _spawned(parents: set[int]) -> dict[int, list[int]]:
    """One pass over /proc: the processes each of `parents` started with multiprocessing's
    spawn (workers, writers). Only their children's command lines are read: the harness polls
    this many times a second, beside the runs it measures."""
    out: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            if ppid not in parents:
                continue
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmd = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if b"spawn_main" in cmd:
            out.setdefault(ppid, []).append(int(entry.name))
    return out


def _children(pid: int) -> list[int]:
    return _spawned({pid}).get(pid, [])


def _descendants(pid: int) -> set[int]:
    out, level = set(), {pid}
    while level:  # one pass per generation: parent, workers, their writers
        level = {k for kids in _spawned(level).values() for k in kids} - out
        out |= level
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _target(run: Run, role: str) -> int | None:
    """The pid of `role` in the run's process tree, None when the run has no such process now."""
    parent = run.proc.pid
    kids = _children(parent)
    workers = "--workers" in run.args and run.args[run.args.index("--workers") + 1] != "1"
    batched = "standard" not in run.args
    if role == "parent":
        return parent
    if role == "worker":
        return random.choice(kids) if workers and kids else None
    trainers = kids if workers else [parent]
    if role == "trainer":
        return random.choice(trainers) if trainers else None
    if role == "writer" and batched:
        writers = [w for t in trainers for w in _children(t)]
        return random.choice(writers) if writers else None
    return None


def _inject(run: Run) -> None:
    signame, role = run.fault
    sig = getattr(signal, signame)
    if role == "group":
        try:
            os.killpg(run.proc.pid, sig)
            run.sent = f"{signame} group"
        except ProcessLookupError:
            pass
        return
    pid = _target(run, role)
    if pid is None:
        return
    try:
        os.kill(pid, sig)
        run.sent = f"{signame} {role}"
    except ProcessLookupError:
        pass


def _start(run: Run, cwd: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("SINSTUDY_RUN", None)
    env.pop("SINSTUDY_DEBUG", None)
    run.proc = subprocess.Popen(
        [sys.executable, "-m", "study", *run.args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal starts a job
    )
    run.started = time.monotonic()
    run.run_prefix = f"{socket.gethostname()}:{run.proc.pid}:"


@dataclass
class StorageFault:
    """One storage fault of a round: `what` (outage, full, stop-writer) `at` s after the
    round's start, for `span` s."""

    what: str
    at: float
    span: float
    mode: str = "fast"  # a server's shutdown
    sent: str | None = None
    thread: threading.Thread | None = None

    def start(self, store: Store, faults: Faults, runs: list[Run]) -> None:
        self.thread = threading.Thread(target=self._run, args=(store, faults, runs), daemon=True)
        self.thread.start()

    def _run(self, store: Store, faults: Faults, runs: list[Run]) -> None:
        live = [r for r in runs if r.proc is not None and r.proc.poll() is None]
        done_before = {id(r) for r in runs if r.proc is not None and r.proc.poll() is not None}
        if self.what == "outage" and faults.pg is not None:
            faults.pg.stop(self.mode)
            self.sent = f"outage {self.mode} {self.span:.1f}s"
            time.sleep(self.span)
            faults.pg.start()
        elif self.what == "full" and faults.disk is not None:
            filler = faults.disk / "filler"
            try:
                free = shutil.disk_usage(faults.disk).free
                with open(filler, "wb") as f:
                    f.truncate(0)
                    f.write(b"\0" * max(0, free - 8192))
                self.sent = f"full {self.span:.1f}s"
                time.sleep(self.span)
            except OSError:
                self.sent = f"full {self.span:.1f}s"
            finally:
                filler.unlink(missing_ok=True)
        elif self.what == "stop-writer":
            pids = [w for r in live if (w := _target(r, "writer")) is not None and _alive(w)]
            if not pids:
                return
            pid = random.choice(pids)
            try:
                os.kill(pid, signal.SIGSTOP)
                self.sent = f"SIGSTOP writer {self.span:.1f}s"
                time.sleep(self.span)
            except ProcessLookupError:
                return
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        if not self.sent:
            return
        # Every run that met the fault: live when it began, or started while it lasted, or
        # in the pause after it (a run notices the storage back within LONGEST_PAUSE_S).
        # One interrupted meanwhile ends with exit 1 (it gave up waiting).
        time.sleep(LONGEST_PAUSE_S + 1)
        for r in runs:
            if r.proc is not None and id(r) not in done_before:
                r.stopped = True

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()


class Watch:
    """Reads the study while the runs go on: each finished trial's count of intermediate values
    when first seen finished (the `after end` invariant compares the end's count with it)."""

    def __init__(self, store: Store):
        self.store, self.counts = store, {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        storage = None
        parsed = store_mod.parse(self.store.url)
        while not self.done.wait(0.5):
            if parsed.missing_file() is not None:  # the runs create it (and its schema)
                continue
            try:  # read-only: a fresh PostgreSQL database gets its schema from the runs too
                storage = storage or store_mod.open_store(parsed, read_only=True).optuna
                study = optuna.load_study(study_name=STUDY, storage=storage)
                for t in study.get_trials(deepcopy=False):
                    if t.state.is_finished() and t.number not in self.counts:
                        self.counts[t.number] = len(t.intermediate_values)
            except Exception:  # not created yet, or the storage is out: look again
                storage = None

    def stop(self) -> dict[int, int]:
        self.done.set()
        self.thread.join()
        return self.counts


def _drive(
    runs: list[Run],
    cwd: Path,
    faults: list[StorageFault] = (),
    store: Store | None = None,
    setup: Faults | None = None,
) -> None:
    """Start each run after its delay, send each fault at its moment, wait for all."""
    t0 = time.monotonic()
    pending = sorted(runs, key=lambda r: r.delay)
    waiting = sorted(faults, key=lambda f: f.at)
    scanned = 0.0
    while pending or any(r.proc and r.proc.poll() is None for r in runs):
        now = time.monotonic() - t0
        while pending and pending[0].delay <= now:
            _start(pending.pop(0), cwd)
        while waiting and waiting[0].at <= now:
            waiting.pop(0).start(store, setup, runs)
        scan, scanned = (True, now) if now - scanned >= SCAN_S else (False, scanned)
        for r in runs:
            live = r.proc is not None and r.proc.poll() is None
            if live and scan:
                r.pids.update(_descendants(r.proc.pid))
            if live and r.fault and not r.sent and time.monotonic() - r.started >= r.fault_at:
                _inject(r)
                if not r.sent:  # no such process (yet): try again a little later
                    r.fault_at += 0.5
                    if r.fault_at > 30:
                        r.fault = None
            if live and time.monotonic() - r.started > RUN_TIMEOUT_S:
                os.killpg(r.proc.pid, signal.SIGKILL)
                r.err += f"\nchaos: killed after {RUN_TIMEOUT_S} s (hung)"
        time.sleep(0.05)
    for f in faults:
        f.wait()
    for r in runs:
        out, err = r.proc.communicate()
        r.out, r.err = out, err + r.err
    # A killed parent's workers and writers finish their clean-up by themselves: "every run has
    # ended" means every process of it.
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and any(_alive(p) for r in runs for p in r.pids):
        time.sleep(0.1)


# ---------------------------------------------------------------- schedule


def _store(kind: str, root: Path, rng: random.Random, faults: Faults | None = None) -> Store:
    tag = uuid.uuid4().hex[:6]
    folder = root / f"{kind}-{tag}"
    folder.mkdir()
    # the views' folders stay off a disk that fills: a full disk under the storage is the fault
    views = f'log_dir = "{folder}/tensorboard"\nartifact_dir = "{folder}/artifacts"\n'
    (folder / "chaos.toml").write_text(TOML + views)
    repeats = rng.choice([1, 1, 2])
    if kind == "sqlite":
        disk = faults.disk if faults is not None and faults.disk is not None else folder
        return Store(kind, f"sqlite:///{disk}/s-{tag}.db", folder, repeats)
    if kind == "journal":
        return Store(kind, f"journal:///{folder}/s.log", folder, repeats)
    import psycopg

    admin_url = faults.pg.url if faults is not None and faults.pg is not None else PG_URL
    name = f"sinstudy_chaos_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = admin_url.rsplit("/", 1)[0] + "/" + name
    return Store(kind, url, folder, repeats, name, admin_url)


def _drop(store: Store) -> None:
    shutil.rmtree(store.folder, ignore_errors=True)
    if store.kind == "sqlite":
        Path(store.url.removeprefix("sqlite:///")).unlink(missing_ok=True)
    if store.database:
        import psycopg

        with psycopg.connect(store.admin, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{store.database}" WITH (FORCE)')


def _storage_faults(store: Store, rng: random.Random, faults: Faults | None) -> list[StorageFault]:
    """Half the rounds get one: the storage's own (a server outage, a full disk) or a writer
    stopped past the grace period (4 s)."""
    if faults is None or rng.random() < 0.5:
        return []
    own = {"postgresql": "outage", "sqlite": "full"}.get(store.kind)
    if own == "outage" and faults.pg is None or own == "full" and faults.disk is None:
        own = None
    what = rng.choice([w for w in (own, own, "stop-writer") if w])
    if what == "stop-writer":
        return [StorageFault(what, rng.uniform(1.0, 8.0), rng.uniform(5.0, 9.0))]
    mode = rng.choice(["fast", "immediate"])
    return [StorageFault(what, rng.uniform(1.0, 8.0), rng.uniform(0.5, 10.0), mode)]


def _args(store: Store, rng: random.Random, n_trials: int, epochs: int, extra=()) -> list[str]:
    args = ["run", "--config", "chaos.toml", "--study", STUDY, "--storage", store.url]
    args += ["--no-progress", "--n-trials", str(n_trials), "--max-epochs", str(epochs)]
    args += ["--repeats", str(store.repeats), "--slots", str(rng.choice([4, 8, 32]))]
    args += ["--seed", str(rng.choice([0, 0, 1]))]  # the same command, mostly
    return args + list(extra)


def _plan(store: Store, rng: random.Random) -> list[Run]:
    runs = []
    together = rng.random() < 0.5  # the same instant, or staggered
    for _ in range(rng.choice([1, 2, 2, 3])):
        engine = rng.choice(["batched", "batched", "batched", "standard"])
        workers = rng.choice([1, 1, 2])
        n = rng.randint(2, 6)
        epochs = rng.choice([8, 16, 40, 400])  # 400: long trials for faults to land in
        extra = ["--engine", engine, "--workers", str(workers)]
        run = Run(_args(store, rng, n, epochs, extra), n)
        run.delay = 0.0 if together else rng.uniform(0, 4)
        if rng.random() < 0.5:
            run.fault = rng.choice(FAULTS)
            run.fault_at = rng.uniform(1.0, 8.0)
        runs.append(run)
        if run.fault and rng.random() < 0.5:  # the same command again, once it has ended
            again = Run(list(run.args), n, delay=run.delay + run.fault_at + rng.uniform(0, 3))
            runs.append(again)
    return runs


# ---------------------------------------------------------------- invariants


def _describe(t) -> str:
    """One trial, as a violation's report shows it (CHAOS_DEBUG=1)."""
    ua = t.user_attrs
    return (
        f"#{t.number} {t.state.name} run={ua.get('run')} worker={ua.get('worker')} "
        f"engine={ua.get('engine')} seed={ua.get('seed')} "
        f"retry_of={t.system_attrs.get('failed_trial')}"
    )


def _expected_exit(run: Run) -> set[int]:
    if not run.sent:
        return {0}
    signame, role = run.sent.split()[:2]
    if signame == "SIGKILL":
        if role in ("group", "parent"):
            # 0: the run ended between the harness's last look and the kill (a kill of a
            # process that has exited but is not yet reaped succeeds); a SIGKILL never exits 0
            return {-9, 0}
        # a worker, trainer or writer of the run: the run recovers and goes on (or, alone
        # without workers, a writer's death ends the run with one line)
        return {0, 1} if role == "writer" else {0, -9}
    # 0: it may land after the last trial, as the run ends; never death by the signal itself;
    # 1: it landed while the run waited out a storage fault, which it then gives up
    return ({130, 0} if signame == "SIGINT" else {143, 0}) | ({1} if run.stopped else set())


def _check(
    store: Store, runs: list[Run], tally: Tally, *, final: bool, seen: dict[int, int] | None = None
) -> None:
    def bad(kind: str, what: str) -> None:
        tally.violations[kind] += 1
        tally.examples.setdefault(kind, f"{store.kind} {store.folder.name}: {what}")
        print(f"  violation {kind}: {what}", flush=True)

    study = optuna.load_study(study_name=STUDY, storage=store_mod.load(store.url))
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    for r in runs:
        if r.proc is None:
            continue
        if "Traceback" in r.err:
            bad("traceback", f"{r.label}: {r.err.strip().splitlines()[-1]}")
        if r.proc.returncode not in _expected_exit(r):
            last = (r.err.strip().splitlines() or [""])[-1]
            bad("exit", f"{r.label}: exit {r.proc.returncode}: {last}")
        mine = [t for t in finished if str(t.user_attrs.get("run", "")).startswith(r.run_prefix)]
        clean = r.proc.returncode == 0 and not r.sent
        if (clean and len(mine) != r.n_trials) or len(mine) > r.n_trials:
            bad("count", f"{r.label}: {len(mine)} finished for --n-trials {r.n_trials}")
            if os.environ.get("CHAOS_DEBUG"):
                print(f"    its stderr: {r.err.strip().splitlines()[-8:]}", flush=True)
                print(f"    its stdout: {r.out.strip().splitlines()[:4]}", flush=True)
                for t in trials:
                    print(f"    {_describe(t)}", flush=True)
    numbers = sorted(t.number for t in trials)
    if numbers != list(range(len(trials))):
        bad("numbers", f"numbers {numbers}")
    live = [
        t
        for t in trials
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    ]
    firsts = [t for t in live if "failed_trial" not in t.system_attrs]
    sets = Counter(param_set(t.params, t.distributions) for t in firsts)
    if sets and max(sets.values()) > 1:
        twice = {p for p, n in sets.items() if n > 1}
        who = [
            (t.number, t.state.name, t.user_attrs.get("engine"))
            for t in firsts
            if param_set(t.params, t.distributions) in twice
        ]
        bad("twins", f"parameter sets trained twice: {who[:6]}")

    # every seed a trial trains with: its first and the repeats after it (runs of one study
    # may differ in --seed by less than --repeats). None: a standard trial that gave way to
    # another's parameter set (it trained nothing).
    def seeds_of(t) -> range:
        first = t.user_attrs.get("seed")
        return range(first, first + store.repeats) if isinstance(first, int) else range(0)

    seeds = Counter(s for t in trials if "failed_trial" not in t.system_attrs for s in seeds_of(t))
    if seeds and max(seeds.values()) > 1:
        twice = {s for s, n in seeds.items() if n > 1}
        who = [
            (t.number, t.state.name, t.user_attrs.get("engine"), t.user_attrs.get("seed"))
            for t in trials
            if twice.intersection(seeds_of(t))
        ]
        bad("twins", f"seeds used twice: {who[:6]}")
    by_number = {t.number: t for t in trials}
    for t in trials:
        first = by_number.get(t.system_attrs.get("failed_trial", -1))
        if first is None or "seed" not in t.user_attrs or "seed" not in first.user_attrs:
            continue
        if t.user_attrs["seed"] != first.user_attrs["seed"]:
            bad(
                "twins",
                f"retry #{t.number} seed {t.user_attrs['seed']}, its trial #{first.number} "
                f"seed {first.user_attrs['seed']}",
            )
    all_clean = all(r.proc.returncode == 0 and not r.sent for r in runs if r.proc)
    if (final or all_clean) and any(t.state == TrialState.RUNNING for t in trials):
        bad("running", f"RUNNING: {[t.number for t in trials if t.state == TrialState.RUNNING]}")
    if (final or all_clean) and any(t.state == TrialState.WAITING for t in trials):
        by_number = {t.number: t for t in trials}
        what = [
            (t.number, "retry of", t.system_attrs.get("failed_trial"))
            for t in trials
            if t.state == TrialState.WAITING
        ]
        runs_ = [(r.label[-60:], r.proc.returncode) for r in runs if r.proc]
        if os.environ.get("CHAOS_DEBUG"):
            for n in {w[2] for w in what if w[2] is not None}:
                f = by_number[n]
                print("   ", n, f.state.name, f.user_attrs.get("run"), f.user_attrs.get("worker"))
            print("   ", runs_)
            for r in runs:
                print("    --", r.label[-50:], r.proc.pid if r.proc else None)
                print("      " + "\n      ".join(r.err.strip().splitlines()[-8:]))
        bad("waiting", f"WAITING: {what}{' (final)' if final else ''}")
    for t in trials:
        steps = sorted(t.intermediate_values)
        if steps and steps != list(range(1, len(steps) + 1)):
            bad("curves", f"trial #{t.number} steps {steps[:3]}..{steps[-3:]} ({len(steps)})")
    numbered = {t.number: t for t in trials}
    for n, count in (seen or {}).items():
        if n in numbered and len(numbered[n].intermediate_values) > count:
            t, now = numbered[n], len(numbered[n].intermediate_values)
            bad("after end", f"trial #{n} {t.state.name}: {count} values, then {now}")
    if final:
        _check_retries(trials, runs, bad)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if final and complete:
        best = min(complete, key=lambda t: t.value)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                load_model(best, store.artifacts, tmp)
        except Exception as e:
            bad("artifact", f"best trial #{best.number}: {type(e).__name__}: {e}")
    if final:
        tally.trials += len(trials)


MAX_RETRIES = 1  # the chaos TOML's (the default)


def _check_retries(trials, runs: list[Run], bad) -> None:
    """Every FAIL trial of this round's runs has its retry while retries remain (an earlier
    round's were checked with that round's faults): those an interrupt ended (a batched trial's
    failed_reason, or any trial of a run that was sent SIGINT or SIGTERM) and those that gave
    way to another engine's parameter set are not retried."""
    interrupted = [r.run_prefix for r in runs if r.sent and r.sent.split()[0] != "SIGKILL"]
    ours = [r.run_prefix for r in runs if r.proc is not None]
    retried = {
        t.system_attrs["retry_history"][-1] for t in trials if t.system_attrs.get("retry_history")
    }
    for t in trials:
        if t.state != TrialState.FAIL or t.number in retried:
            continue
        if not any(str(t.user_attrs.get("run", "")).startswith(p) for p in ours):
            continue
        if len(t.system_attrs.get("retry_history", [])) >= MAX_RETRIES:
            continue
        reason = str(t.user_attrs.get("failed_reason", ""))
        if reason == "interrupted" or "same parameter set" in reason:
            continue
        if any(str(t.user_attrs.get("run", "")).startswith(p) for p in interrupted):
            continue
        bad("retry", f"trial #{t.number} FAIL ({_describe(t)}) without its retry")


def _round(
    i: int,
    rng: random.Random,
    stores: dict,
    root: Path,
    tally: Tally,
    kinds,
    faults: Faults | None = None,
) -> None:
    kind = kinds[i % len(kinds)]
    if kind not in stores or rng.random() < 0.4:  # a fresh study (the old storage goes)
        if kind in stores:
            _drop(stores[kind])
        stores[kind] = _store(kind, root, rng, faults)
    store = stores[kind]
    runs = _plan(store, rng)
    storage_faults = _storage_faults(store, rng, faults)
    watch = Watch(store)
    try:
        _drive(runs, store.folder, storage_faults, store, faults)
    finally:
        seen = watch.stop()
    tally.runs += len(runs)
    tally.signals.update(r.sent.split()[0] for r in runs if r.sent)
    tally.signals.update(f.sent.split()[0] for f in storage_faults if f.sent)
    try:
        _after(store, runs, rng, tally, seen)
    except Exception as e:  # a study nothing can read is a violation; the next round starts anew
        what = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        tally.violations["unreadable"] += 1
        tally.examples.setdefault("unreadable", f"{store.kind} {store.folder.name}: {what}")
        print(f"  violation unreadable: {what}", flush=True)
        _drop(store)
        del stores[kind]


def _after(
    store: Store, runs: list[Run], rng: random.Random, tally: Tally, seen: dict[int, int]
) -> None:
    """Check the round's study; where anything is left to recover, run the next run first."""
    try:
        study = optuna.load_study(study_name=STUDY, storage=store_mod.load(store.url))
    except KeyError:  # every run was killed before it created the study
        return
    _check(store, runs, tally, final=False, seen=seen)
    open_ = study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))
    if not open_ and all(r.proc.returncode == 0 and not r.sent for r in runs if r.proc):
        _check(store, runs, tally, final=True)  # nothing for a next run to recover
        return
    # as many trials as it may have to take: the queued ones, and the retries of the RUNNING
    # ones whose processes are gone, which its start queues
    n = max(1, len(open_))
    recovery = Run(_args(store, rng, n, 8, ["--workers", "1"]), n)
    _drive([recovery], store.folder)
    tally.runs += 1
    _check(store, runs + [recovery], tally, final=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--storages", default="sqlite,journal,postgresql")
    p.add_argument("--keep", action="store_true", help="keep the temporary storages")
    p.add_argument(
        "--storage-faults",
        action="store_true",
        help="fault the storage too: server outages, full disks, a writer stopped (as root)",
    )
    a = p.parse_args(argv)
    kinds = a.storages.split(",")
    bad = set(kinds) - {"sqlite", "journal", "postgresql"}
    if bad:
        p.error(f"unknown storage {sorted(bad)[0]!r}; use sqlite, journal, postgresql")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    rng = random.Random(a.seed)
    random.seed(a.seed)  # which worker or writer a fault picks
    root = Path(tempfile.mkdtemp(prefix="sinstudy-chaos-"))
    stores: dict[str, Store] = {}
    tally = Tally()
    faults = Faults(root) if a.storage_faults else None
    for what in faults.skipped if faults else []:
        print(f"chaos: skipped: {what}", flush=True)
    t0 = time.monotonic()
    try:
        for i in range(a.rounds):
            before = sum(tally.violations.values())
            _round(i, rng, stores, root, tally, kinds, faults)
            tally.rounds += 1
            new = sum(tally.violations.values()) - before
            print(
                f"round {i + 1}/{a.rounds} ({kinds[i % len(kinds)]}): "
                f"{'ok' if not new else f'{new} violations'} "
                f"[{time.monotonic() - t0:.0f} s]",
                flush=True,
            )
    finally:
        if not a.keep:
            for store in stores.values():
                _drop(store)
        if faults is not None:
            faults.close()
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
    total = sum(tally.violations.values())
    print()
    print(f"seed {a.seed}: {tally.rounds} rounds, {tally.runs} runs, {tally.trials} trials")
    print(f"faults sent: {dict(tally.signals) or 'none'}")
    print("| violation | count | first seen |")
    print("| --- | --- | --- |")
    kinds_ = ("count", "numbers", "twins", "running", "waiting", "artifact", "curves")
    for kind in (*kinds_, "after end", "retry"):
        print(f"| {kind} | {tally.violations[kind]} | {tally.examples.get(kind, '')} |")
    for kind in ("exit", "traceback"):
        print(f"| {kind} | {tally.violations[kind]} | {tally.examples.get(kind, '')} |")
    print(f"{total} violations")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
