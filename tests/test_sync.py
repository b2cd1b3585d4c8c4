"""The writer's sync (study.run.batched.sync): what the mirror learns of other engines' trials.

The sync reads new trials and changes of state without the running trials' curves; Optuna's
incremental read, which it replaced, returned every running trial with all its values on every
call. The mirror's sampler and pruner must decide as they did with the old read."""

from __future__ import annotations

import math
import random
import zlib
from datetime import datetime

import optuna
import pytest
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState

from study import config, store
from study.run.batched.mirror import Mirror
from study.run.batched.sync import USER_ATTRS, Changes
from study.trial.space import suggest

EPOCHS = 27  # Hyperband's rungs at 1, 3, 9, 27


class OptunasRead(Changes):
    """The sync before: Optuna's incremental read, every unfinished trial with all its values."""

    def _fetch(self, store, study_id, own):
        return store.optuna._get_trials(study_id, None, set(self.unfinished), self.max_id)


def _cfg(pruner: str, url: str) -> config.StudyConfig:
    return config.build(
        None, storage=url, study="sync", pruner=pruner, max_epochs=EPOCHS, sampler="tpe"
    )


def _curve(base: float, steps: range) -> dict[int, float]:
    return {s: base * math.exp(-s / 9) + base / 10 for s in steps}


class Others:
    """Other engines on the stored study, driven by a seeded schedule: they start trials, store
    their curves a few epochs at a time, and end them (complete, pruned, failed, with the rungs'
    system attrs a batched engine stores at the end), and queue a trial now and then."""

    def __init__(self, cfg: config.StudyConfig, storage, study_id: int, seed: int):
        self.cfg, self.storage, self.study_id = cfg, storage, study_id
        self.rng = random.Random(seed)
        self.proposer = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        self.running: dict[int, tuple[float, int]] = {}  # trial_id -> (base, epochs stored)

    def step(self) -> None:
        rng = self.rng
        new = []
        for _ in range(rng.randint(0, 3)):
            t = self.proposer.ask()
            suggest(t, self.cfg.space, self.cfg.train, seed=0)
            new.append(
                FrozenTrial(
                    number=0,
                    trial_id=0,
                    state=TrialState.RUNNING,
                    value=None,
                    datetime_start=datetime.now(),
                    datetime_complete=None,
                    params=t.params,
                    distributions=t.distributions,
                    user_attrs={"seed": rng.randrange(1 << 30), "worker": "other"},
                    system_attrs={},
                    intermediate_values={},
                )
            )
        for tid, _ in store.of(self.storage).add_trials(self.study_id, new, heartbeat=True):
            self.running[tid] = (rng.uniform(0.01, 1.0), 0)
        values = {}
        for tid, (base, done) in list(self.running.items()):
            more = rng.randint(1, 4)
            values[tid] = _curve(base, range(done + 1, min(EPOCHS, done + more) + 1))
            self.running[tid] = (base, min(EPOCHS, done + more))
        store.of(self.storage).append_values(values)
        for tid, (base, done) in list(self.running.items()):
            if done < EPOCHS and rng.random() > 0.25:
                continue
            state = (
                TrialState.COMPLETE
                if done == EPOCHS
                else rng.choice([TrialState.PRUNED, TrialState.FAIL])
            )
            curve = _curve(base, range(1, done + 1))
            rungs = {
                f"completed_rung_{i}": curve[r]
                for i, r in enumerate((1, 3, 9, 27))
                if r <= done and state != TrialState.FAIL
            }
            store.of(self.storage).finish_trial(
                tid,
                state=state,
                value=None if state == TrialState.FAIL else curve[done],
                values={},
                user_attrs={},
                system_attrs=rungs,
                completed=datetime.now(),
            )
            del self.running[tid]
        if rng.random() < 0.1:
            params = self.proposer.ask()
            suggest(params, self.cfg.space, self.cfg.train, seed=0)
            optuna.load_study(study_name="sync", storage=self.storage).enqueue_trial(params.params)


def _decide(mirror: Mirror) -> list:
    """One trial of this engine: what the sampler proposes and where the pruner stops it."""
    trial, queued = mirror.ask()
    out: list = [sorted(trial.params.items()), queued is not None]
    base = 0.01 + zlib.crc32(repr(out[0]).encode()) % 1000 / 1000
    for step, v in _curve(base, range(1, EPOCHS + 1)).items():
        trial.report(v, step)
        if trial.should_prune():
            out.append(("pruned", step))
            mirror.tell(trial, None, TrialState.PRUNED)
            return out
    mirror.tell(trial, v, TrialState.COMPLETE)
    return out


def _url(backend: str, tmp_path, request, name: str = "s") -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path}/{name}.db"
    return request.getfixturevalue("pg_url")


@pytest.mark.parametrize(
    "pruner,backend", [("hyperband", "sqlite"), ("median", "sqlite"), ("hyperband", "postgresql")]
)
def test_the_light_sync_makes_the_decisions_optunas_incremental_read_made(
    tmp_path, request, pruner, backend
):
    url = _url(backend, tmp_path, request)
    cfg = _cfg(pruner, url)
    storage = store.open_store(store.parse(url)).optuna
    study_id = optuna.create_study(study_name="sync", storage=storage)._study_id
    others = Others(cfg, storage, study_id, seed=5)
    engines = {
        name: (Mirror(cfg, [], seed=3), read(-1, {}) if read else None)
        for name, read in (("light", Changes), ("optuna", OptunasRead), ("blind", None))
    }
    decisions: dict[str, list] = {name: [] for name in engines}
    light_running_values = optuna_running_values = 0
    for _ in range(40):
        others.step()
        for name, (mirror, changes) in engines.items():
            if changes is not None:
                trials = changes.read(store.of(storage), study_id, own=())
                mirror.apply(trials)
                running = sum(
                    len(t.intermediate_values) for t in trials if t.state == TrialState.RUNNING
                )
                if name == "light":
                    light_running_values += running
                else:
                    optuna_running_values += running
            decisions[name].append(_decide(mirror))
    assert decisions["light"] == decisions["optuna"]
    # the comparison can fail: an engine that never syncs decides otherwise
    assert decisions["blind"] != decisions["light"]
    # and the two reads differ where they should: only Optuna's carried running curves
    assert light_running_values == 0 < optuna_running_values
    # the trials reach the mirror as Optuna's read builds them; the running ones without curves
    light = engines["light"][0].study.get_trials()
    old = engines["optuna"][0].study.get_trials()
    fields = ("params", "distributions", "values", "system_attrs", "state", "number")
    for a, b in zip(light, old, strict=True):
        assert [getattr(a, f) for f in fields] == [getattr(b, f) for f in fields]
        if a.state.is_finished():
            assert a.intermediate_values == b.intermediate_values
        # of the user attrs, the seed alone (what the writer checks); no decision reads others
        assert a.user_attrs == {k: v for k, v in b.user_attrs.items() if k in USER_ATTRS}
    # a read of the stored trials by either way gives equal trials, field by field
    stored = storage._get_trials(study_id, None, set(), -1)
    mine = store.of(storage).changes(study_id, -1, {})
    assert len(mine) == len(stored) > 0
    for a, b in zip(mine, stored, strict=True):
        if a.state.is_finished():
            assert a == b and a.datetime_complete == b.datetime_complete
        else:
            assert not a.intermediate_values
            assert a == FrozenTrial(**{**_fields(b), "intermediate_values": {}})


def _fields(t: FrozenTrial) -> dict:
    return dict(
        number=t.number,
        state=t.state,
        value=None,
        values=t.values,
        datetime_start=t.datetime_start,
        datetime_complete=t.datetime_complete,
        params=t.params,
        distributions=t.distributions,
        user_attrs=t.user_attrs,
        system_attrs=t.system_attrs,
        intermediate_values=t.intermediate_values,
        trial_id=t._trial_id,
    )


def _running(x: float) -> FrozenTrial:
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    return optuna.trial.create_trial(state=TrialState.RUNNING, params={"x": x}, distributions=dist)


def _statements(storage, fn) -> list[tuple[str, tuple]]:
    seen: list[tuple[str, tuple]] = []

    def listen(conn, cursor, statement, parameters, context, executemany):
        values = parameters.values() if isinstance(parameters, dict) else parameters  # psycopg
        flat = [x for v in values for x in (v if isinstance(v, list) else [v])]  # id arrays
        seen.append((" ".join(statement.split()), tuple(flat)))

    sqlalchemy.event.listen(storage.engine, "before_cursor_execute", listen)
    try:
        fn()
    finally:
        sqlalchemy.event.remove(storage.engine, "before_cursor_execute", listen)
    return seen


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_syncs_cost_does_not_grow_with_the_running_trials_curves(tmp_path, request, backend):
    """The same study twice, its 30 running trials 5 epochs in and 500 epochs in: the sync that
    follows a new trial and a finished one sends the same statements (with as many parameters)
    and reads intermediate values of the finished trial only."""
    runs = {}
    for epochs in (5, 500):
        storage = store.open_store(
            store.parse(_url(backend, tmp_path, request, f"{epochs}"))
        ).optuna
        study_id = optuna.create_study(study_name=f"sync{epochs}", storage=storage)._study_id

        ids = [
            tid
            for tid, _ in store.of(storage).add_trials(
                study_id, [_running(i / 100) for i in range(30)], heartbeat=True
            )
        ]
        store.of(storage).append_values(
            {tid: {s: 1.0 / s for s in range(1, epochs + 1)} for tid in ids}
        )
        changes = Changes(-1, {})
        assert len(changes.read(store.of(storage), study_id, own=())) == 30  # the first look
        new = store.of(storage).add_trials(study_id, [_running(0.99)], heartbeat=True)[0][0]
        store.of(storage).finish_trial(
            ids[7],
            state=TrialState.COMPLETE,
            value=0.5,
            values={},
            user_attrs={},
            system_attrs={},
            completed=datetime.now(),
        )
        got: list = []
        seen = _statements(
            storage,
            lambda c=changes, s=storage, i=study_id: got.extend(c.read(store.of(s), i, ())),  # noqa: B023
        )
        assert [t._trial_id for t in got] == [ids[7], new]
        assert len(got[0].intermediate_values) == epochs and not got[1].intermediate_values
        for sql, params in seen:
            if "trial_intermediate_values" in sql:
                assert set(params) <= {ids[7]}, (sql, params)
        runs[epochs] = [(sql, len(params)) for sql, params in seen]
    assert runs[5] == runs[500]


def test_a_sweep_reads_no_running_curves(tmp_path):
    """The stale-trial sweep (every few seconds in every writer) read every running trial with
    its curve to find their owners; it reads the owners alone, and only a trial it fails whole."""
    from study.store import recovery

    url = f"sqlite:///{tmp_path}/s.db"
    storage = store.open_store(store.parse(url), store.Heartbeat(5, 20, max_retries=1)).optuna
    study_id = optuna.create_study(study_name="sweep", storage=storage)._study_id
    ids = [
        tid
        for tid, _ in store.of(storage).add_trials(
            study_id, [_running(0.1), _running(0.2)], heartbeat=True
        )
    ]
    store.of(storage).append_values({tid: {s: 1.0 / s for s in range(1, 200)} for tid in ids})
    storage.set_trial_system_attr(ids[0], recovery.OWNER_ATTR, recovery.owner_attr())  # alive
    host, boot, pid, _ = recovery.owner_attr().split(" ")
    gone = f"{host} {boot} {pid} 1"  # this pid, another start time: a process that ended
    storage.set_trial_system_attr(ids[1], recovery.OWNER_ATTR, gone)
    study = optuna.load_study(
        study_name="sweep", storage=storage
    )  # a cached storage, as a writer's
    out: dict = {}
    seen = _statements(
        storage,
        lambda: out.update(
            recovery.sweep_stale(store.of(storage), study, grace_period=20, max_retries=1)
        ),
    )
    assert out == {1: "its process on this machine is gone"}
    for sql, params in seen:
        if "trial_intermediate_values" in sql:
            assert set(params) <= {ids[1]}, (sql, params)
