"""The user attrs every trial carries, from either engine, and the trial seed rule."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict

from .config import StudyConfig, TrainConfig
from .train import TrainResult

WORKER = f"{socket.gethostname()}:{os.getpid()}"  # which machine and process ran a trial


def trial_seed(cfg: StudyConfig, trial_number: int) -> int:
    """Trial k trains with seed `seed + k` (its weights and its minibatch order)."""
    return cfg.seed + trial_number


def start_attrs(engine: str, seed: int) -> dict:
    """Stored when a trial starts, so pruned and failed trials carry them too."""
    return {"engine": engine, "seed": seed, "worker": WORKER}


def result_attrs(result: TrainResult, tcfg: TrainConfig) -> dict:
    """Stored when a trial ends with a result (complete, or pruned for divergence)."""
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
