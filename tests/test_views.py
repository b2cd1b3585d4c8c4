"""What people look at: the value's name, TensorBoard's HParams table, the plots' MSE axes."""

from __future__ import annotations

import math

import optuna
import pytest
from optuna.trial import TrialState
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

from study import config
from study.run import runner
from study.views import plots
from study.views.tracking import METRICS

TOML = {
    "data": {"n_train": 96, "n_val": 32, "n_test": 64},
    "train": {"batch_size": 32},
    "search_space": {
        "depth": [1, 2],
        "width": [4, 16],
        "lr": [1e-4, 3e-1],
        "activation": ["tanh", "relu"],
    },
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A batched study with pruned and complete trials, its TensorBoard runs beside it."""
    folder = tmp_path_factory.mktemp("views")
    cfg = config.build(
        TOML,
        study="v",
        storage=f"sqlite:///{folder}/v.db",
        n_trials=24,
        max_epochs=9,
        device="cpu",
        log_dir=str(folder / "tb"),
        artifact_dir=str(folder / "art"),
    )
    runner.run(cfg, progress=False, say=lambda line: None)
    return cfg, optuna.load_study(study_name="v", storage=cfg.storage)


def test_the_value_is_named_val_mse(tiny):
    _, study = tiny
    # optuna-dashboard shows this instead of "Objective 0"
    assert study.metric_names == ["val_mse"]


def test_hparams_declares_every_metric_in_every_run_and_marks_how_it_ended(tiny):
    cfg, study = tiny
    states = {t.number: t.state for t in study.trials}
    assert {TrialState.COMPLETE, TrialState.PRUNED} <= set(states.values())
    status = {
        TrialState.COMPLETE: api_pb2.STATUS_SUCCESS,
        TrialState.PRUNED: api_pb2.STATUS_SUCCESS,  # ended as meant; `state` says PRUNED
    }
    for number, state in states.items():
        ea = EventAccumulator(f"{cfg.log_dir}/v/trial-{number:04d}")
        ea.Reload()
        content = {
            tag: plugin_data_pb2.HParamsPluginData.FromString(raw)
            for tag, raw in ea.PluginTagToContent("hparams").items()
        }
        exp = content["_hparams_/experiment"].experiment
        assert [m.name.tag for m in exp.metric_infos] == [f"hparam/{m}" for m in METRICS]
        start = content["_hparams_/session_start_info"].session_start_info
        assert start.hparams["state"].string_value == state.name
        assert content["_hparams_/session_end_info"].session_end_info.status == status[state]
        written = set(ea.Tags()["scalars"])
        assert "hparam/val_mse" in written
        # a complete run has every metric, with its trial's values
        if state == TrialState.COMPLETE:
            assert {f"hparam/{m}" for m in METRICS} <= written
            t = study.trials[number]
            assert ea.Scalars("hparam/test_mse")[0].value == pytest.approx(
                t.user_attrs["test_mse"], rel=1e-6
            )


def test_mse_axes_are_logarithmic_and_named_so(tiny):
    _, study = tiny
    figs, _ = plots.study_figures(study, evaluators=("ped-anova",))
    for name in ("history", "intermediate_values", "slice"):
        assert (
            figs[name].layout.yaxis.type == "log"
            and "(log scale)" in figs[name].layout.yaxis.title.text
        )
    assert figs["edf"].layout.xaxis.type == "log"
    par = figs["parallel_coordinate"]
    assert par.layout.xaxis.ticktext[0] == "log10 val MSE"  # the value's axis, drawn in log10
    best = min(t.value for t in study.trials if t.state == TrialState.COMPLETE)
    assert par.data[-1].marker.cmin == pytest.approx(math.log10(best))
    assert figs["contour_lr_depth"].data[0].colorbar.title.text == "log10 val MSE"


def test_wide_spaces_split_the_slice_plot():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: sum(t.suggest_float(f"p{i}", 1, 2) for i in range(9)), n_trials=12)
    figs, _ = plots.study_figures(study, evaluators=())
    assert [n for n in figs if n.startswith("slice")] == ["slice", "slice_2", "slice_3"]
    panels = [
        sum(1 for k in figs[n].layout if k.startswith("xaxis"))
        for n in ("slice", "slice_2", "slice_3")
    ]
    assert panels == [4, 4, 1]


def test_the_printed_commands_survive_a_study_name_with_spaces():
    import shlex

    from study.views.analysis import Counts
    from study.views.summary import Summary, format_summary

    s = Summary(
        study="my study",
        storage="journal:///runs/my study.log",
        device="cpu",
        this_run=Counts(1, 0, 0),
        total=Counts(1, 0, 0),
        wall_seconds=1.0,
        log_dir="runs/my study",
        artifact_dir="my artifacts",
    )
    lines = {ln[:15].strip(): ln[15:] for ln in format_summary(s).splitlines()}
    assert shlex.split(lines["tensorboard"]) == ["tensorboard", "--logdir", "runs/my study"]
    assert shlex.split(lines["dashboard"]) == [
        "optuna-dashboard",
        "runs/my study.log",
        "--artifact-dir",
        "my artifacts",
    ]


def test_the_summary_names_a_trials_share_of_the_device_only_where_it_shared_it():
    from study.views.summary import shared_text

    assert shared_text({"seconds": 8.9, "compute_seconds": 1.26}) == (
        " (its share of the device: 1.3 s)"
    )
    assert shared_text({"seconds": 8.9, "compute_seconds": 8.9}) == ""  # trained alone
    assert shared_text({"seconds": 8.9}) == ""  # stored before compute_seconds existed


def test_the_progress_bar_gives_no_time_left_until_a_batch_of_trials_has_finished():
    """A 40-trial run trains 32 trials side by side: the first to end (pruned early) once gave
    an estimate of 7-10 minutes for a 40 s run. Its time left waits for 32 finished trials."""
    import io

    from study.views.summary import Progress

    bar = Progress(40, True, at_once=32, file=io.StringIO())
    for number in range(32):
        assert "<?" in str(bar.bar), (number, str(bar.bar))
        bar.written(number, TrialState.PRUNED, None)
    assert "<?" not in str(bar.bar) and "<00:" in str(bar.bar), str(bar.bar)
    bar.close()
