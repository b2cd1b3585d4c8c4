"""Repeats: a trial trains S seeds side by side and reports their mean curve, in both engines."""

from __future__ import annotations

import os
import re
import statistics
from dataclasses import replace

import optuna
import pytest
from conftest import run_cli
from optuna.trial import TrialState

from study import config
from study.config import TrainConfig
from study.run import runner
from study.trial.attrs import train_config
from study.trial.data import make_data
from study.trial.train import train, train_repeats

REL = 1e-4  # float32: the batched engine against train.py
# scripts/gpu_check.sh runs the repeat equivalence on CUDA with SINSTUDY_TEST_DEVICE=cuda
DEVICE = os.environ.get("SINSTUDY_TEST_DEVICE", "cpu")
EPOCHS = 6
TOML = {
    "data": {"n_train": 96, "n_val": 32, "n_test": 64},
    "train": {"batch_size": 32},
    "search_space": {
        "depth": [1, 2],
        "width": [4, 12],
        "lr": [1e-3, 3e-2],
        "activation": ["tanh", "relu", "gelu"],
    },
}
# keys every trial carried before repeats existed; one repeat must not add any
ONE_MODEL_KEYS = {
    "engine",
    "seed",
    "worker",
    "run",
    "test_mse",
    "final_val_mse",
    "final_test_mse",
    "best_epoch",
    "n_params",
    "epochs",
    "seconds",
    "compute_seconds",
    "device",
    "model_artifact",
    *(
        f"train_{f}"
        for f in (
            "momentum",
            "optimizer",
            "weight_decay",
            "scheduler",
            "step_size",
            "gamma",
            "batch_size",
            "max_epochs",
        )
    ),
}


def _run(
    tmp_path, *, engine: str, repeats: int, toml=TOML, n_trials: int = 3, name: str = "r"
) -> tuple:
    cfg = config.build(
        toml,
        study=name,
        storage=f"sqlite:///{tmp_path}/r.db",
        n_trials=n_trials,
        max_epochs=EPOCHS,
        pruner="none",
        engine=engine,
        repeats=repeats,
        device=DEVICE,
        seed=5,
        log_dir=str(tmp_path / "tb"),
        artifact_dir=str(tmp_path / "art"),
    )
    runner.run(cfg, progress=False, say=lambda line: None)
    return cfg, optuna.load_study(study_name=name, storage=cfg.storage)


def _trial_config(t: optuna.trial.FrozenTrial) -> TrainConfig:
    return train_config(t)


@pytest.fixture(scope="module")
def data():
    return make_data(config.build(TOML).data, DEVICE)


@pytest.mark.parametrize("engine", ["batched", "standard"])
def test_repeat_trial_reports_the_mean_of_train_py_seeds(tmp_path, data, engine):
    cfg, study = _run(tmp_path, engine=engine, repeats=3)
    assert len(study.trials) == 3
    for t in study.trials:
        assert t.state == TrialState.COMPLETE
        seeds = t.user_attrs["seeds"]
        assert (
            seeds == [cfg.seed + 3 * t.number + r for r in range(3)]
            and t.user_attrs["repeats"] == 3
        )
        base = _trial_config(t)
        curves = []
        for s in seeds:  # each seed alone through the reference loop
            curves.append([])
            train(
                replace(base, seed=s),
                data,
                on_epoch=lambda log, c=curves[-1]: c.append(log.val_mse),
            )
        mean = [statistics.fmean(c[e] for c in curves) for e in range(EPOCHS)]
        assert [t.intermediate_values[e + 1] for e in range(EPOCHS)] == pytest.approx(
            mean, rel=REL
        )
        # the value is the best epoch of the mean curve; every seed is measured at that epoch
        best = min(range(EPOCHS), key=mean.__getitem__)
        assert (
            t.value == pytest.approx(mean[best], rel=REL)
            and t.user_attrs["best_epoch"] == best + 1
        )
        ref = train_repeats([replace(base, seed=s) for s in seeds], data)
        assert all(r.best_epoch == best + 1 for r in ref)
        assert t.user_attrs["val_mse_per_seed"] == pytest.approx(
            [c[best] for c in curves], rel=REL
        )
        assert t.user_attrs["test_mse_per_seed"] == pytest.approx(
            [r.test_mse for r in ref], rel=REL
        )
        assert t.user_attrs["final_val_mse_per_seed"] == pytest.approx(
            [c[-1] for c in curves], rel=REL
        )
        assert t.user_attrs["test_mse"] == pytest.approx(
            statistics.fmean(r.test_mse for r in ref), rel=REL
        )
        assert t.user_attrs["test_mse_std"] == pytest.approx(
            statistics.stdev(r.test_mse for r in ref), rel=1e-3
        )
        assert t.user_attrs["val_mse_std"] == pytest.approx(
            statistics.stdev(c[best] for c in curves), rel=1e-3
        )
    # plain Optuna sees ordinary trials: a value, params, a curve; the best one has its weights
    # stored
    assert study.best_trial.value == min(t.value for t in study.trials)
    assert "model_artifact" in study.best_trial.user_attrs


def test_repeat_1_stores_what_one_model_per_trial_stored(tmp_path, data):
    """--repeats 1 (the default): seed + trial number, train.py's curve alone, no new attrs."""
    cfg, study = _run(tmp_path, engine="batched", repeats=1)
    assert config.build(TOML).repeats == 1
    for t in study.trials:
        assert set(t.user_attrs) <= ONE_MODEL_KEYS and t.user_attrs["seed"] == cfg.seed + t.number
        vals: list[float] = []
        result = train(
            replace(_trial_config(t), seed=cfg.seed + t.number),
            data,
            on_epoch=lambda log, vals=vals: vals.append(log.val_mse),
        )
        assert [t.intermediate_values[e + 1] for e in range(EPOCHS)] == pytest.approx(
            vals, rel=REL
        )
        assert t.value == pytest.approx(result.best_val_mse, rel=REL)
        assert t.user_attrs["test_mse"] == pytest.approx(result.test_mse, rel=REL)


@pytest.mark.parametrize("engine", ["batched", "standard"])
def test_repeat_that_diverges_prunes_its_trial_naming_seed_and_epoch(tmp_path, engine):
    toml = {
        **TOML,
        "train": {"batch_size": 32, "optimizer": "sgd", "momentum": 0.9},
        "search_space": {
            "depth": [2, 2],
            "width": [12, 12],
            "lr": [80.0, 80.0],
            "activation": ["relu"],
        },
    }
    _, study = _run(tmp_path, engine=engine, repeats=2, toml=toml, n_trials=1)
    (t,) = study.trials
    assert t.state == TrialState.PRUNED
    assert re.match(
        r"seed \d+: non-finite training loss in epoch \d+ \(lr=[\d.]+\): training diverged",
        t.user_attrs["pruned_reason"],
    )
    assert t.user_attrs["repeats"] == 2 and len(t.user_attrs["test_mse_per_seed"]) == 2


def test_repeats_in_summary_report_and_note(tmp_path):
    cfg, study = _run(tmp_path, engine="batched", repeats=2, n_trials=2)
    from study.views.dashboard import study_note
    from study.views.summary import describe_trial

    best = study.best_trial
    std = f"± {best.user_attrs['val_mse_std']:.1e}"
    assert std in "\n".join(describe_trial(best)) and "mean of 2 seeds" in "\n".join(
        describe_trial(best)
    )
    assert std in study_note(study) and "(mean of 2 seeds)" in study_note(study)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--repeats", "0"], "--repeats must be an integer from 1"),
        (["--repeats", "3", "--slots", "2"], "give --slots at least 3"),
        (["--repeats", "2"], "created with another repeats"),  # the study below was made with 1
    ],
)
def test_repeats_bad_input_is_one_line_and_changes_nothing(workdir, args, fragment):
    db = workdir / "storage/sinstudy.db"
    tiny = (
        "run",
        "--config",
        "tiny.toml",
        "--n-trials",
        "1",
        "--max-epochs",
        "2",
        "--no-progress",
    )
    if fragment.startswith("created"):
        assert run_cli(*tiny, cwd=workdir).returncode == 0
    before = db.read_bytes() if db.exists() else None
    r = run_cli(*tiny, *args, cwd=workdir)
    assert r.returncode == 2 and fragment in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert (db.read_bytes() if db.exists() else None) == before


def test_a_trials_config_is_rebuilt_from_its_params_and_short_attrs(tmp_path):
    """Every TrainConfig field is a param or a `train_<field>` attr, none long enough to stretch
    optuna-dashboard's trial page; `train_config(trial)` puts them back together."""
    toml = {**TOML, "search_space": {**TOML["search_space"], "per_layer_width": True}}
    cfg, study = _run(tmp_path, engine="standard", repeats=1, toml=toml, n_trials=2)
    for t in study.trials:
        tcfg = train_config(t)
        assert tcfg.widths == tuple(t.params[f"width_{i}"] for i in range(t.params["depth"]))
        assert tcfg.lr == t.params["lr"] and tcfg.seed == t.user_attrs["seed"]
        assert tcfg.max_epochs == EPOCHS and tcfg.batch_size == 32
        long = {k: v for k, v in t.user_attrs.items() if len(f"{k} {v}") >= 60}
        assert not long, long
