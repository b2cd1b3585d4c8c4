"""The Optuna objective: suggest -> train -> report/prune per epoch -> value.

A standard objective, usable with study.optimize(Objective(...)). Each epoch's validation MSE is
reported (so the dashboard and the pruner see the whole curve) and `TrialPruned` is raised when the
pruner says so. A diverged trial (non-finite loss, e.g. the report's lr = 0.01 runs at depth)
ends PRUNED with the reason in the user attr `pruned_reason`, never as a crash.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import optuna
import torch
from optuna.artifacts import FileSystemArtifactStore, upload_artifact

from . import interrupt
from .config import StudyConfig, TrainConfig
from .data import SinData
from .space import suggest
from .tracking import TrialLogger
from .train import EpochLog, TrainResult, train

MODEL_FILE = "model.pt"  # artifact file name of a trial's best weights
WORKER = f"{socket.gethostname()}:{os.getpid()}"


def trial_seed(cfg: StudyConfig, trial_number: int) -> int:
    return cfg.seed + trial_number


def save_model(model: torch.nn.Module, tcfg: TrainConfig, path: Path) -> None:
    """Weights plus the TrainConfig that rebuilds them: enough for later commands, no retraining."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"train_config": asdict(tcfg), "state_dict": state}, path)


def upload_model(store: FileSystemArtifactStore, trial: optuna.Trial | optuna.trial.FrozenTrial, number: int,
                 model: torch.nn.Module, tcfg: TrainConfig, storage: optuna.storages.BaseStorage | None = None) -> str:
    """A new best's weights and its fit image as artifacts of its (still running) trial: finished
    trials take no artifacts. Returns the weights' artifact id. Used by both engines."""
    from . import analysis, plots

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / MODEL_FILE
        save_model(model, tcfg, path)
        artifact_id = upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial,
                                      storage=storage, mimetype="application/octet-stream")
        image = Path(tmp) / f"fit-trial-{number:04d}.png"
        plots.fit_png(analysis.fit(model.cpu()), image, title=f"trial #{number} vs sin(x)")
        upload_artifact(artifact_store=store, file_path=str(image), study_or_trial=trial, storage=storage, mimetype="image/png")
    return artifact_id


def result_attrs(result: TrainResult, tcfg: TrainConfig) -> dict:
    """The user attrs every finished trial carries, from either engine."""
    return {
        "test_mse": result.test_mse,
        "final_val_mse": result.final_val_mse,
        "final_test_mse": result.final_test_mse,
        "best_epoch": result.best_epoch,
        "n_params": result.n_params,
        "epochs": result.epochs,
        "seconds": round(result.seconds, 4),
        "device": result.device,
        "seed": tcfg.seed,
        "train_config": json.dumps(asdict(tcfg)),
    }


def record_result(trial: optuna.Trial, result: TrainResult, tcfg: TrainConfig) -> None:
    for k, v in result_attrs(result, tcfg).items():
        trial.set_user_attr(k, v)


class Objective:
    def __init__(self, cfg: StudyConfig, data: SinData, artifact_store: FileSystemArtifactStore | None):
        self.cfg = cfg
        self.data = data
        self.artifact_store = artifact_store
        # For the benchmark's bookkeeping share: time inside __call__, and the part of it spent
        # on reporting, pruning decisions and TensorBoard (the rest of a run is ask/tell).
        self.seconds_inside = 0.0
        self.seconds_reporting = 0.0

    def __call__(self, trial: optuna.Trial) -> float:
        start = time.perf_counter()
        try:
            return self._trial(trial)
        finally:
            self.seconds_inside += time.perf_counter() - start

    def _trial(self, trial: optuna.Trial) -> float:
        tcfg = suggest(trial, self.cfg.space, self.cfg.train, seed=trial_seed(self.cfg, trial.number))
        trial.set_user_attr("worker", WORKER)  # which machine and process ran it (scale-out, crashes)
        logger = TrialLogger(self.cfg.log_dir, self.cfg.study, trial.number)
        last = {"val_mse": float("inf"), "epoch": 0}

        def on_epoch(log: EpochLog) -> None:
            interrupt.check()  # Ctrl-C / SIGTERM: stop here, between epochs
            t0 = time.perf_counter()
            logger.log_epoch(log)
            last.update(val_mse=log.val_mse, epoch=log.epoch)
            trial.report(log.val_mse, log.epoch)
            prune = trial.should_prune()
            self.seconds_reporting += time.perf_counter() - t0
            if prune:
                trial.set_user_attr("pruned_reason", f"pruner stopped it after epoch {log.epoch}")
                raise optuna.TrialPruned(f"pruned after epoch {log.epoch}")

        hparams = {k: v for k, v in trial.params.items()}
        try:
            result = train(tcfg, self.data, on_epoch=on_epoch)
        except optuna.TrialPruned:
            logger.close(hparams, {"val_mse": last["val_mse"]})
            raise
        except BaseException:  # interrupted or failed: keep the curve written so far
            logger.writer.close()
            raise
        logger.close(hparams, {"val_mse": result.best_val_mse, "test_mse": result.test_mse})

        record_result(trial, result, tcfg)
        if result.diverged:
            trial.set_user_attr("pruned_reason", result.diverged)
            raise optuna.TrialPruned(result.diverged)
        if self.artifact_store is not None and self._is_new_best(trial, result.best_val_mse):
            self._upload_model(trial, result, tcfg)
        return result.best_val_mse

    @staticmethod
    def _is_new_best(trial: optuna.Trial, value: float) -> bool:
        try:
            return value < trial.study.best_value
        except ValueError:  # no completed trial yet
            return True

    def _upload_model(self, trial: optuna.Trial, result: TrainResult, tcfg: TrainConfig) -> None:
        artifact_id = upload_model(self.artifact_store, trial, trial.number, result.model, tcfg)
        trial.set_user_attr("model_artifact", artifact_id)
