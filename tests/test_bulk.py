"""study.store stores a finished trial exactly as Optuna's create_new_trial stores it."""

from __future__ import annotations

import math
import multiprocessing as mp
import threading
import uuid
from datetime import datetime, timedelta

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from study import store
from study.store.base import Take
from study.store.rdb import RDBStore

DISTRIBUTIONS = {
    "depth": IntDistribution(1, 6),
    "width": IntDistribution(8, 256, log=True),
    "lr": FloatDistribution(1e-5, 1e-1, log=True),
    "dropout": FloatDistribution(0.0, 0.5, step=0.1),
    "activation": CategoricalDistribution(["relu", "tanh", None]),
}


def trials() -> list[FrozenTrial]:
    start = datetime(2026, 11, 26, 9, 30, 15, 123456)
    common = dict(distributions=DISTRIBUTIONS, trial_id=0, number=0, datetime_start=start)
    params = {"depth": 3, "width": 64, "lr": 0.00123, "dropout": 0.2, "activation": "tanh"}
    return [
        FrozenTrial(
            state=TrialState.COMPLETE,
            value=1.5e-7,
            datetime_complete=start + timedelta(seconds=3.25),
            params=params,
            user_attrs={"test_mse": 2e-7, "curve": [1.0, 0.5], "nested": {"a": None, "b": "x"}},
            system_attrs={"fixed": True},
            intermediate_values={i: 1.0 / i for i in range(1, 101)},
            **common,
        ),
        FrozenTrial(
            state=TrialState.PRUNED,
            value=0.25,
            datetime_complete=start + timedelta(seconds=1),
            params={**params, "activation": None},
            user_attrs={"pruned_reason": "pruner stopped it after epoch 3"},
            system_attrs={},
            intermediate_values={1: 0.5, 2: math.inf, 3: 0.25},
            **common,
        ),
        FrozenTrial(
            state=TrialState.PRUNED,
            value=math.inf,
            datetime_complete=start + timedelta(seconds=1),
            params=params,
            user_attrs={},
            system_attrs={},
            intermediate_values={1: math.nan, 2: -math.inf},
            **common,
        ),
        FrozenTrial(
            state=TrialState.FAIL,
            value=None,
            datetime_complete=start + timedelta(seconds=2),
            params=params,
            user_attrs={"failed_reason": "interrupted"},
            system_attrs={},
            intermediate_values={},
            **common,
        ),
        FrozenTrial(
            state=TrialState.RUNNING,
            value=None,
            datetime_complete=None,
            params={},
            user_attrs={},
            system_attrs={},
            intermediate_values={1: 3.0},
            distributions={},
            trial_id=0,
            number=0,
            datetime_start=start,
        ),
    ]


def fields(t: FrozenTrial) -> dict:
    """Everything a stored trial has but its id; NaN made comparable."""
    d = {
        k: getattr(t, k)
        for k in (
            "number",
            "state",
            "values",
            "datetime_start",
            "datetime_complete",
            "params",
            "distributions",
            "user_attrs",
            "system_attrs",
        )
    }
    d["intermediate_values"] = {
        k: "nan" if math.isnan(v) else v for k, v in t.intermediate_values.items()
    }
    return d


def compare_on(url: str) -> None:
    s = store.open_store(store.parse(url)).optuna
    name = uuid.uuid4().hex[:8]
    ref = optuna.create_study(storage=s, study_name=f"optuna-{name}")
    ours = optuna.create_study(storage=s, study_name=f"bulk-{name}")
    numbers = []
    for t in trials():
        s.create_new_trial(ref._study_id, template_trial=t)
        numbers.append(store.of(s).add_trial(ours._study_id, t)[1])
    expected = [fields(t) for t in ref.get_trials(deepcopy=False)]
    got = [fields(t) for t in ours.get_trials(deepcopy=False)]
    assert numbers == list(range(len(expected)))
    assert got == expected
    # and Optuna reads them as it reads its own: best trial, values of the pruned one
    assert ours.best_trial.number == 0 and ours.best_value == pytest.approx(1.5e-7, rel=0)


def test_bulk_trial_equals_optunas_on_sqlite(tmp_path):
    compare_on(f"sqlite:///{tmp_path}/s.db")


def test_bulk_trial_equals_optunas_on_postgresql(pg_url):
    compare_on(pg_url)


def test_bulk_trial_on_journal_goes_through_optuna(tmp_path):
    s = store.open_store(store.parse(f"journal:///{tmp_path}/s.log")).optuna
    study = optuna.create_study(storage=s, study_name="j")
    for t in trials():
        store.of(s).add_trial(study._study_id, t)
    assert [t.state for t in study.get_trials()] == [t.state for t in trials()]


def _add_many(url: str, study: str, n: int) -> None:
    s = store.open_store(store.parse(url)).optuna
    sid = s.get_study_id_from_name(study)
    for _ in range(n):
        store.of(s).add_trial(sid, trials()[0])


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_concurrent_bulk_writers_number_trials_without_gaps_or_repeats(tmp_path, backend, request):
    url = (
        f"sqlite:///{tmp_path}/s.db" if backend == "sqlite" else request.getfixturevalue("pg_url")
    )
    name = f"concurrent-{uuid.uuid4().hex[:8]}"
    optuna.create_study(storage=store.open_store(store.parse(url)).optuna, study_name=name)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_add_many, args=(url, name, 15)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    study = optuna.load_study(study_name=name, storage=store.open_store(store.parse(url)).optuna)
    assert sorted(t.number for t in study.get_trials()) == list(range(45))


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_engines_checking_at_the_same_moment_store_one_parameter_set_once(
    tmp_path, backend, request, monkeypatch
):
    """Two engines add the same parameter set, each having checked what others stored before
    either inserts (the race CI met: SQLite ran the check outside the write transaction, so
    both found nothing and both stored it). The check and the insert are one step: one wins."""
    url = f"sqlite:///{tmp_path}/s.db"
    if backend == "postgresql":
        url = request.getfixturevalue("pg_url")
    name = f"race-{uuid.uuid4().hex[:8]}"
    optuna.create_study(storage=store.open_store(store.parse(url)).optuna, study_name=name)
    both_checked = threading.Barrier(2)
    check = RDBStore._taken_after

    def check_then_wait(*args, **kwargs):
        taken = check(*args, **kwargs)
        try:  # the other engine checks now too, unless the storage holds it back till this commits
            both_checked.wait(timeout=2)
        except threading.BrokenBarrierError:
            pass
        return taken

    monkeypatch.setattr(RDBStore, "_taken_after", check_then_wait)
    got: list = []

    def engine(seed: int) -> None:
        s = store.open_store(store.parse(url)).optuna
        sid = s.get_study_id_from_name(name)
        got.extend(
            store.of(s).add_trials(
                sid, [trials()[0]], heartbeat=True, after_id=-1, seeds=[range(seed, seed + 1)]
            )
        )

    threads = [threading.Thread(target=engine, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(got) == 2 and sum(g is not None for g in got) == 1, got
    study = optuna.load_study(study_name=name, storage=store.open_store(store.parse(url)).optuna)
    assert len(study.get_trials()) == 1


def _seeded(url: str) -> tuple[optuna.storages.BaseStorage, int, list[int]]:
    """A study whose trial #0 holds seed 10 (and 11, with two repeats), and two RUNNING
    trials."""
    s = store.open_store(store.parse(url)).optuna
    name = f"seeds-{uuid.uuid4().hex[:8]}"
    sid = optuna.create_study(storage=s, study_name=name)._study_id
    ids = [s.create_new_trial(sid) for _ in range(3)]
    s.set_trial_user_attr(ids[0], "seed", 10)
    return s, sid, ids


@pytest.mark.parametrize("backend", ["sqlite", "journal", "postgresql"])
def test_a_seed_is_checked_and_stored_in_one_step_clear_of_every_other_trials_seeds(
    tmp_path, backend, request
):
    """Chaos seed 201: a standard trial stored its seed, then checked it, and its engine was
    killed in between; it kept a seed another trial had, and its retry trained with it. Now the
    check and the store are one step. With repeats, a trial's seeds are a run from its first:
    two runs whose --seed differs by less than --repeats overlap."""
    url = {
        "sqlite": f"sqlite:///{tmp_path}/s.db",
        "journal": f"journal:///{tmp_path}/s.log",
        "postgresql": request.getfixturevalue("pg_url") if backend == "postgresql" else "",
    }[backend]
    s, sid, (_, a, b) = _seeded(url)  # #0 holds 10, 11
    assert store.of(s).claim_seed(sid, a, [9, 11, 12], repeats=2) == 12  # 9, 10 and 11, 12 meet it
    assert s.get_trial(a).user_attrs == {"seed": 12, "seeds": [12, 13]}
    assert store.of(s).claim_seed(sid, b, [13, 14], repeats=2) == 14
    # a retry may share the seeds of the trial it retries (its chain), no one else's
    assert store.of(s).claim_seed(sid, b, [10, 20], repeats=2, chain={0}) == 10
    assert s.get_trial(b).user_attrs == {"seed": 10, "seeds": [10, 11]}
    # taking a queued trial: the state change and the seed check are one step too
    name = s.get_study_name_from_id(sid)
    optuna.load_study(study_name=name, storage=s).enqueue_trial({})
    queued = s.get_all_trials(sid)[-1]._trial_id
    assert store.of(s).take_queued(sid, queued, range(13, 15)) is Take.SEED  # #1 holds 13
    assert s.get_trial(queued).state == TrialState.WAITING
    assert store.of(s).take_queued(sid, queued, range(30, 32)) is Take.TAKEN
    got = s.get_trial(queued)
    assert got.state == TrialState.RUNNING and got.user_attrs == {"seed": 30, "seeds": [30, 31]}
    assert got.datetime_start is not None
    assert store.of(s).take_queued(sid, queued, range(40, 42)) is Take.GONE


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_trials_claiming_one_seed_at_the_same_moment_get_two(
    tmp_path, backend, request, monkeypatch
):
    """Each reads the seeds held before either writes, unless the study lock holds the second
    back until the first commits: then the second sees the first's seed and moves on."""
    url = f"sqlite:///{tmp_path}/s.db"
    if backend == "postgresql":
        url = request.getfixturevalue("pg_url")
    s, sid, (_, a, b) = _seeded(url)
    both_read = threading.Barrier(2)
    read = RDBStore._held_rdb

    def read_then_wait(*args):
        held = read(*args)
        try:
            both_read.wait(timeout=2)
        except threading.BrokenBarrierError:
            pass
        return held

    monkeypatch.setattr(RDBStore, "_held_rdb", read_then_wait)
    got: dict[int, int] = {}

    def claim(trial_id: int, fallback: int) -> None:
        own = store.open_store(store.parse(url)).optuna
        got[trial_id] = store.of(own).claim_seed(sid, trial_id, [5, fallback], repeats=1)

    threads = [threading.Thread(target=claim, args=x) for x in ((a, 6), (b, 7))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(got.values()) in ([5, 6], [5, 7]), got
