"""Optuna's RDBStorage (SQLite, PostgreSQL) with the engines' steps as bulk SQL.

Why: Optuna's `create_new_trial(template_trial=...)` (what `study.add_trial` calls) stores a
trial's params, user attrs and intermediate values one row at a time, and each row costs two
SELECTs (the trial, then an existing row for the same key) before its INSERT (docs/design.md,
"Bulk writes"). Here each step is one transaction whatever its size. What it writes is what
Optuna writes: the same ORM models, the same stored representation of values (Optuna's own
`*_to_stored_repr`), the same JSON for attrs and distributions. Tests compare trials stored
both ways field by field, on SQLite and PostgreSQL; the models are Optuna's private module
(study.store.private lists each use), so those tests tell when an Optuna release changes them.

What differs between the two databases is a method each: how a check takes the lock
(`_lock_for_check`), how ids are matched (`_one_of`), rows read (`_rows`) and inserted (`_put`),
and how new trial rows get their ids (`_new_trial_ids`).
"""

from __future__ import annotations

import copy
import functools
import json
import random
import time
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import optuna
import sqlalchemy
import sqlalchemy.exc
from optuna.distributions import distribution_to_json
from optuna.storages import RDBStorage
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import delete, insert, update

from study.errors import StorageError
from study.quiet import experimental
from study.store.base import (
    NOTHING_TAKEN,
    UNFINISHED,
    Ending,
    Store,
    Take,
    Taken,
    meets,
    pick_seeds,
    retry_of,
    seed_attrs,
)
from study.store.outage import Outage
from study.store.url import Heartbeat, StorageURL, redact

_RETRIES = 5  # as Optuna's create_new_trial: a deadlock between writers is retried after a pause
SCHEMA_RACE_TRIES = 3  # opens of a storage whose schema someone else is creating at that moment
T = TypeVar("T")


class RDBStore(Store):
    """The steps shared by SQLite and PostgreSQL; each subclass states what differs."""

    # ---------------------------------------------------------------- opening

    @classmethod
    def _engine(cls, parsed: StorageURL, *, read_only: bool) -> tuple[str, dict]:
        """The SQLAlchemy URL and engine options; `read_only`: connections that cannot write."""
        raise NotImplementedError

    @classmethod
    def _storage_class(cls) -> type[RDBStorage]:
        return SweepingStorage

    @classmethod
    def open(
        cls, parsed: StorageURL, heartbeat: Heartbeat | None = None, *, read_only: bool = False
    ) -> RDBStore:
        """Open a checked URL, creating Optuna's schema on first use. With `heartbeat`,
        Optuna's heartbeat runs and its stale-trial callback queues retries; `read_only`: an
        existing storage whose connections cannot write."""
        url, kwargs = cls._engine(parsed, read_only=read_only)
        if read_only:
            try:
                with experimental():
                    return cls(RDBStorage(url, engine_kwargs=kwargs), parsed, read_only=True)
            except (RuntimeError, sqlalchemy.exc.DBAPIError) as e:  # another Optuna's schema
                raise StorageError(
                    f"{redact(parsed.url)}: {str(e).strip().splitlines()[0]}", exit_code=1
                ) from None
        hb = {}
        if heartbeat is not None:
            from study.store.recovery import StaleRetry

            hb = dict(
                heartbeat_interval=heartbeat.interval,
                grace_period=heartbeat.grace_period,
                heartbeat_stale_trial_callback=StaleRetry(heartbeat.max_retries),
            )

        def once(again: bool) -> RDBStore:
            for attempt in range(SCHEMA_RACE_TRIES):
                try:
                    with experimental(), cls._schema_lock(parsed):  # heartbeat: experimental
                        storage = cls._storage_class()(url, engine_kwargs=kwargs, **hb)
                        store = cls(storage, parsed, heartbeat)
                        storage.store = store
                        store._after_open()
                        return store
                except sqlalchemy.exc.DBAPIError as e:
                    # Another program (plain Optuna, the dashboard, a run on another machine)
                    # created the schema while this one did: it exists now, so open it again.
                    if attempt + 1 == SCHEMA_RACE_TRIES or not _schema_race(e):
                        raise
                    time.sleep(0.1 + random.random() * 0.4)
            raise AssertionError("unreachable")

        # a server that went down since `check`: waited for as `check` waits (creating the
        # schema is idempotent, and Optuna's own create is what a second try runs)
        naming = cls(None, parsed)
        bound = heartbeat.outage if heartbeat is not None else 0.0
        waits = Outage(bound, meanwhile="the run starts when it answers", past="stopped")
        try:
            return waits.run(once, naming.fault)
        except RuntimeError as e:  # e.g. a schema from another Optuna version
            raise StorageError(
                f"{redact(parsed.url)}: {str(e).splitlines()[0]}", exit_code=1
            ) from None

    @classmethod
    def _schema_lock(cls, parsed: StorageURL):
        from contextlib import nullcontext

        return nullcontext()

    def _after_open(self) -> None:
        """What a new storage needs after Optuna made its schema."""

    # ---------------------------------------------------------------- what differs

    def _lock_for_check(self, session) -> None:
        """Begin a transaction that reads, checks and then writes so that no other engine writes
        in between (with the study row's FOR UPDATE that follows)."""

    def _one_of(self, column, ids: list[int]):
        """`column IN ids`."""
        return column.in_(ids)

    def _rows(self, session, query) -> list[tuple]:
        """Plain rows through the session's connection (SQLAlchemy Core): the ORM's result
        machinery costs more than the database on reads of many small rows."""
        return [tuple(r) for r in session.connection().execute(query).fetchall()]

    def _put(self, session, model, rows: list[dict]) -> None:
        """INSERT `rows` (dicts with the same keys) into `model`'s table."""
        if rows:
            session.execute(insert(model.__table__), rows)

    def _new_trial_ids(
        self, session, study_id: int, trials: list[FrozenTrial]
    ) -> list[tuple[int, int]]:
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

    def _insert_heartbeats(self, session, ids: list[int]) -> None:
        """A heartbeat row per new trial, at the database's clock (as Optuna's heartbeat)."""
        now = session.execute(sqlalchemy.select(sqlalchemy.func.now())).scalar()
        beats = models.TrialHeartbeatModel.__table__
        session.execute(insert(beats), [dict(trial_id=i, heartbeat=now) for i in ids])

    # ---------------------------------------------------------------- the steps

    @property
    def _rdb(self) -> RDBStorage:
        """The RDB storage under a study's cache (running trials pass through it)."""
        inner = getattr(self.optuna, "_backend", None)
        return inner if isinstance(inner, RDBStorage) else self.optuna

    def transient(self, exc: BaseException) -> str | None:
        """Every fault this storage names (`fault`): a transaction is all or nothing, so a
        step can be tried again after any of them."""
        return self.fault(exc)

    def _transaction(
        self, body: Callable[[Any], T], done: Callable[[Any], T | None] | None = None
    ) -> T:
        """`body(session)` in one transaction, under the outage rule (study.store.outage). A
        step that writes and cannot simply run twice gives `done`: after an outage its commit
        may have been stored without an answer, so the next try first asks `done(session)`
        what the body returned if its writes are there (None: they are not; the body runs)."""

        def step(again: bool) -> T:
            for attempt in range(1, _RETRIES + 1):
                try:
                    with _create_scoped_session(self._rdb.scoped_session) as session:
                        if again and done is not None and (found := done(session)) is not None:
                            return found
                        return body(session)
                except optuna.exceptions.StorageInternalError as e:
                    if attempt == _RETRIES or self.transient(e) is not None:
                        raise
                    time.sleep(random.random() * 2.0)  # Optuna's own back-off for a deadlock
            raise AssertionError("unreachable")

        return self.waiting(step)

    def _held_rdb(self, session, study_id: int, trial_id: int, chain: Container[int]) -> set[int]:
        """First weight seeds of the study's trials but `trial_id` and those numbered in
        `chain`, read under the study lock (`_lock_study`)."""
        trials, attrs = models.TrialModel, models.TrialUserAttributeModel
        rows = session.execute(
            sqlalchemy.select(trials.number, attrs.trial_id, attrs.value_json)
            .join(trials, trials.trial_id == attrs.trial_id)
            .where(trials.study_id == study_id, attrs.key == "seed")
        ).all()
        held = (json.loads(v) for n, tid, v in rows if tid != trial_id and n not in chain)
        return {h for h in held if isinstance(h, int)}

    def _lock_study(self, session, study_id: int) -> None:
        """What a check holds: no other engine stores a trial or a seed meanwhile."""
        self._lock_for_check(session)
        models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)

    def claim_seed(
        self,
        study_id: int,
        trial_id: int,
        candidates: Iterable[int],
        *,
        repeats: int,
        chain: Container[int] = frozenset(),
    ) -> int:
        offered = _Replay(candidates)  # a second try offers the same seeds in the same order

        def body(session) -> int:
            self._lock_study(session, study_id)
            held = self._held_rdb(session, study_id, trial_id, chain)
            seeds = pick_seeds(held, offered(), repeats)
            _put_seed_attrs(session, trial_id, seeds)  # replaces what an earlier try stored
            return seeds.start

        return self._transaction(body)

    def take_queued(
        self,
        study_id: int,
        trial_id: int,
        seeds: range | None,
        *,
        chain: Container[int] = frozenset(),
    ) -> Take:
        t = models.TrialModel
        started = _utc(datetime.now())  # also what tells a second try its first was stored

        def done(session) -> Take | None:
            start_at = t._datetime_start_utc
            query = sqlalchemy.select(t.state, start_at).where(t.trial_id == trial_id)
            state, start = session.execute(query).one()
            return Take.TAKEN if state == TrialState.RUNNING and start == started else None

        def body(session) -> Take:
            self._lock_study(session, study_id)
            state = session.execute(
                sqlalchemy.select(t.state).where(t.trial_id == trial_id)
            ).scalar()
            if state != TrialState.WAITING:
                return Take.GONE
            if seeds is not None and meets(
                self._held_rdb(session, study_id, trial_id, chain), seeds
            ):
                return Take.SEED
            # as Optuna's set_trial_state_values(RUNNING) writes it (the column holds naive UTC)
            table = t.__table__
            session.execute(
                update(table)
                .where(table.c.trial_id == trial_id)
                .values(state=TrialState.RUNNING.name, datetime_start=started)
            )
            if seeds is not None:
                _put_seed_attrs(session, trial_id, seeds)
            return Take.TAKEN

        return self._transaction(body, done)

    def add_trials(
        self,
        study_id: int,
        trials: list[FrozenTrial],
        *,
        heartbeat: bool,
        after_id: int | None = None,
        taken: Taken = NOTHING_TAKEN,
        own: Container[int] = frozenset(),
        seeds: list[range | None] | None = None,
        recheck: Iterable[int] = (),
    ) -> list[tuple[int, int] | None]:
        seeds = seeds or [None] * len(trials)
        look = None if after_id is None else (after_id, set(recheck))
        return self._transaction(
            lambda s: self._insert(s, study_id, trials, heartbeat, look, taken, own, seeds),
            lambda s: self._stored_copies(s, study_id, trials),
        )

    def _stored_copies(
        self, session, study_id: int, trials: list[FrozenTrial]
    ) -> list[tuple[int, int] | None] | None:
        """(trial_id, number) of each of `trials` already stored (the same start time and
        parameter set: a start time is unique to the microsecond among trials of one set), or
        None when none is: a transaction stored all of its trials or none."""
        m, p = models.TrialModel, models.TrialParamModel
        starts = {_utc(t.datetime_start) for t in trials if t.datetime_start is not None}
        if not starts:
            return None
        start_at = m._datetime_start_utc  # as stored (`datetime_start` converts to local)
        query = sqlalchemy.select(m.trial_id, m.number, start_at)
        rows = session.execute(query.where(m.study_id == study_id, start_at.in_(starts))).all()
        if not rows:
            return None
        sets: dict[int, set] = {tid: set() for tid, _, _ in rows}
        query = sqlalchemy.select(p.trial_id, p.param_name, p.param_value)
        for tid, name, value in session.execute(query.where(p.trial_id.in_(list(sets)))):
            sets[tid].add((name, value))
        out: list[tuple[int, int] | None] = []
        for t in trials:
            want = {(n, t.distributions[n].to_internal_repr(v)) for n, v in t.params.items()}
            start = _utc(t.datetime_start)
            hits = [(i, n) for i, n, at in rows if at == start and sets[i] == want]
            out.append(hits[0] if hits else None)
        return out if any(out) else None

    def _insert(
        self,
        session,
        study_id: int,
        trials: list[FrozenTrial],
        heartbeat: bool,
        look: tuple[int, set[int]] | None,
        taken: Taken,
        own: set[int],
        seeds: list[range | None],
    ) -> list[tuple[int, int] | None]:
        # The lock Optuna takes while it numbers a trial (trial numbers have no unique constraint).
        self._lock_study(session, study_id)
        if look is not None:
            taken = taken | self._taken_after(session, study_id, *look, own)
        keep = [not taken.refuses(t, seed) for t, seed in zip(trials, seeds, strict=True)]
        stored = [t for t, ok in zip(trials, keep, strict=True) if ok]
        if not stored:
            return [None] * len(trials)
        ids = self._new_trial_ids(session, study_id, stored)
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
            self._put(session, model, table_rows)
        if heartbeat:
            self._insert_heartbeats(session, [i for i, _ in ids])
        out = iter(ids)
        return [next(out) if ok else None for ok in keep]

    def _taken_after(
        self, session, study_id: int, after_id: int, recheck: set[int], own: set[int]
    ) -> Taken:
        """Parameter sets (not of FAIL trials: retries repeat those) and weight seeds of the trials
        others stored after `after_id` or listed in `recheck`."""
        trials = models.TrialModel
        seen_before = self._one_of(trials.trial_id, [*recheck])
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

    def fail_and_retry(self, study_id: int, trial: FrozenTrial, max_retries: int) -> bool:
        """As the interface says, in one transaction: the trial's row locked and checked, its
        state FAIL, the retry inserted (under the study lock, as every new trial)."""
        retry = retry_of(trial, max_retries)

        def body(session) -> bool:
            self._lock_study(session, study_id)
            row = (
                session.query(models.TrialModel)
                .filter(models.TrialModel.trial_id == trial._trial_id)
                .with_for_update()
                .one_or_none()
            )
            if row is None or row.state != TrialState.RUNNING:
                return False
            row.state, row.datetime_complete = TrialState.FAIL, datetime.now()  # as Optuna does
            if retry is not None:
                self._insert(session, study_id, [retry], False, None, NOTHING_TAKEN, set(), [None])
            return True

        def done(session) -> bool | None:
            m, a = models.TrialModel, models.TrialSystemAttributeModel
            state = session.execute(
                sqlalchemy.select(m.state).where(m.trial_id == trial._trial_id)
            ).scalar()
            if state != TrialState.FAIL:
                return None
            if retry is None:
                return True
            histories = session.execute(
                sqlalchemy.select(a.value_json)
                .join(m, m.trial_id == a.trial_id)
                .where(m.study_id == study_id, a.key == "retry_history")
            ).scalars()
            return True if any(json.loads(h)[-1] == trial.number for h in histories) else None

        return self._transaction(body, done)

    def append_values(self, values: dict[int, dict[int, float]]) -> None:
        """As the interface says, kept as Optuna's own API keeps it: the trials' states are read
        in the transaction that writes, their rows locked (FOR SHARE; SQLite: the write lock
        taken first), so a FAIL stored by another process comes wholly before the values (and
        they are dropped) or wholly after them."""
        if not values:
            return

        def body(session) -> None:
            self._lock_for_check(session)
            m = models.TrialModel
            running = {
                tid
                for (tid,) in session.query(m.trial_id)
                .filter(self._one_of(m.trial_id, list(values)), m.state == TrialState.RUNNING)
                .with_for_update(read=True)
            }
            mine = [(tid, steps) for tid, steps in values.items() if tid in running]
            rows = [r for tid, steps in mine for r in _step_rows(tid, steps)]
            self._put(session, models.TrialIntermediateValueModel, rows)
            return True

        def done(session) -> bool | None:
            iv = models.TrialIntermediateValueModel
            query = sqlalchemy.select(iv.trial_id, iv.step)
            there = set(session.execute(query.where(self._one_of(iv.trial_id, list(values)))))
            mine = ((tid, step) for tid, steps in values.items() for step in steps)
            return True if any(pair in there for pair in mine) else None

        self._transaction(body, done)

    def finish_trials(self, endings: list[Ending]) -> list[bool]:
        if not endings:
            return []

        def body(session) -> list[bool]:
            self._lock_for_check(session)
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
                        delete(model).where(
                            sqlalchemy.tuple_(model.trial_id, model.key).in_(pairs)
                        )
                    )
                    attr_rows = [
                        r for e in ends for r in _attr_rows(e.trial_id, getattr(e, field))
                    ]
                    self._put(session, model, attr_rows)
            value_rows = [r for e in ends for r in _value_rows(e.trial_id, e.stored_values or [])]
            step_rows = [r for e in ends for r in _step_rows(e.trial_id, e.values)]
            self._put(session, models.TrialValueModel, value_rows)
            self._put(session, models.TrialIntermediateValueModel, step_rows)
            return ok

        def done(session) -> list[bool] | None:
            m = models.TrialModel
            query = sqlalchemy.select(m.trial_id, m.state, m._datetime_complete_utc)
            ids = [e.trial_id for e in endings]
            got = session.execute(query.where(m.trial_id.in_(ids)))
            rows = {tid: (st, at) for tid, st, at in got}
            ok = [rows.get(e.trial_id) == (e.state, _utc(e.completed)) for e in endings]
            return ok if any(ok) else None

        return self._transaction(body, done)

    def changes(
        self,
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
            rows = self._rows(
                session,
                sqlalchemy.select(m.trial_id, _name(m.state)).where(
                    m.study_id == study_id,
                    sqlalchemy.or_(m.trial_id > max_id, m.state.in_(UNFINISHED)),
                ),
            )
            return {tid: TrialState[state] for tid, state in rows}

        now = self._transaction(states)
        full = {tid for tid, state in unfinished.items() if now.get(tid) != state}
        fresh = [tid for tid in now if tid > max_id and tid not in skip]
        full |= {tid for tid in fresh if now[tid] not in UNFINISHED}
        light = sorted(tid for tid in fresh if now[tid] in UNFINISHED)

        keys = None if user_keys is None else list(user_keys)
        out = self._read_trials(light, curves=False, user_keys=keys) if light else []
        full |= {t._trial_id for t in out if t.state not in UNFINISHED}  # finished meanwhile
        out = [t for t in out if t._trial_id not in full]
        if full:
            out += self._read_trials(sorted(full), curves=True, user_keys=keys)
        return sorted(out, key=lambda t: t._trial_id)

    def _read_trials(
        self, ids: list[int], *, curves: bool, user_keys: list[str] | None = None
    ) -> list[FrozenTrial]:
        """Trials `ids`, built as Optuna's `_build_frozen_trial_from_trial_model` builds them (the
        same stored representations) from one plain SELECT per table; without `curves`, with no
        intermediate values (none are read). Plain rows, not ORM objects: a sync reads hundreds of
        trials with a dozen attrs each, and the ORM's objects cost more than the database."""
        rows = self._transaction(lambda session: self._trial_rows(session, ids, curves, user_keys))
        return _build_trials(*rows)

    def _trial_rows(
        self, session, ids: list[int], curves: bool, user_keys: list[str] | None
    ) -> tuple[list, list, list, dict, list]:
        """The rows of trials `ids`, one SELECT per table: trials, params, values, attrs (by
        model) and (with `curves`) intermediate values."""
        m = models

        def rows(*cols, where, also=None):
            query = sqlalchemy.select(*cols).where(self._one_of(where, ids))
            return self._rows(session, query if also is None else query.where(also))

        t, p, v = m.TrialModel, m.TrialParamModel, m.TrialValueModel
        start, complete = t._datetime_start_utc, t._datetime_complete_utc  # as stored: UTC
        trials = rows(t.trial_id, t.number, _name(t.state), start, complete, where=t.trial_id)
        cols = (p.trial_id, p.param_id, p.param_name, p.param_value, p.distribution_json)
        params = rows(*cols, where=p.trial_id)
        values = rows(v.trial_id, v.objective, v.value, _name(v.value_type), where=v.trial_id)
        attrs = {}
        for model in (m.TrialUserAttributeModel, m.TrialSystemAttributeModel):
            which = None
            if model is m.TrialUserAttributeModel and user_keys is not None:
                which = model.key.in_(user_keys)
            cols = (model.trial_id, model.key, model.value_json)
            attrs[model] = rows(*cols, where=model.trial_id, also=which)
        iv = m.TrialIntermediateValueModel
        steps = []
        if curves:
            kind = _name(iv.intermediate_value_type)
            steps = rows(iv.trial_id, iv.step, iv.intermediate_value, kind, where=iv.trial_id)
        return trials, params, values, attrs, steps

    def trial_states(self, study_id: int, trial_ids: Iterable[int]) -> dict[int, TrialState]:
        """The stored state of each trial: one small SELECT, none of the trials' values."""
        ids = list(trial_ids)
        if not ids:
            return {}
        m = models.TrialModel

        def body(session) -> dict[int, TrialState]:
            query = sqlalchemy.select(m.trial_id, _name(m.state))
            rows = self._rows(session, query.where(self._one_of(m.trial_id, ids)))
            return {tid: TrialState[state] for tid, state in rows}

        return self._transaction(body)

    def start_beat(self, trial_id: int) -> None:
        """Its heartbeat row: Optuna's stale check skips trials without one."""
        self._rdb.record_heartbeat(trial_id)

    @property
    def optuna_sweeps(self) -> bool:
        return self._rdb.get_heartbeat_interval() is not None

    def heartbeat_ages(self, trials: list[FrozenTrial]) -> dict[int, float]:
        """Optuna's heartbeat table, against the database's clock."""
        if not trials:
            return {}
        numbers = {t._trial_id: t.number for t in trials}
        beat = models.TrialHeartbeatModel

        def body(session) -> list[tuple]:
            now = session.execute(sqlalchemy.func.now()).scalar().replace(tzinfo=None)
            query = sqlalchemy.select(beat.trial_id, beat.heartbeat)
            rows = session.execute(query.where(beat.trial_id.in_(list(numbers)))).all()
            return [(tid, (now - at.replace(tzinfo=None)).total_seconds()) for tid, at in rows]

        return {numbers[tid]: age for tid, age in self._transaction(body)}

    def silent(self, study: optuna.Study, grace_period: float) -> list[int]:
        """Optuna's own stale-trial check (its heartbeat table and grace period): the storage
        (SweepingStorage) fails and retries each trial it finds as one step and records its
        number in the storage's StaleRetry."""
        callback = self._rdb.get_heartbeat_stale_trial_callback()
        if callback is None or not hasattr(callback, "failed"):  # opened without our heartbeat
            return []
        seen = len(callback.failed)
        with experimental():  # "experimental" since Optuna 2.9; what the heartbeat runs
            optuna.storages.fail_stale_trials(study)
        return sorted(callback.failed[seen:])

    def running_attr(self, study: optuna.Study, key: str) -> dict[int, Any]:
        """One SELECT of the attr: the running trials themselves would come with all their
        curves, on every sweep."""
        t, a = models.TrialModel, models.TrialSystemAttributeModel
        query = (
            sqlalchemy.select(t.number, a.value_json)
            .select_from(t)
            .outerjoin(a, sqlalchemy.and_(a.trial_id == t.trial_id, a.key == key))
            .where(t.study_id == study._study_id, t.state == TrialState.RUNNING)
        )
        rows = self._transaction(lambda session: session.execute(query).all())
        return {number: None if raw is None else json.loads(raw) for number, raw in rows}

    def beat(self, trial_ids: Iterable[int]) -> None:
        """One UPDATE of Optuna's heartbeat rows (they exist since add_trials)."""
        ids = list(trial_ids)
        if not ids:
            return

        def body(session) -> None:
            now = session.execute(sqlalchemy.func.now()).scalar()
            m = models.TrialHeartbeatModel
            session.execute(update(m).where(self._one_of(m.trial_id, ids)).values(heartbeat=now))

        self._transaction(body)


class _Replay:
    """An iterable of candidates that each call offers again from its start, drawing from the
    source only past what an earlier call drew."""

    def __init__(self, source: Iterable[int]):
        self.source, self.drawn = iter(source), []

    def __call__(self) -> Iterator[int]:
        yield from self.drawn
        for c in self.source:
            self.drawn.append(c)
            yield c


def _put_seed_attrs(session, trial_id: int, seeds: range) -> None:
    attrs = models.TrialUserAttributeModel
    values = seed_attrs(seeds)
    session.execute(delete(attrs).where(attrs.trial_id == trial_id, attrs.key.in_(list(values))))
    session.execute(
        insert(attrs),
        [dict(trial_id=trial_id, key=k, value_json=json.dumps(v)) for k, v in values.items()],
    )


def _utc(local: datetime | None) -> datetime | None:
    """A time as Optuna's TrialModel stores it: naive UTC."""
    return None if local is None else local.astimezone(UTC).replace(tzinfo=None)


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


def _schema_race(e: Exception) -> bool:
    """Did another program create Optuna's schema while this one did? (A table or index
    already there; alembic's version row already written: SQLite says "UNIQUE constraint
    failed", PostgreSQL "duplicate key".)"""
    text = str(e).lower()
    return any(m in text for m in ("already exists", "duplicate key", "unique constraint failed"))


def _build_trials(trials, params, values, attrs, steps) -> list[FrozenTrial]:
    """FrozenTrials from the rows `_trial_rows` read, in id order."""
    m = models
    dists: dict[str, Any] = {}  # distribution JSON -> distribution: few distinct ones
    scalars: dict[str, Any] = {}
    by_id = {
        tid: dict(number=n, state=TrialState[st], start=ds, complete=dc, params=[], values={})
        | dict(user={}, system={}, steps={})
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
    to_step = m.TrialIntermediateValueModel.stored_repr_to_intermediate_value
    for tid, step, value, kind in steps:
        by_id[tid]["steps"][step] = to_step(value, _STEP_TYPES[kind])
    return [_frozen(tid, by_id[tid]) for tid in sorted(by_id)]


def _frozen(tid: int, d: dict) -> FrozenTrial:
    ps = sorted(d["params"], key=lambda x: x[0])
    return FrozenTrial(
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


class SweepingStorage(RDBStorage):
    """Optuna's RDBStorage whose stale-trial check fails each stale trial and queues its retry
    in one transaction (`RDBStore.fail_and_retry`), then hands Optuna's `fail_stale_trials`
    (which `study.optimize` and `RDBStore.silent` run) no trial to fail itself: Optuna stores
    the FAIL and then calls its callback for the retry, two steps a failure can split."""

    store: RDBStore | None = None  # the store that opened it (RDBStore.open)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        retry = self.get_heartbeat_stale_trial_callback()
        if self.store is None or not hasattr(retry, "failed"):  # not opened with our heartbeat
            return super()._get_stale_trial_ids(study_id)
        from study.store.recovery import outage_silenced

        if outage_silenced(self.store, self.grace_period or 2 * (self.heartbeat_interval or 0)):
            return []
        stale = self.store.waiting(lambda again: RDBStorage._get_stale_trial_ids(self, study_id))
        for trial_id in stale:
            trial = self.get_trial(trial_id)
            if self.store.fail_and_retry(study_id, trial, retry.max_retries):
                retry.failed.append(trial.number)
        return []

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("store", None)  # a store travels as its URL (Store.__reduce__), not inside
        return state

    # Optuna's own calls (the standard engine, the artifacts, the note, opening a study) under
    # the store's outage rule. Each is one transaction; tried again after an outage, each
    # stores nothing twice: reads, and writes Optuna makes as upserts (attrs, intermediate
    # values, heartbeats; a parameter is inserted with its duplicate ignored), run again as
    # they are; a new trial and a trial's end first look for what the first try stored.

    def _create_new_trial(
        self, study_id: int, template_trial: FrozenTrial | None = None
    ) -> FrozenTrial:
        if self.store is None:
            return super()._create_new_trial(study_id, template_trial)
        if template_trial is None:  # what Optuna makes then, with its start time as our mark
            template_trial = FrozenTrial(
                number=-1,
                state=TrialState.RUNNING,
                value=None,
                datetime_start=datetime.now(),
                datetime_complete=None,
                params={},
                distributions={},
                user_attrs={},
                system_attrs={},
                intermediate_values={},
                trial_id=-1,
            )
        template = template_trial

        def step(again: bool) -> FrozenTrial:
            if again and template.datetime_start is not None:
                m = models.TrialModel
                with _create_scoped_session(self.scoped_session) as session:
                    query = sqlalchemy.select(m.trial_id, m.number).where(
                        m.study_id == study_id,
                        m.state == template.state,
                        m._datetime_start_utc == _utc(template.datetime_start),
                    )
                    row = session.execute(query).first()
                if row is not None:
                    found = copy.deepcopy(template)
                    found.number, found._trial_id = row.number, row.trial_id
                    return found
            return RDBStorage._create_new_trial(self, study_id, template)

        return self.store.waiting(step)

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        if self.store is None:
            return self._set_state_once(trial_id, state, values)

        def step(again: bool) -> bool:
            if again and state.is_finished():
                stored = RDBStorage.get_trial(self, trial_id)
                if stored.state == state and (values is None or stored.values == list(values)):
                    return True
            return self._set_state_once(trial_id, state, values)

        return self.store.waiting(step)

    def _set_state_once(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None
    ) -> bool:
        """One try of Optuna's set_trial_state_values."""
        return RDBStorage.set_trial_state_values(self, trial_id, state, values)


def _waited(name: str):
    method = getattr(RDBStorage, name)

    @functools.wraps(method)
    def call(self: SweepingStorage, *args, **kwargs):
        if self.store is None:
            return method(self, *args, **kwargs)
        return self.store.waiting(lambda again: method(self, *args, **kwargs))

    return call


def _record_heartbeat(self: SweepingStorage, trial_id: int) -> None:
    """Optuna's heartbeat thread's one call: past the outage's bound it ends quietly, and the
    trial's next write stops the run with the line (a thread's error would be a traceback)."""
    try:
        _waited_heartbeat(self, trial_id)
    except StorageError:
        pass


_waited_heartbeat = _waited("record_heartbeat")
SweepingStorage.record_heartbeat = _record_heartbeat  # type: ignore[method-assign]

for _method in (
    "create_new_study",
    "get_all_studies",
    "get_study_directions",
    "get_study_id_from_name",
    "get_study_name_from_id",
    "get_study_system_attrs",
    "get_study_user_attrs",
    "set_study_system_attr",
    "set_study_user_attr",
    "_set_trial_param",
    "get_trial",
    "get_trial_id_from_study_id_trial_number",
    "get_trial_param",
    "get_trial_system_attrs",
    "get_trial_user_attrs",
    "_get_trials",
    "_get_best_trial_id",
    "set_trial_intermediate_value",
    "set_trial_system_attr",
    "set_trial_user_attr",
):
    setattr(SweepingStorage, _method, _waited(_method))
del _method
