"""The batched engine's trial writes, each one transaction of bulk statements on an RDB storage
(SQLite, PostgreSQL); the journal file goes through Optuna's own calls.

Why: Optuna's `create_new_trial(template_trial=...)` (what `study.add_trial` calls) stores a
trial's params, user attrs and intermediate values one row at a time, and each row costs two
SELECTs (the trial, then an existing row for the same key) before its INSERT (docs/design.md,
"Bulk writes", has the cost). Here a write is one transaction whatever its size:
  - `add_trials`: new RUNNING trials (params, distributions, user and system attrs, a
    heartbeat row) numbered as Optuna numbers them, under the same lock on the study row;
  - `append_values`: intermediate values of many running trials;
  - `finish_trials`: state, value, remaining values and attrs of trials that ended;
  - `beat`: the heartbeat of many running trials.

What it writes is what Optuna writes: the same ORM models, the same stored representation of
values (Optuna's own `*_to_stored_repr`), the same JSON for attrs and distributions. Tests
compare trials stored both ways field by field, on SQLite and PostgreSQL; the models are
Optuna's private module, so those tests are what tells when an Optuna release changes them.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Container, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any, TypeVar

import optuna
import sqlalchemy
from optuna.distributions import distribution_to_json
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import delete, insert, update
from sqlalchemy.dialects import postgresql

from study.store.storage import journal_lock
from study.trial.space import param_set

_RETRIES = 5  # as Optuna's create_new_trial: a deadlock between writers is retried after a pause
T = TypeVar("T")


def _transaction(storage: RDBStorage, body: Callable[[Any], T]) -> T:
    for attempt in range(1, _RETRIES + 1):
        try:
            with _create_scoped_session(storage.scoped_session) as session:
                return body(session)
        except optuna.exceptions.StorageInternalError:
            if attempt == _RETRIES:
                raise
            time.sleep(random.random() * 2.0)  # Optuna's own back-off for the same case
    raise AssertionError("unreachable")


def _lock_for_check(session) -> None:
    """Begin a transaction that reads, checks and then writes so that no other engine writes in
    between. FOR UPDATE does it on PostgreSQL; on SQLite it is a no-op and the driver opens a
    transaction only at the first write, so two engines both checked, found nothing, and both
    inserted one parameter set. SQLite's IMMEDIATE transactions run one at a time."""
    if not _postgres(session):
        session.connection().exec_driver_sql("BEGIN IMMEDIATE")


def _id_array(ids: list[int]):
    return sqlalchemy.bindparam(None, ids, type_=postgresql.ARRAY(sqlalchemy.Integer))


def _one_of(session, column, ids: list[int]):
    """`column IN ids`, as one array parameter on PostgreSQL (`= ANY(:ids)`): an IN list of a
    thousand ids is a thousand bind parameters, which SQLAlchemy renders and psycopg parses on
    every call, at more cost than the query."""
    if _postgres(session):
        return column == sqlalchemy.any_(_id_array(ids))
    return column.in_(ids)


def _rows(session, query) -> list[tuple]:
    """Plain rows through the session's connection (SQLAlchemy Core): the ORM's result machinery
    costs more than the database on reads of many small rows. On PostgreSQL psycopg's own tuples:
    it returns every column read here (ints, floats, text, timestamps) as SQLAlchemy would."""
    result = session.connection().execute(query)
    if _postgres(session):
        return result.cursor.fetchall()
    return [tuple(r) for r in result.fetchall()]


def _postgres(session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _put(session, model, rows: list[dict]) -> None:
    """INSERT `rows` (dicts with the same keys) into `model`'s table. PostgreSQL: one COPY in the
    session's transaction; an executemany there is one statement per row, whose parameters
    psycopg adapts one by one, and the writer stores thousands of rows a second. Enum values go
    as their names, which is how SQLAlchemy stores Optuna's enums."""
    if not rows:
        return
    if not _postgres(session):
        session.execute(insert(model.__table__), rows)
        return
    cols = list(rows[0])
    raw = session.connection().connection.driver_connection
    copy_sql = f"COPY {model.__table__.name} ({', '.join(cols)}) FROM STDIN"
    with raw.cursor() as cur, cur.copy(copy_sql) as copy:
        for r in rows:
            copy.write_row([v.name if isinstance(v, Enum) else v for v in map(r.get, cols)])


def add_trial(
    storage: optuna.storages.BaseStorage, study_id: int, trial: FrozenTrial
) -> tuple[int, int]:
    """Store one trial (any state). Returns (trial_id, number)."""
    return add_trials(storage, study_id, [trial], heartbeat=False)[0]


@dataclass(frozen=True)
class Taken:
    """What a new trial may not repeat: parameter sets others train or trained (FAIL trials'
    excepted: retries repeat those) and weight seeds others used (FAIL trials' included)."""

    params: frozenset = frozenset()
    seeds: frozenset = frozenset()

    def __or__(self, other: Taken) -> Taken:
        return Taken(self.params | other.params, self.seeds | other.seeds)

    def refuses(self, t: FrozenTrial, seeds: range | None) -> bool:
        """`seeds`: the trial's weight seeds (None: not checked)."""
        return (seeds is not None and _meets(self.seeds, seeds)) or bool(
            t.params and self.params and param_set(t.params, t.distributions) in self.params
        )


def _uncached(storage: optuna.storages.BaseStorage) -> optuna.storages.BaseStorage:
    """The RDB storage under a study's cache (running trials pass through it); any other
    storage as it is (a journal storage's `_backend` is its file)."""
    inner = getattr(storage, "_backend", None)
    return inner if isinstance(inner, RDBStorage) else storage


def _file_lock(storage: optuna.storages.BaseStorage) -> AbstractContextManager:
    """The journal's file lock; none for an in-memory study (one process: nothing to race)."""
    return journal_lock(storage) if isinstance(storage, JournalStorage) else nullcontext()


def _meets(held: Container[int], seeds: range) -> bool:
    """Do `seeds` meet those of trials whose first seeds are `held`? Every trial of a study
    trains as many, from its first, so another's first seed meets them if it lies less than
    that many below them or among them."""
    return any(h in held for h in range(seeds.start - len(seeds) + 1, seeds.stop))


def _seed_attrs(seeds: range) -> dict[str, Any]:
    return {"seed": seeds.start} | ({"seeds": list(seeds)} if len(seeds) > 1 else {})


def _held_journal(storage, study_id: int, trial_id: int, chain: Container[int]) -> set[int]:
    return {
        t.user_attrs["seed"]
        for t in storage.get_all_trials(study_id, deepcopy=False)
        if t._trial_id != trial_id
        and t.number not in chain
        and isinstance(t.user_attrs.get("seed"), int)
    }


def _held_rdb(session, study_id: int, trial_id: int, chain: Container[int]) -> set[int]:
    """First weight seeds of the study's trials but `trial_id` and those numbered in `chain`,
    read under the study lock (`_lock_study`)."""
    trials, attrs = models.TrialModel, models.TrialUserAttributeModel
    rows = session.execute(
        sqlalchemy.select(trials.number, attrs.trial_id, attrs.value_json)
        .join(trials, trials.trial_id == attrs.trial_id)
        .where(trials.study_id == study_id, attrs.key == "seed")
    ).all()
    held = (json.loads(v) for n, tid, v in rows if tid != trial_id and n not in chain)
    return {h for h in held if isinstance(h, int)}


def _lock_study(session, study_id: int) -> None:
    """What `add_trials` holds while it checks: no other engine stores a seed meanwhile."""
    _lock_for_check(session)
    models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)


def _put_seed_attrs(session, trial_id: int, seeds: range) -> None:
    attrs = models.TrialUserAttributeModel
    values = _seed_attrs(seeds)
    session.execute(delete(attrs).where(attrs.trial_id == trial_id, attrs.key.in_(list(values))))
    session.execute(
        insert(attrs),
        [dict(trial_id=trial_id, key=k, value_json=json.dumps(v)) for k, v in values.items()],
    )


def claim_seed(
    storage: optuna.storages.BaseStorage,
    study_id: int,
    trial_id: int,
    candidates: Iterable[int],
    *,
    repeats: int,
    chain: Container[int] = frozenset(),
) -> int:
    """Store trial `trial_id`'s first weight seed: the first of `candidates` whose seeds (it and
    the `repeats - 1` after it) no other trial's seeds meet, checked and written in one
    transaction under the study lock (the journal's file lock). So a stored seed is always a
    checked one: stored first and checked after, a trial whose engine was killed in between
    kept a seed another trial had, and its retry trained with it. `chain`: trial numbers whose
    seeds this trial may share (the trial it retries and that trial's earlier retries)."""
    storage = _uncached(storage)

    def pick(held: set[int]) -> range:
        for first in candidates:
            if not _meets(held, seeds := range(first, first + repeats)):
                return seeds
        raise ValueError("no free seed among the candidates")

    if not isinstance(storage, RDBStorage):
        with _file_lock(storage):
            seeds = pick(_held_journal(storage, study_id, trial_id, chain))
            for key, value in _seed_attrs(seeds).items():
                storage.set_trial_user_attr(trial_id, key, value)
        return seeds.start

    def body(session) -> int:
        _lock_study(session, study_id)
        seeds = pick(_held_rdb(session, study_id, trial_id, chain))
        _put_seed_attrs(session, trial_id, seeds)
        return seeds.start

    return _transaction(storage, body)


class Take(Enum):
    TAKEN = "taken"
    GONE = "gone"  # no longer WAITING: another engine took it, or it finished
    SEED = "seed"  # another trial holds one of its seeds: left WAITING


def take_queued(
    storage: optuna.storages.BaseStorage,
    study_id: int,
    trial_id: int,
    seeds: range | None,
    *,
    chain: Container[int] = frozenset(),
) -> Take:
    """Take a WAITING trial as Optuna's ask() does (its state RUNNING, its start now) and store
    its weight seeds, in one step under the study lock with the check that no other trial's
    seeds meet them (`seeds` None: no check, no seed stored). `chain`: as in `claim_seed`."""
    storage = _uncached(storage)
    if not isinstance(storage, RDBStorage):
        with _file_lock(storage):
            if storage.get_trial(trial_id).state != TrialState.WAITING:
                return Take.GONE
            if seeds is not None and _meets(
                _held_journal(storage, study_id, trial_id, chain), seeds
            ):
                return Take.SEED
            if not storage.set_trial_state_values(trial_id, TrialState.RUNNING):
                return Take.GONE
            if seeds is not None:
                for key, value in _seed_attrs(seeds).items():
                    storage.set_trial_user_attr(trial_id, key, value)
        return Take.TAKEN

    def body(session) -> Take:
        _lock_study(session, study_id)
        t = models.TrialModel
        state = session.execute(sqlalchemy.select(t.state).where(t.trial_id == trial_id)).scalar()
        if state != TrialState.WAITING:
            return Take.GONE
        if seeds is not None and _meets(_held_rdb(session, study_id, trial_id, chain), seeds):
            return Take.SEED
        # as Optuna's set_trial_state_values(RUNNING) writes it (the column holds naive UTC)
        table = t.__table__
        session.execute(
            update(table)
            .where(table.c.trial_id == trial_id)
            .values(state=TrialState.RUNNING.name, datetime_start=_utc(datetime.now()))
        )
        if seeds is not None:
            _put_seed_attrs(session, trial_id, seeds)
        return Take.TAKEN

    return _transaction(storage, body)


def add_trials(
    storage: optuna.storages.BaseStorage,
    study_id: int,
    trials: list[FrozenTrial],
    *,
    heartbeat: bool,
    after_id: int | None = None,
    taken: Taken = Taken(),
    own: set[int] = frozenset(),
    seeds: list[range | None] | None = None,
    recheck: Iterable[int] = (),
) -> list[tuple[int, int] | None]:
    """Store `trials` as new trials of the study, numbered in list order, in one transaction.
    Returns (trial_id, number) per trial, or None for a trial not stored because another engine
    already has its parameter set or one of its weight seeds (`seeds`, one range per trial;
    None: no check):
    one in `taken`, or one of a trial stored by someone else (not in `own`) after trial id
    `after_id` (-1: any) or in `recheck` (trials seen before their params or seed were stored:
    the standard engine stores them after it creates its trial), checked under the study lock
    (the journal's file lock). `heartbeat`: give each a heartbeat row, which Optuna's stale-trial
    check needs to see it."""
    seeds = seeds or [None] * len(trials)
    look = None if after_id is None else (after_id, set(recheck))
    if not isinstance(storage, RDBStorage):
        return _journal_add(storage, study_id, trials, look, taken, own, seeds)
    return _transaction(
        storage, lambda s: _insert(s, study_id, trials, heartbeat, look, taken, own, seeds)
    )


def _journal_add(
    storage, study_id: int, trials, look, taken: Taken, own, seeds
) -> list[tuple[int, int] | None]:
    # Under the file lock, the file itself is read (not only what the last sync saw), so two
    # engines appending at the same moment cannot both store one parameter set.
    with journal_lock(storage):
        if look is not None:
            after_id, recheck = look
            others = [
                t
                for t in storage.get_all_trials(study_id, deepcopy=False)
                if (t._trial_id > after_id or t._trial_id in recheck) and t._trial_id not in own
            ]
            taken = taken | _taken_of(others)
        out: list[tuple[int, int] | None] = []
        for t, seed in zip(trials, seeds, strict=True):
            if taken.refuses(t, seed):
                out.append(None)
                continue
            trial_id = storage.create_new_trial(study_id, template_trial=t)
            out.append((trial_id, storage.get_trial_number_from_id(trial_id)))
        return out


def _taken_of(trials: Iterable[FrozenTrial]) -> Taken:
    params, seeds = set(), set()
    for t in trials:
        if t.params and t.state != TrialState.FAIL:
            params.add(param_set(t.params, t.distributions))
        if isinstance(t.user_attrs.get("seed"), int):
            seeds.add(t.user_attrs["seed"])
    return Taken(frozenset(params), frozenset(seeds))


def _insert(
    session,
    study_id: int,
    trials: list[FrozenTrial],
    heartbeat: bool,
    look: tuple[int, set[int]] | None,
    taken: Taken,
    own: set[int],
    seeds: list[range | None],
) -> list[tuple[int, int] | None]:
    _lock_for_check(session)
    # The lock Optuna takes while it numbers a trial (trial numbers have no unique constraint).
    models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
    if look is not None:
        taken = taken | _taken_after(session, study_id, *look, own)
    keep = [not taken.refuses(t, seed) for t, seed in zip(trials, seeds, strict=True)]
    stored = [t for t, ok in zip(trials, keep, strict=True) if ok]
    if not stored:
        return [None] * len(trials)
    ids = (_new_trial_rows if _postgres(session) else _new_trial_models)(session, study_id, stored)
    tables: dict[Any, list[dict]] = {
        m: []
        for m in (
            models.TrialValueModel,
            models.TrialParamModel,
            models.TrialUserAttributeModel,
            models.TrialSystemAttributeModel,
            models.TrialIntermediateValueModel,
        )
    }
    for (tid, _), t in zip(ids, stored, strict=True):
        tables[models.TrialValueModel] += _value_rows(tid, t.values or [])
        tables[models.TrialParamModel] += [
            dict(
                trial_id=tid,
                param_name=name,
                param_value=t.distributions[name].to_internal_repr(value),
                distribution_json=distribution_to_json(t.distributions[name]),
            )
            for name, value in t.params.items()
        ]
        tables[models.TrialUserAttributeModel] += _attr_rows(tid, t.user_attrs)
        tables[models.TrialSystemAttributeModel] += _attr_rows(tid, t.system_attrs)
        tables[models.TrialIntermediateValueModel] += _step_rows(tid, t.intermediate_values)
    for model, table_rows in tables.items():
        _put(session, model, table_rows)
    if heartbeat:  # the database's clock, as Optuna's heartbeat
        beats = models.TrialHeartbeatModel.__table__
        now = sqlalchemy.func.now()
        if _postgres(session):
            session.execute(
                insert(beats).from_select(
                    ["trial_id", "heartbeat"],
                    sqlalchemy.select(sqlalchemy.func.unnest(_id_array([i for i, _ in ids])), now),
                )
            )
        else:
            now = session.execute(sqlalchemy.select(now)).scalar()
            session.execute(insert(beats), [dict(trial_id=i, heartbeat=now) for i, _ in ids])
    out = iter(ids)
    return [next(out) if ok else None for ok in keep]


def _new_trial_models(session, study_id: int, trials: list[FrozenTrial]) -> list[tuple[int, int]]:
    """Trial rows as Optuna's create_new_trial stores them (ORM objects, numbered after the
    flush by the trials before them); (trial_id, number) each."""
    rows = [
        models.TrialModel(
            study_id=study_id,
            number=None,
            state=t.state,
            datetime_start=t.datetime_start,
            datetime_complete=t.datetime_complete,
        )
        for t in trials
    ]
    session.add_all(rows)
    session.flush()  # their trial_ids
    first = rows[0].count_past_trials(session)
    for i, row in enumerate(rows):
        row.number = first + i  # ids rise in insert order and the study row is locked
    return [(r.trial_id, r.number) for r in rows]


def _new_trial_rows(session, study_id: int, trials: list[FrozenTrial]) -> list[tuple[int, int]]:
    """PostgreSQL: the same rows in one COPY, their ids taken from the table's sequence first
    and their numbers counted before (the study row is locked, as Optuna locks it to number a
    trial, and every trial of the study has a lower id than the sequence's next)."""
    seq = sqlalchemy.func.pg_get_serial_sequence("trials", "trial_id")
    ids = sorted(
        session.execute(
            sqlalchemy.select(sqlalchemy.func.nextval(seq)).select_from(
                sqlalchemy.func.generate_series(1, len(trials))
            )
        ).scalars()
    )
    m = models.TrialModel
    first = session.execute(
        sqlalchemy.select(sqlalchemy.func.count(m.trial_id)).where(m.study_id == study_id)
    ).scalar()
    _put(
        session,
        m,
        [
            dict(
                trial_id=tid,
                number=first + i,
                study_id=study_id,
                state=t.state,
                datetime_start=_utc(t.datetime_start),
                datetime_complete=_utc(t.datetime_complete),
            )
            for i, (tid, t) in enumerate(zip(ids, trials, strict=True))
        ],
    )
    return [(tid, first + i) for i, tid in enumerate(ids)]


def _utc(local: datetime | None) -> datetime | None:
    """A time as Optuna's TrialModel stores it: naive UTC."""
    return None if local is None else local.astimezone(UTC).replace(tzinfo=None)


def _taken_after(session, study_id: int, after_id: int, recheck: set[int], own: set[int]) -> Taken:
    """Parameter sets (not of FAIL trials: retries repeat those) and weight seeds of the trials
    others stored after `after_id` or listed in `recheck`."""
    trials = models.TrialModel
    seen_before = _one_of(session, trials.trial_id, [*recheck])
    which = sqlalchemy.or_(trials.trial_id > after_id, seen_before)
    rows = session.execute(
        sqlalchemy.select(
            models.TrialParamModel.trial_id,
            models.TrialParamModel.param_name,
            models.TrialParamModel.param_value,
        )
        .join(trials, trials.trial_id == models.TrialParamModel.trial_id)
        .where(
            trials.study_id == study_id,
            which,
            trials.state != TrialState.FAIL,
        )
    ).all()
    sets: dict[int, set] = {}
    for tid, name, value in rows:
        if tid not in own:
            sets.setdefault(tid, set()).add((name, value))
    attrs = models.TrialUserAttributeModel
    seed_rows = session.execute(
        sqlalchemy.select(attrs.trial_id, attrs.value_json)
        .join(trials, trials.trial_id == attrs.trial_id)
        .where(trials.study_id == study_id, which, attrs.key == "seed")
    ).all()
    seeds = {json.loads(v) for tid, v in seed_rows if tid not in own}
    return Taken(frozenset(frozenset(s) for s in sets.values()), frozenset(seeds))


def _value_rows(tid: int, values: list[float]) -> list[dict]:
    out = []
    for i, v in enumerate(values):
        stored, kind = models.TrialValueModel.value_to_stored_repr(v)
        out.append(dict(trial_id=tid, objective=i, value=stored, value_type=kind))
    return out


def _attr_rows(tid: int, attrs: dict[str, Any]) -> list[dict]:
    return [dict(trial_id=tid, key=k, value_json=json.dumps(v)) for k, v in attrs.items()]


def _step_rows(tid: int, steps: dict[int, float]) -> list[dict]:
    out = []
    for step, v in steps.items():
        stored, kind = models.TrialIntermediateValueModel.intermediate_value_to_stored_repr(v)
        out.append(
            dict(trial_id=tid, step=step, intermediate_value=stored, intermediate_value_type=kind)
        )
    return out


def append_values(
    storage: optuna.storages.BaseStorage, values: dict[int, dict[int, float]]
) -> None:
    """New intermediate values {trial_id: {step: value}} of running trials, in one transaction.
    A trial another process finished meanwhile (a sweep, optuna-dashboard) is skipped: the
    writer's next sync stops it (the journal refuses the write; an RDB takes the rows)."""
    if not isinstance(storage, RDBStorage):
        for tid, steps in values.items():
            try:
                for step, v in steps.items():
                    storage.set_trial_intermediate_value(tid, step, v)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
        return

    def body(session) -> None:
        rows = [r for tid, steps in values.items() for r in _step_rows(tid, steps)]
        _put(session, models.TrialIntermediateValueModel, rows)

    _transaction(storage, body)


@dataclass(frozen=True)
class Ending:
    """How one running trial ends (finish_trials)."""

    trial_id: int
    state: TrialState
    value: float | None
    values: dict[int, float]  # intermediate values not stored yet
    user_attrs: dict[str, Any]
    system_attrs: dict[str, Any]
    completed: datetime
    rest: tuple[float, ...] = ()  # the values after the first, in a study of two objectives

    @property
    def stored_values(self) -> list[float] | None:
        return None if self.value is None else [self.value, *self.rest]


def finish_trial(storage: optuna.storages.BaseStorage, trial_id: int, **ending: Any) -> bool:
    """End one running trial (finish_trials)."""
    return finish_trials(storage, [Ending(trial_id, **ending)])[0]


def finish_trials(storage: optuna.storages.BaseStorage, endings: list[Ending]) -> list[bool]:
    """End running trials: their remaining intermediate values, attrs (replacing those of the
    same key), value and state, all in one transaction. Per trial, False and nothing written
    when it had already been finished (e.g. failed as stale by another engine)."""
    if not isinstance(storage, RDBStorage):
        return [_journal_finish(storage, e) for e in endings]
    if not endings:
        return []

    def body(session) -> list[bool]:
        _lock_for_check(session)
        m = models.TrialModel
        rows = {
            r.trial_id: r
            for r in session.query(m)
            .filter(m.trial_id.in_([e.trial_id for e in endings]))
            .with_for_update()
            .all()
        }
        ok = [e.trial_id in rows and not rows[e.trial_id].state.is_finished() for e in endings]
        ends = [e for e, good in zip(endings, ok, strict=True) if good]
        for e in ends:
            rows[e.trial_id].state, rows[e.trial_id].datetime_complete = e.state, e.completed
        for model, field in (
            (models.TrialUserAttributeModel, "user_attrs"),
            (models.TrialSystemAttributeModel, "system_attrs"),
        ):
            pairs = [(e.trial_id, k) for e in ends for k in getattr(e, field)]
            if pairs:
                session.execute(
                    delete(model).where(sqlalchemy.tuple_(model.trial_id, model.key).in_(pairs))
                )
                attr_rows = [r for e in ends for r in _attr_rows(e.trial_id, getattr(e, field))]
                _put(session, model, attr_rows)
        value_rows = [r for e in ends for r in _value_rows(e.trial_id, e.stored_values or [])]
        step_rows = [r for e in ends for r in _step_rows(e.trial_id, e.values)]
        _put(session, models.TrialValueModel, value_rows)
        _put(session, models.TrialIntermediateValueModel, step_rows)
        return ok

    return _transaction(storage, body)


def _journal_finish(storage: optuna.storages.BaseStorage, e: Ending) -> bool:
    try:
        append_values(storage, {e.trial_id: e.values})
        for k, v in e.user_attrs.items():
            storage.set_trial_user_attr(e.trial_id, k, v)
        for k, v in e.system_attrs.items():
            storage.set_trial_system_attr(e.trial_id, k, v)
        return storage.set_trial_state_values(e.trial_id, e.state, e.stored_values)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


_UNFINISHED = (TrialState.RUNNING, TrialState.WAITING)


def changed_trials(
    storage: RDBStorage,
    study_id: int,
    max_id: int,
    unfinished: Mapping[int, TrialState],
    skip: Container[int] = (),
    user_keys: Iterable[str] | None = None,
) -> list[FrozenTrial]:
    """Trials stored after `max_id` (but those in `skip`) and those of `unfinished` whose state
    changed, in id order: what a mirror needs of the other engines' trials, read so that the
    cost does not grow with the running trials' curves. Optuna's incremental read
    (`_get_trials(study_id, None, unfinished, max_id)`) returns every unfinished trial with all
    its intermediate values on every call. Here one SELECT of (id, state) finds what is new or
    changed; new RUNNING / WAITING trials are read without intermediate values (no sampler or
    pruner reads a running trial's curve: TPE reads its params, the pruners read finished
    trials' values and the rungs' system attrs, which are stored at the end), and finished ones
    with all of them, once: a finished trial's curve is what the pruners compare with.
    `user_keys`: read only these user attrs (None: all); no sampler or pruner reads one."""
    m = models.TrialModel

    def states(session) -> dict[int, TrialState]:
        rows = _rows(
            session,
            sqlalchemy.select(m.trial_id, _name(m.state)).where(
                m.study_id == study_id,
                sqlalchemy.or_(m.trial_id > max_id, m.state.in_(_UNFINISHED)),
            ),
        )
        return {tid: TrialState[state] for tid, state in rows}

    now = _transaction(storage, states)
    full = {tid for tid, state in unfinished.items() if now.get(tid) != state}
    fresh = [tid for tid in now if tid > max_id and tid not in skip]
    full |= {tid for tid in fresh if now[tid] not in _UNFINISHED}
    light = sorted(tid for tid in fresh if now[tid] in _UNFINISHED)

    keys = None if user_keys is None else list(user_keys)
    out = _read_trials(storage, light, curves=False, user_keys=keys) if light else []
    full |= {t._trial_id for t in out if t.state not in _UNFINISHED}  # finished meanwhile
    out = [t for t in out if t._trial_id not in full]
    if full:
        out += _read_trials(storage, sorted(full), curves=True, user_keys=keys)
    return sorted(out, key=lambda t: t._trial_id)


def _name(column):
    """An Enum column read as the member's stored name: mapped by a dict lookup here, cheaper
    than SQLAlchemy's per-row Enum processing."""
    return sqlalchemy.type_coerce(column, sqlalchemy.String)


_VALUE_TYPES = models.TrialValueModel.TrialValueType.__members__
_STEP_TYPES = models.TrialIntermediateValueModel.TrialIntermediateValueType.__members__


def _json(text: str, cache: dict[str, Any]) -> Any:
    """json.loads, remembered where the value is a scalar (shared safely): most attrs repeat
    across trials (the train config's fields, the engine's name)."""
    if text in cache:
        return cache[text]
    value = json.loads(text)
    if value is None or isinstance(value, str | int | float | bool):
        cache[text] = value
    return value


def _local(utc: datetime | None) -> datetime | None:
    """A stored naive UTC time as Optuna's TrialModel gives it: naive local time."""
    if utc is None:
        return None
    return utc.replace(tzinfo=UTC).astimezone().replace(tzinfo=None)


def _read_trials(
    storage: RDBStorage, ids: list[int], *, curves: bool, user_keys: list[str] | None = None
) -> list[FrozenTrial]:
    """Trials `ids`, built as Optuna's `_build_frozen_trial_from_trial_model` builds them (the
    same stored representations) from one plain SELECT per table; without `curves`, with no
    intermediate values (none are read). Plain rows, not ORM objects: a sync reads hundreds of
    trials with a dozen attrs each, and the ORM's objects cost more than the database."""
    m = models

    def body(session) -> list[FrozenTrial]:
        def rows(*cols, where, also=None):
            query = sqlalchemy.select(*cols).where(_one_of(session, where, ids))
            query = query if also is None else query.where(also)
            return _rows(session, query)

        t = m.TrialModel
        start, complete = t._datetime_start_utc, t._datetime_complete_utc  # as stored: UTC
        trials = rows(t.trial_id, t.number, _name(t.state), start, complete, where=t.trial_id)
        p = m.TrialParamModel
        params = rows(
            p.trial_id,
            p.param_id,
            p.param_name,
            p.param_value,
            p.distribution_json,
            where=p.trial_id,
        )
        v = m.TrialValueModel
        values = rows(v.trial_id, v.objective, v.value, _name(v.value_type), where=v.trial_id)
        attrs = {}
        for model in (m.TrialUserAttributeModel, m.TrialSystemAttributeModel):
            which = None
            if model is m.TrialUserAttributeModel and user_keys is not None:
                which = model.key.in_(user_keys)
            cols = (model.trial_id, model.key, model.value_json)
            attrs[model] = rows(*cols, where=model.trial_id, also=which)
        iv = m.TrialIntermediateValueModel
        steps = (
            rows(
                iv.trial_id,
                iv.step,
                iv.intermediate_value,
                _name(iv.intermediate_value_type),
                where=iv.trial_id,
            )
            if curves
            else []
        )
        return trials, params, values, attrs, steps

    trials, params, values, attrs, steps = _transaction(storage, body)
    dists: dict[str, Any] = {}  # distribution JSON -> distribution: few distinct ones
    scalars: dict[str, Any] = {}
    by_id = {
        tid: dict(
            number=n,
            state=TrialState[st],
            start=ds,
            complete=dc,
            params=[],
            values={},
            user={},
            system={},
            steps={},
        )
        for tid, n, st, ds, dc in trials
    }
    for tid, pid, name, value, dist_json in params:
        if dist_json not in dists:
            dists[dist_json] = optuna.distributions.json_to_distribution(dist_json)
        by_id[tid]["params"].append((pid, name, value, dists[dist_json]))
    for tid, objective, value, kind in values:
        by_id[tid]["values"][objective] = m.TrialValueModel.stored_repr_to_value(
            value, _VALUE_TYPES[kind]
        )
    for model, key in (
        (m.TrialUserAttributeModel, "user"),
        (m.TrialSystemAttributeModel, "system"),
    ):
        for tid, name, value_json in attrs[model]:
            by_id[tid][key][name] = _json(value_json, scalars)
    for tid, step, value, kind in steps:
        by_id[tid]["steps"][step] = (
            m.TrialIntermediateValueModel.stored_repr_to_intermediate_value(
                value, _STEP_TYPES[kind]
            )
        )
    out = []
    for tid in sorted(by_id):
        d = by_id[tid]
        ps = sorted(d["params"], key=lambda x: x[0])
        out.append(
            FrozenTrial(
                number=d["number"],
                state=d["state"],
                value=None,
                values=[d["values"][i] for i in sorted(d["values"])] if d["values"] else None,
                datetime_start=d["start"],
                datetime_complete=d["complete"],
                params={name: dist.to_external_repr(value) for _, name, value, dist in ps},
                distributions={name: dist for _, name, _, dist in ps},
                user_attrs=d["user"],
                system_attrs=d["system"],
                intermediate_values=d["steps"],
                trial_id=tid,
            )
        )
    return out


def trial_states(storage: RDBStorage, trial_ids: Iterable[int]) -> dict[int, TrialState]:
    """The stored state of each trial: one small SELECT, none of the trials' values."""
    ids = list(trial_ids)
    if not ids:
        return {}
    m = models.TrialModel

    def body(session) -> dict[int, TrialState]:
        query = sqlalchemy.select(m.trial_id, _name(m.state))
        rows = _rows(session, query.where(_one_of(session, m.trial_id, ids)))
        return {tid: TrialState[state] for tid, state in rows}

    return _transaction(storage, body)


def beat(
    storage: optuna.storages.BaseStorage, trial_ids: Iterable[int], journal_attr: str
) -> None:
    """A heartbeat for each running trial: one UPDATE on an RDB storage (the rows exist since
    add_trials), Optuna's system attr `journal_attr` per trial on the journal."""
    ids = list(trial_ids)
    if not ids:
        return
    if not isinstance(storage, RDBStorage):
        now = time.time()
        for tid in ids:
            try:
                storage.set_trial_system_attr(tid, journal_attr, now)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass
        return

    def body(session) -> None:
        now = session.execute(sqlalchemy.func.now()).scalar()
        m = models.TrialHeartbeatModel
        session.execute(update(m).where(_one_of(session, m.trial_id, ids)).values(heartbeat=now))

    _transaction(storage, body)
