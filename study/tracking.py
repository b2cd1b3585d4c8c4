"""TensorBoard: one run per trial under <log_dir>/<study>/trial-NNNN.

Scalars are grouped the CleanRL way (loss/train, mse/val, lr), one point per epoch. When a
trial ends (complete, pruned or diverged) its hyperparameters and final metrics go to the
HParams tab, written into the same run folder so curves and hparams stay together.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .train import EpochLog


def run_dir(log_dir: str | Path, study: str, trial_number: int) -> Path:
    return Path(log_dir) / study / f"trial-{trial_number:04d}"


class TrialLogger:
    def __init__(self, log_dir: str | Path, study: str, trial_number: int):
        from torch.utils.tensorboard import SummaryWriter  # imported here: it loads tensorboard

        self.path = run_dir(log_dir, study, trial_number)
        self.writer = SummaryWriter(log_dir=str(self.path))

    def log_epoch(self, log: EpochLog, walltime: float | None = None) -> None:
        """`walltime`: when the epoch ended, for a run written after the fact (batched engine)."""
        self.writer.add_scalar("loss/train", log.train_loss, log.epoch, walltime=walltime)
        self.writer.add_scalar("mse/val", log.val_mse, log.epoch, walltime=walltime)
        self.writer.add_scalar("lr", log.lr, log.epoch, walltime=walltime)

    def close(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        # HParams takes only bool/number/str; None and tuples become strings. Non-finite metrics
        # (a diverged trial) are kept out: they would hide the column's other values.
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        hp = {
            k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in hparams.items()
        }
        finite = {f"hparam/{k}": float(v) for k, v in metrics.items() if math.isfinite(v)}
        # What SummaryWriter.add_hparams writes, but into this run's own event file: add_hparams
        # opens a second writer (and file) per call, a cost paid once per trial.
        file_writer = self.writer._get_file_writer()
        for summary in hparams_summary(hp, finite):
            file_writer.add_summary(summary)
        for k, v in finite.items():
            self.writer.add_scalar(k, v)
        self.writer.close()
