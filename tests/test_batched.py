"""The batched engine against the reference loop (train.py), and end to end through the CLI."""

from __future__ import annotations

import math
import os
import signal
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import torch
from conftest import TINY_TOML, run_cli, spawned_children, start_cli
from optuna.trial import TrialState

from study.config import DataConfig, TrainConfig
from study.run.batched.stack import Stack, cuda_graph, eager, new_slot
from study.trial.data import make_data
from study.trial.train import train

REL = 1e-4  # float32: per-epoch validation MSE within this relative error
# scripts/gpu_check.sh runs the equivalence tests with SINSTUDY_TEST_DEVICE=cuda; CI uses the CPU.
DEVICE = os.environ.get("SINSTUDY_TEST_DEVICE", "cpu")


@pytest.fixture(scope="module")
def data():
    return make_data(DataConfig(n_train=200, n_val=64, n_test=128), DEVICE)


MIX = [  # different depth, width (also per layer), activation, lr, schedule, weight decay
    TrainConfig(depth=1, width=8, activation="tanh", lr=1e-2, seed=1),
    TrainConfig(
        depth=3,
        width=(16, 4, 9),
        activation="relu",
        lr=3e-3,
        scheduler="step",
        step_size=2,
        gamma=0.5,
        seed=2,
    ),
    TrainConfig(
        depth=2,
        width=12,
        activation="gelu",
        lr=5e-3,
        scheduler="exponential",
        gamma=0.8,
        weight_decay=1e-3,
        seed=3,
    ),
    TrainConfig(depth=4, width=6, activation="identity", lr=1e-3, scheduler="cosine", seed=4),
    TrainConfig(depth=2, width=20, activation="sigmoid", lr=2e-2, scheduler="none", seed=5),
    TrainConfig(depth=2, width=10, activation="silu", lr=4e-3, seed=6),
    TrainConfig(depth=3, width=7, activation="leaky_relu", lr=6e-3, seed=7),
    TrainConfig(depth=1, width=24, activation="elu", lr=8e-3, seed=8),
]


def _reference(cfg: TrainConfig, data) -> tuple[list[float], list[float]]:
    logs = []
    train(cfg, data, on_epoch=logs.append)
    return [log.val_mse for log in logs], [log.train_loss for log in logs]


def _close(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert abs(g - w) <= REL * abs(w), (got, want)


def _run(stack: Stack, epochs: int) -> tuple[list[list[float]], list[list[float]]]:
    vals, losses = [[] for _ in stack.slots], [[] for _ in stack.slots]
    for _ in range(epochs):
        loss, val = stack.train_epoch()
        for k in range(len(stack.slots)):
            vals[k].append(val[k].item())
            losses[k].append(loss[k].item())
    return vals, losses


@pytest.mark.parametrize("layout", [None, (5, 40)], ids=["rebuild", "fixed_capacity"])
@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_equivalence_mixed_configs_match_train_py_every_epoch(data, optimizer, layout):
    cfgs = [
        replace(
            c,
            optimizer=optimizer,
            max_epochs=8,
            lr=c.lr * (5 if optimizer == "sgd" else 1),
            weight_decay=c.weight_decay or (1e-2 if optimizer == "adamw" else 0.0),
        )
        for c in MIX
    ]
    stack = Stack([new_slot(c, DEVICE) for c in cfgs], data, layout=layout)
    vals, losses = _run(stack, 8)
    for k, slot in enumerate(stack.slots):  # build() orders slots by activation
        want_val, want_loss = _reference(slot.cfg, data)
        _close(vals[k], want_val)
        _close(losses[k], want_loss)
        # padding stays exactly zero: units past a slot's width, layers past its depth
        w = slot.cfg.widths
        for layer in range(stack.depth):
            weight, bias = stack.params[2 * layer][k], stack.params[2 * layer + 1][k]
            units = w[layer] if layer < slot.cfg.depth else 0
            assert not weight[:, units:].any() and not bias[:, units:].any()
        assert not stack.params[-2][k, w[-1] :].any()


def test_equivalence_survives_restacking_and_refill(data):
    """Remove a slot and add a fresh one between epochs: everyone still follows train.py."""
    cfgs = [replace(c, max_epochs=6) for c in MIX[:4]]
    stack = Stack([new_slot(c, DEVICE) for c in cfgs], data)
    first, _ = _run(stack, 3)
    before = {id(x): v for x, v in zip(stack.slots, first, strict=True)}
    stack.unstack()
    newcomer = new_slot(replace(MIX[5], max_epochs=3), DEVICE)
    leaver = stack.slots[1]
    stack.slots = [x for x in stack.slots if x is not leaver] + [newcomer]
    stack.build()
    second, _ = _run(stack, 3)
    for x, vals in zip(stack.slots, second, strict=True):
        if x is newcomer:
            _close(vals, _reference(x.cfg, data)[0])
        else:
            _close(before[id(x)] + vals, _reference(x.cfg, data)[0])


# On a GPU (scripts/gpu_check.sh) each epoch a captured CUDA graph, on the CPU the same
# plumbing replayed eagerly.
CAPTURE = cuda_graph if DEVICE.startswith("cuda") else eager


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_a_fixed_capacity_stack_refilled_in_place_follows_train_py(data, optimizer):
    """Fixed capacity: positions vacated as their models end and refilled in place by new
    models (same activation and depth, any width that fits), the buffers never reallocated;
    every model, refills included, follows train.py epoch by epoch; a free position holds
    zero weights and trains nothing. The same stack with its epoch captured once and replayed
    (EpochGraph) gives the same numbers bit for bit, captured again only when a refill brings
    the first weight decay."""

    def cfg(c, epochs, **kw):
        lr = kw.pop("lr", c.lr) * (5 if optimizer == "sgd" else 1)
        return replace(c, optimizer=optimizer, lr=lr, max_epochs=epochs, **kw)

    first = [cfg(c, 6, weight_decay=0.0) for c in MIX[:5]] + [cfg(MIX[4], 6, seed=13)]
    plain = Stack([new_slot(c, DEVICE) for c in first], data, layout=(4, 24))
    graphed = Stack([new_slot(c, DEVICE) for c in first], data, layout=(4, 24), capture=CAPTURE)
    addresses = [f.data_ptr() for f in plain.flat]
    refills = {  # after epoch: (the config that leaves, the one that takes its place)
        2: (first[0], cfg(MIX[0], 4, width=24, lr=2e-2, seed=11)),
        3: (first[4], cfg(MIX[4], 3, width=(3, 17), seed=12, weight_decay=1e-3)),
        4: (first[1], None),  # left free
    }
    curves: dict[int, list[float]] = {id(c): [] for c in first}
    for epoch in range(1, 7):
        _, val = plain.train_epoch()
        _, val_graphed = graphed.train_epoch()
        assert torch.equal(val, val_graphed), epoch
        for k, x in enumerate(plain.slots):
            if not x.empty:
                curves[id(x.cfg)].append(val[k].item())
        if epoch in refills:
            leaving, coming = refills[epoch]
            k = next(k for k, x in enumerate(plain.slots) if x.cfg is leaving and not x.empty)
            for stack in (plain, graphed):
                stack.vacate(k)
                assert stack.free() == [k] and stack.members == len(stack.slots) - 1
                if coming is not None:
                    stack.refill(k, new_slot(coming, DEVICE))
            if coming is not None:
                curves[id(coming)] = []
    assert [f.data_ptr() for f in plain.flat] == addresses
    assert graphed.graph.captures == 2  # at the start, and for the first weight decay
    free = plain.free()
    assert len(free) == 1 and not plain.p[free[0]].any()
    for c in [*first, *(c for _, c in refills.values() if c)]:
        got = curves[id(c)]
        assert len(got) == {id(first[0]): 2, id(first[4]): 3, id(first[1]): 4}.get(id(c), len(got))
        _close(got, _reference(c, data)[0][: len(got)])
    assert [len(curves[id(c)]) for _, c in refills.values() if c] == [4, 3]


def test_equivalence_best_weights_and_test_mse(data):
    cfgs = [replace(c, max_epochs=10) for c in MIX[:3]]
    stack = Stack([new_slot(c, DEVICE) for c in cfgs], data)
    best = [float("inf")] * 3
    for _ in range(10):
        _, val = stack.train_epoch()
        improved = [v < b for v, b in zip(val.tolist(), best, strict=True)]
        best = [min(v, b) for v, b in zip(val.tolist(), best, strict=True)]
        stack.keep_best(torch.tensor(improved, device=DEVICE))
    for k, slot in enumerate(stack.slots):
        ref = train(slot.cfg, data)
        model = stack.slot_model(k, "best")
        got = torch.mean((model(data.x_test) - data.y_test) ** 2).item()
        assert got == pytest.approx(ref.test_mse, rel=1e-3)
        assert best[k] == pytest.approx(ref.best_val_mse, rel=REL)
        assert sum(p.numel() for p in model.parameters()) == ref.n_params


def test_a_diverging_slot_leaves_the_others_alone(data):
    wild = TrainConfig(
        depth=3,
        width=16,
        activation="relu",
        lr=1e6,
        optimizer="sgd",
        scheduler="none",
        max_epochs=5,
        seed=9,
    )
    calm = [replace(c, optimizer="sgd", lr=0.05, max_epochs=5) for c in MIX[:3]]
    stack = Stack([new_slot(c, DEVICE) for c in [wild, *calm]], data)
    vals, losses = _run(stack, 5)
    for k, slot in enumerate(stack.slots):
        if slot.cfg is wild:
            # NaN or inf appeared
            assert not all(v == v and abs(v) < float("inf") for v in losses[k])
        else:
            _close(vals[k], _reference(slot.cfg, data)[0])


# ------------------------------------------------------------------ the engine, end to end

TINY = ["--config", "tiny.toml", "--max-epochs", "6", "--no-progress"]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_batched_run_writes_what_the_standard_engine_writes(workdir, backend, request):
    """On both RDB backends: the writer's bulk trial writes (study.bulk) end to end."""
    url = (
        "sqlite:///storage/sinstudy.db"
        if backend == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    r = run_cli(
        "run",
        *TINY,
        "--engine",
        "batched",
        "--slots",
        "4",
        "--n-trials",
        "14",
        "--storage",
        url,
        cwd=workdir,
    )
    assert r.returncode == 0, r.stderr
    study = optuna.load_study(study_name="sinstudy", storage=url)
    trials = study.trials
    # 14 > 4 slots: refilled
    assert len(trials) == 14 and [t.number for t in trials] == list(range(14))
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert complete
    for t in complete:
        assert set(t.params) == {"depth", "width", "lr", "activation"}
        assert sorted(t.intermediate_values) == list(range(1, 7))
        assert t.value == pytest.approx(min(t.intermediate_values.values()))
        for key in (
            "test_mse",
            "final_val_mse",
            "final_test_mse",
            "best_epoch",
            "n_params",
            "epochs",
            "seconds",
            "compute_seconds",
            "device",
            "seed",
            "train_optimizer",
            "train_max_epochs",
        ):
            assert key in t.user_attrs, key
        assert t.datetime_complete >= t.datetime_start
        assert 0 < t.user_attrs["compute_seconds"] <= t.user_attrs["seconds"] + 1e-3
    # a trial's share of the device, not its start-to-end time: the shares add up to at most
    # the study's span, where the start-to-end times of trials trained together exceed it
    span = max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)
    assert sum(t.user_attrs["compute_seconds"] for t in complete) <= span.total_seconds() + 0.1
    assert any(t.user_attrs["compute_seconds"] < 0.9 * t.user_attrs["seconds"] for t in complete)
    for t in trials:
        if t.state == TrialState.PRUNED:
            assert "pruned_reason" in t.user_attrs
            assert sorted(t.intermediate_values) == list(range(1, len(t.intermediate_values) + 1))
    best = study.best_trial
    metas = optuna.artifacts.get_all_artifact_meta(best, storage=study._storage)
    assert {m.mimetype for m in metas} == {"application/octet-stream", "image/png"}
    runs = sorted(p.name for p in (workdir / "storage/tensorboard/sinstudy").glob("trial-*"))
    assert runs == [f"trial-{i:04d}" for i in range(14)]
    r = run_cli("best", "--storage", url, cwd=workdir)
    assert r.returncode == 0 and f"#{best.number}" in r.stdout


def test_batched_diverging_trials_are_stored_pruned_with_the_reason(workdir):
    """Diverged slots leave the stack as the standard engine's trials do: PRUNED, with
    pruned_reason and the attrs of the epochs they had; the others are unaffected."""
    toml = (workdir / "tiny.toml").read_text().replace("lr = [1e-3, 3e-2]", "lr = [1e-3, 1e6]")
    (workdir / "wild.toml").write_text(
        toml.replace("[train]\n", '[train]\noptimizer = "sgd"\nscheduler = "none"\n')
        + '\n[study]\npruner = "none"\n'
    )
    r = run_cli(
        "run",
        "--config",
        "wild.toml",
        "--max-epochs",
        "5",
        "--no-progress",
        "--slots",
        "4",
        "--n-trials",
        "12",
        cwd=workdir,
    )
    assert r.returncode == 0, r.stderr
    study = optuna.load_study(study_name="sinstudy", storage="sqlite:///storage/sinstudy.db")
    diverged = [t for t in study.trials if "non-finite" in t.user_attrs.get("pruned_reason", "")]
    calm = [t for t in study.trials if t.params["lr"] < 1e-1]
    assert diverged and calm, [(t.params["lr"], t.state) for t in study.trials]
    for t in diverged:
        assert (
            t.state == TrialState.PRUNED
            and t.user_attrs["epochs"] == len(t.intermediate_values) < 5
        )
        assert all(math.isfinite(v) for v in t.intermediate_values.values())
    for t in calm:
        assert t.state == TrialState.COMPLETE and sorted(t.intermediate_values) == [1, 2, 3, 4, 5]


def test_batched_same_seed_same_study(workdir, monkeypatch):
    """Also across processes whose str hashing differs (PYTHONHASHSEED): with several stacks
    (two depths here), their order must not come from iterating a set."""
    out = []
    for name, hash_seed in (("a", "1"), ("b", "2")):
        monkeypatch.setenv("PYTHONHASHSEED", hash_seed)
        folder = workdir / name  # a folder each: each storage its own TensorBoard runs
        folder.mkdir()
        (folder / "tiny.toml").write_text((workdir / "tiny.toml").read_text())
        r = run_cli("run", *TINY, "--slots", "6", "--n-trials", "14", cwd=folder)
        assert r.returncode == 0, r.stderr
        trials = optuna.load_study(
            study_name="sinstudy", storage=f"sqlite:///{folder}/storage/sinstudy.db"
        ).trials
        assert {t.params["depth"] for t in trials} == {1, 2}
        out.append([(t.number, str(t.params), t.state.name, t.value) for t in trials])
    assert out[0] == out[1]


@pytest.mark.parametrize(
    "signum, target, code",
    [
        (signal.SIGTERM, "process", 143),  # `kill PID`
        (signal.SIGINT, "group", 130),  # a terminal's Ctrl-C reaches every process, the writer too
    ],
)
def test_batched_interrupt_writes_live_trials_as_fail(workdir, signum, target, code):
    """The trainer writes its live trials as FAIL with their curves; the writer ignores the
    signal and stays to store them."""
    (workdir / "slow.toml").write_text(
        (workdir / "tiny.toml").read_text() + '\n[study]\npruner = "none"\n'
    )
    # 20,000 epochs: far longer than the test waits (the engine does 400 tiny epochs in ~1 s)
    proc = start_cli(
        "run",
        "--config",
        "slow.toml",
        "--max-epochs",
        "20000",
        "--no-progress",
        "--slots",
        "3",
        "--n-trials",
        "20",
        cwd=workdir,
    )
    # The engine starts its writer process inside the signal handlers' scope: once the CLI has a
    # child process, Ctrl-C / SIGTERM are handled; a second later, epochs are under way.
    _wait_for_writer(proc, workdir)
    time.sleep(1.0)
    (os.killpg if target == "group" else os.kill)(proc.pid, signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert f"interrupted by {signal.Signals(signum).name}" in out and "Traceback" not in err
    study = optuna.load_study(study_name="sinstudy", storage="sqlite:///storage/sinstudy.db")
    states = Counter(t.state for t in study.trials)
    assert states == Counter({TrialState.FAIL: 3}), (states, err)
    runs = sorted(p.name for p in (workdir / "storage/tensorboard/sinstudy").glob("trial-*"))
    # each FAIL trial's curve so far
    assert runs == [f"trial-{t.number:04d}" for t in study.trials]
    for t in study.trials:
        assert t.intermediate_values and t.user_attrs["failed_reason"] == "interrupted"


def _wait_for_writer(proc, workdir, trials_done: int = 0) -> None:
    """Until the run's writer process exists (and, with `trials_done`, that many are stored)."""
    deadline = time.time() + 60
    while not spawned_children(proc.pid) or (trials_done and _stored(workdir) < trials_done):
        assert time.time() < deadline and proc.poll() is None, proc.poll()
        time.sleep(0.1)


def _stored(workdir) -> int:
    db = workdir / "storage/sinstudy.db"
    if not db.exists():
        return 0
    try:
        return len(optuna.load_study(study_name="sinstudy", storage=f"sqlite:///{db}").trials)
    except Exception:  # the study is being created
        return 0


def test_killed_trainer_fails_its_trials_at_once_and_the_resume_retries_them(workdir):
    """SIGKILL of the trainer: the writer stores what it was handed, fails the trials still
    training and queues their retries (no waiting for the grace period), then exits with one
    line; a resumed run takes the retries first."""
    proc = start_cli(
        "run",
        *TINY[:2],
        "--max-epochs",
        "40",
        "--no-progress",
        "--slots",
        "3",
        "--n-trials",
        "400",
        cwd=workdir,
    )
    _wait_for_writer(proc, workdir, trials_done=3)
    writer = spawned_children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)  # its pipes close when the writer has gone too
    assert not [
        pid
        for pid in writer
        if Path(f"/proc/{pid}").exists()
        and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
    ]
    assert "Traceback" not in err and "the training process died" in err, err
    study = optuna.load_study(study_name="sinstudy", storage="sqlite:///storage/sinstudy.db")
    states = Counter(t.state for t in study.trials)
    assert (
        states[TrialState.RUNNING] == 0
        and 1 <= states[TrialState.FAIL] == states[TrialState.WAITING] <= 3
    ), states
    failed = {t.number: t for t in study.trials if t.state == TrialState.FAIL}
    for t in study.trials:
        assert sorted(t.intermediate_values) == list(range(1, len(t.intermediate_values) + 1))
        if t.state == TrialState.COMPLETE:
            assert len(t.intermediate_values) == 40 and "test_mse" in t.user_attrs
        if t.state == TrialState.WAITING:
            assert t.params == failed[t.system_attrs["failed_trial"]].params
    r = run_cli("run", *TINY, "--n-trials", "4", "--slots", "2", cwd=workdir)
    assert r.returncode == 0, r.stderr
    study = optuna.load_study(study_name="sinstudy", storage="sqlite:///storage/sinstudy.db")
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    retried = {
        t.system_attrs["failed_trial"]: t for t in study.trials if "failed_trial" in t.system_attrs
    }
    assert set(retried) == set(failed)
    for number, t in retried.items():
        assert (
            t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            and t.params == failed[number].params
        )
        # a retry trains as the trial it repeats: its seed, so no other trial shares one
        assert t.user_attrs["seed"] == failed[number].user_attrs["seed"]


def test_a_failing_writer_is_one_clear_error(tmp_path):
    """The writer cannot store (here: the study it should write to does not exist): the trainer
    gets one line naming the cause, not a hang or a traceback from another process."""
    from study import config
    from study.run.batched.messages import Known
    from study.run.batched.writer import Writer, WriterError
    from study.run.opening import open_study_store

    optuna.create_study(study_name="other", storage=f"sqlite:///{tmp_path}/s.db")
    cfg = config.build(
        {},
        study="missing",
        storage=f"sqlite:///{tmp_path}/s.db",
        log_dir=str(tmp_path / "tb"),
        artifact_dir=str(tmp_path / "art"),
    )
    w = Writer(cfg, open_study_store(cfg), Known(-1, {}))
    with pytest.raises(WriterError) as e:
        deadline = time.time() + 60
        while time.time() < deadline:
            w.poll()
            time.sleep(0.1)
    assert "missing" in str(e.value) and "\n" not in str(e.value)
    w.close(publish=False)
    assert w.proc.exitcode == 0


def test_the_writer_beats_while_a_job_runs_and_stops_when_its_loop_is_stuck(tmp_path, monkeypatch):
    """Heartbeats come from the writer's own thread: a job longer than grace_period (a big
    TensorBoard run on a loaded machine) must not let another engine's sweep fail a live trial;
    a writer whose loop stops coming round must let its trials go stale."""
    import queue

    from study import config
    from study.quiet import experimental
    from study.run.batched import messages, writer
    from study.run.budget import Claims
    from study.run.opening import open_study_store

    cfg = config.build(
        {"study": {"heartbeat_interval": 1, "grace_period": 2}},
        study="sinstudy",
        storage=f"sqlite:///{tmp_path}/s.db",
        log_dir=str(tmp_path / "tb"),
        artifact_dir=str(tmp_path / "art"),
    )
    opened = open_study_store(cfg)
    storage = opened.optuna
    study = optuna.create_study(study_name="sinstudy", storage=storage)
    sink = writer._Sink(cfg, opened, messages.Known(-1, {}), queue.Queue(), Claims(None))

    def held_trial() -> int:
        with pytest.warns(UserWarning, match="Heartbeat"):  # "meant for Study.optimize"
            trial_id = study.ask()._trial_id
        storage.record_heartbeat(trial_id)
        with sink.held.lock:
            sink.held.ids[trial_id] = trial_id
        return trial_id

    def state_after(seconds: float, trial_id: int) -> TrialState:
        time.sleep(seconds)
        with experimental():  # a sibling engine's sweep
            optuna.storages.fail_stale_trials(study)
        return study._storage.get_trial(trial_id).state

    sink.keeper.looped = time.monotonic()  # the loop came round, then a job runs for 3.5 s
    assert state_after(3.5, held_trial()) == TrialState.RUNNING
    monkeypatch.setattr(writer, "STUCK_S", 0.5)  # now the loop is stuck
    assert state_after(3.5, held_trial()) == TrialState.FAIL


@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_bench_script_runs_both_engines_and_ends_with_the_speedup(tmp_path, storage):
    """scripts/bench.py on a tiny budget: the raw line, both engines' rows, and the ratio as its
    last line (the numbers themselves are for the README, not for a test)."""
    import re
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(
        [
            sys.executable,
            str(root / "scripts/bench.py"),
            "--n-trials",
            "6",
            "--max-epochs",
            "3",
            "--raw",
            "4",
            "--storage",
            storage,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("raw engine, 4 mixed models in ")
    assert lines[1].startswith(f"writer, {storage}: trial start ")
    rows = {
        line.split("|")[1].strip(): line
        for line in lines
        if line.startswith("| standard") or line.startswith("| batched")
    }
    assert set(rows) == {"standard", "batched"}
    for line in rows.values():
        assert line.split("|")[2].strip() == "6"  # every trial of the budget finished
    assert re.fullmatch(r"speedup \d+\.\dx", lines[-1])


def _tiny_batched(tmp_path: Path, study: str, **overrides):
    """An in-process batched study's config: the tiny space and data, 6 slots, its own files."""
    import tomllib

    from study import config

    return config.build(
        tomllib.loads(TINY_TOML),
        study=study,
        storage=f"sqlite:///{tmp_path}/s.db",
        engine="batched",
        slots=6,
        log_dir=str(tmp_path / "tb"),
        artifact_dir=str(tmp_path / "artifacts"),
        **overrides,
    )


def _study_with(tmp_path: Path, pruner: str, asks: list) -> list[tuple]:
    """A tiny batched study (27 epochs: Hyperband's and halving's rungs at 1, 3, 9, 27; the
    median's warm-up 2); per trial what the pruner decided: state, epochs, params, value."""
    from study.run import runner

    cfg = _tiny_batched(tmp_path, "rungs", n_trials=20, max_epochs=27, seed=3, pruner=pruner)
    ask = optuna.Trial.should_prune

    def counted(trial):
        asks.append(trial.number)
        return ask(trial)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(optuna.Trial, "should_prune", counted)
        runner.run(cfg, progress=False, say=lambda line: None)
    trials = optuna.load_study(study_name="rungs", storage=cfg.storage).trials
    return [
        (t.number, t.state, max(t.intermediate_values), t.params, t.value, t.system_attrs)
        for t in trials
    ]


@pytest.mark.parametrize("pruner", ["hyperband", "sha", "median", "none"])
def test_the_pruner_asked_only_at_its_rungs_decides_as_when_asked_every_epoch(
    tmp_path, monkeypatch, pruner
):
    """A whole study, asking the pruner at every epoch and only where it can act (rungs.py):
    the same trials pruned at the same epochs, the same values and rung attrs, with fewer asks."""
    from study.run.batched import rungs

    every_asks, rung_asks = [], []
    monkeypatch.setattr(rungs, "schedule", lambda pruner: rungs.EveryEpoch())
    every = _study_with(tmp_path / "every", pruner, every_asks)
    monkeypatch.undo()
    at_rungs = _study_with(tmp_path / "rungs", pruner, rung_asks)
    assert [t[:4] for t in at_rungs] == [t[:4] for t in every]
    for got, want in zip(at_rungs, every, strict=True):
        assert got[4] == pytest.approx(want[4], rel=1e-9)
        rung_attrs = {k: v for k, v in want[5].items() if k.startswith("completed_rung_")}
        assert {k: v for k, v in got[5].items() if k.startswith("completed_rung_")} == rung_attrs
    pruned = [t for t in every if t[1] == TrialState.PRUNED]
    if pruner == "none":
        assert not pruned and not rung_asks
    else:  # the comparison means something: the pruner stopped trials at several epochs
        assert len({t[2] for t in pruned}) >= 2, pruned
        assert len(rung_asks) < len(every_asks) * (1 if pruner == "median" else 0.5)


def test_a_study_on_fixed_capacity_stacks_trains_every_trial_as_train_py(tmp_path, monkeypatch):
    """--stacks fixed on a whole study: trials end at Hyperband's rungs and new ones take their
    slots in place (counted), each stack's epochs replayed from one capture (EpochGraph); every
    trial's stored curve is train.py's for its config."""

    from study.run import runner
    from study.run.batched import engine
    from study.trial.attrs import train_config

    refills = []
    refill = Stack.refill
    monkeypatch.setattr(
        Stack, "refill", lambda stack, k, slot: refills.append(k) or refill(stack, k, slot)
    )
    # each stack's epochs through EpochGraph, as on a GPU (there a CUDA graph)
    monkeypatch.setattr(engine, "_capture", lambda device: CAPTURE)
    graphs = []
    init = Stack.__init__

    def made(stack, *args, **kwargs):
        init(stack, *args, **kwargs)
        graphs.append(stack.graph)

    monkeypatch.setattr(Stack, "__init__", made)
    cfg = _tiny_batched(
        tmp_path, "fixed", n_trials=16, max_epochs=9, seed=5, stacks="fixed", device=DEVICE
    )
    runner.run(cfg, progress=False, say=lambda line: None)
    trials = optuna.load_study(study_name="fixed", storage=cfg.storage).trials
    assert len(trials) == 16 and {t.state for t in trials} <= {
        TrialState.COMPLETE,
        TrialState.PRUNED,
    }
    assert refills, "no trial took an ended one's slot in place"
    assert graphs and all(g is not None and g.captures >= 1 for g in graphs)
    data = make_data(cfg.data, DEVICE)
    for t in trials:
        got = [t.intermediate_values[e] for e in sorted(t.intermediate_values)]
        _close(got, _reference(train_config(t), data)[0][: len(got)])
