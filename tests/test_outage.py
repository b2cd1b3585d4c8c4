"""Waiting out an outage: a step tried again after a commit whose answer was lost stores
nothing twice and returns what its first try did (study.store.outage, study.store.rdb).

The lost answer is real: each commit below is stored, then the session's commit raises, as
a connection cut between the server's COMMIT and its reply leaves the client. The store takes
that error for an outage, and the next try must find what the first stored. On SQLite and
PostgreSQL."""

from __future__ import annotations

import time
from datetime import datetime

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.orm import Session

from study import store
from study.errors import StorageError
from study.store import outage as outage_mod
from study.store.base import Ending, Take
from study.store.outage import Outage
from study.store.recovery import outage_silenced


class LostAnswer(Exception):
    """The server stored the commit; its answer never came."""


@pytest.fixture(params=["sqlite", "postgresql"])
def lossy(request, tmp_path, monkeypatch):
    """(store, study id, arm): `arm()` makes the next commit's answer get lost, once."""
    url = (
        f"sqlite:///{tmp_path}/o.db"
        if request.param == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    opened = store.open_store(store.parse(url), store.Heartbeat(5, 20, 1, outage=60))
    study = optuna.create_study(study_name="o", storage=opened.optuna)
    armed = {"on": False}

    real_commit = Session.commit

    def commit(session):
        real_commit(session)
        if armed["on"]:
            armed["on"] = False
            raise LostAnswer("the connection dropped before the commit's answer")

    lines: list[str] = []
    opened.outage.say = lines.append
    monkeypatch.setattr(outage_mod, "FIRST_PAUSE_S", 0.0)
    monkeypatch.setattr(
        type(opened),
        "transient",
        lambda self, e: "the server cannot be reached" if isinstance(e, LostAnswer) else None,
    )
    monkeypatch.setattr(Session, "commit", commit)

    def arm():
        armed["on"] = True

    yield opened, study._study_id, arm, lines
    assert not armed["on"], "the armed commit never happened"


def _running(x: float, at: datetime | None = None) -> FrozenTrial:
    dist = FloatDistribution(0.0, 1.0)
    return FrozenTrial(
        number=-1,
        state=TrialState.RUNNING,
        value=None,
        datetime_start=at or datetime.now(),
        datetime_complete=None,
        params={"x": x},
        distributions={"x": dist},
        user_attrs={"seed": int(x * 100)},
        system_attrs={},
        intermediate_values={},
        trial_id=-1,
    )


def _count(s: store.Store, study_id: int) -> int:
    return len(s.optuna.get_all_trials(study_id, deepcopy=False))


def test_bulk_steps_tried_again_after_a_lost_answer_store_nothing_twice(lossy):
    s, sid, arm, lines = lossy
    arm()
    ids = s.add_trials(sid, [_running(0.1), _running(0.2)], heartbeat=True, after_id=-1)
    assert [n for _, n in ids] == [0, 1] and _count(s, sid) == 2
    assert lines[0].startswith("sinstudy: storage unavailable: the server cannot be reached")
    assert lines[1].startswith("sinstudy: storage back after")
    (a, _), (b, _) = ids

    arm()
    s.append_values({a: {1: 0.5, 2: 0.4}, b: {1: 0.7}})  # a second insert: a unique violation
    assert s.optuna.get_trial(a).intermediate_values == {1: 0.5, 2: 0.4}

    arm()
    end = Ending(a, TrialState.COMPLETE, 0.4, {3: 0.4}, {"k": 1}, {}, datetime.now())
    assert s.finish_trials([end]) == [True]  # a blind second try: False, already finished
    assert s.optuna.get_trial(a).state == TrialState.COMPLETE

    arm()
    assert s.fail_and_retry(sid, s.optuna.get_trial(b), max_retries=1)
    waiting = [t for t in s.optuna.get_all_trials(sid) if t.state == TrialState.WAITING]
    assert len(waiting) == 1 and waiting[0].system_attrs["retry_history"] == [1]

    arm()
    assert s.take_queued(sid, waiting[0]._trial_id, range(500, 501)) == Take.TAKEN
    assert s.optuna.get_trial(waiting[0]._trial_id).user_attrs["seed"] == 500

    c, _ = s.add_trials(sid, [_running(0.3)], heartbeat=True)[0]
    arm()
    offered = iter([20, 900])  # 20: held by trial 1 (seed 20); a second try is offered 900 again
    assert s.claim_seed(sid, c, offered, repeats=1) == 900
    assert s.optuna.get_trial(c).user_attrs["seed"] == 900


def test_optunas_own_calls_tried_again_after_a_lost_answer_store_nothing_twice(lossy):
    """The standard engine's path: Optuna's ask (a new trial) and tell (its end)."""
    s, sid, arm, _ = lossy
    arm()
    tid = s.optuna.create_new_trial(sid)
    assert _count(s, sid) == 1
    arm()
    s.optuna.set_trial_intermediate_value(tid, 1, 0.3)
    arm()
    assert s.optuna.set_trial_state_values(tid, TrialState.COMPLETE, [0.3])
    t = s.optuna.get_trial(tid)
    assert (t.state, t.values, t.intermediate_values) == (TrialState.COMPLETE, [0.3], {1: 0.3})


def test_an_outage_past_its_bound_is_one_line_naming_the_cause_and_the_bound(monkeypatch):
    monkeypatch.setattr(outage_mod, "FIRST_PAUSE_S", 0.01)
    lines: list[str] = []
    o = Outage(0.05, say=lines.append)

    def step(again):
        raise ConnectionError("refused")

    with pytest.raises(StorageError) as e:
        o.run(step, lambda e: "the PostgreSQL server at h:5 cannot be reached (refused)")
    assert str(e.value).startswith("the PostgreSQL server at h:5 cannot be reached (refused); ")
    assert "past [study] storage_outage (0 s)" in str(e.value) and e.value.exit_code == 1
    assert len(lines) == 1  # said once when it began, however many tries


def test_a_failure_that_is_not_an_outage_is_raised_at_once_and_with_no_bound_too():
    tries = []

    def step(again):
        tries.append(again)
        raise ValueError("a bug")

    with pytest.raises(ValueError):
        Outage(60).run(step, lambda e: None)
    with pytest.raises(ConnectionError):
        Outage(0).run(lambda again: (_ for _ in ()).throw(ConnectionError()), lambda e: "down")
    assert tries == [False]


def test_no_trial_is_failed_for_a_silence_an_outage_caused(tmp_path):
    """Every heartbeat stops with the storage: for a grace period after an outage ends, a
    sweep fails no trial for its silence."""
    opened = store.open_store(store.parse(f"sqlite:///{tmp_path}/s.db"))
    assert not outage_silenced(opened, 20)
    opened.outage.ended = time.time() - 5
    assert outage_silenced(opened, 20) and not outage_silenced(opened, 4)
