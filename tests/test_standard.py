from __future__ import annotations

import optuna
import pytest
from optuna.artifacts import FileSystemArtifactStore
from optuna.trial import TrialState

from study import config
from study.run.standard import Objective
from study.trial.data import make_data


@pytest.fixture
def setup(tmp_path):
    cfg = config.build(
        {
            "data": {"n_train": 128, "n_val": 64, "n_test": 128},
            "train": {"batch_size": 32},
            "search_space": {
                "depth": [1, 3],
                "width": [4, 32],
                "lr": [1e-4, 1e6],
                "activation": ["tanh", "identity", "relu"],
            },
        },
        max_epochs=8,
        log_dir=str(tmp_path / "tb"),
        artifact_dir=str(tmp_path / "art"),
    )
    (tmp_path / "art").mkdir()
    objective = Objective(cfg, make_data(cfg.data), FileSystemArtifactStore(str(tmp_path / "art")))
    return cfg, objective


def _drive(study: optuna.Study, objective: Objective) -> optuna.trial.FrozenTrial:
    """One trial through ask/tell, as a worker would."""
    trial = study.ask()
    try:
        value = objective(trial)
    except optuna.TrialPruned:
        return study.tell(trial, state=TrialState.PRUNED)
    return study.tell(trial, value)


def test_pruner_prunes_a_hopeless_trial(setup):
    cfg, objective = setup
    study = optuna.create_study(
        pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0)
    )
    study.enqueue_trial({"depth": 2, "width": 32, "lr": 1e-2, "activation": "tanh"})
    # cannot fit sin
    study.enqueue_trial({"depth": 1, "width": 4, "lr": 1e-4, "activation": "identity"})
    good, bad = _drive(study, objective), _drive(study, objective)
    assert (
        good.state == TrialState.COMPLETE and len(good.intermediate_values) == cfg.train.max_epochs
    )
    assert bad.state == TrialState.PRUNED
    assert len(bad.intermediate_values) < cfg.train.max_epochs
    assert "pruner" in bad.user_attrs["pruned_reason"]


def test_huge_learning_rate_ends_pruned_with_the_reason(setup):
    _, objective = setup
    study = optuna.create_study(pruner=optuna.pruners.NopPruner())
    study.enqueue_trial({"depth": 3, "width": 32, "lr": 1e6, "activation": "relu"})
    t = _drive(study, objective)
    assert t.state == TrialState.PRUNED
    assert "non-finite training loss" in t.user_attrs["pruned_reason"]


def test_complete_trial_carries_attrs_and_best_keeps_its_model(setup, tmp_path):
    _, objective = setup
    study = optuna.create_study(pruner=optuna.pruners.NopPruner())
    study.enqueue_trial({"depth": 2, "width": 16, "lr": 1e-2, "activation": "tanh"})
    # worse: no model
    study.enqueue_trial({"depth": 1, "width": 4, "lr": 1e-4, "activation": "identity"})
    first, second = _drive(study, objective), _drive(study, objective)
    for key in ("test_mse", "n_params", "epochs", "seconds", "device"):
        assert key in first.user_attrs
    assert first.user_attrs["device"] == "cpu" and first.user_attrs["epochs"] == 8
    assert "model_artifact" in first.user_attrs and "model_artifact" not in second.user_attrs
    assert first.value == min(first.intermediate_values.values())
