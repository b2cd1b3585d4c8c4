"""TensorBoard: one run per trial under <log_dir>/<study>/trial-NNNN.

Scalars are grouped the CleanRL way (loss/train, mse/val, lr), one point per epoch. When a
trial ends (complete, pruned or diverged) its hyperparameters and final metrics go to the
HParams tab, written into the same run folder so curves and hparams stay together.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from study.trial.train import EpochLog


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

    def close(
        self, hparams: dict[str, Any], metrics: dict[str, float], state: str = "COMPLETE"
    ) -> None:
        """The run's HParams entry: its params plus `state` (COMPLETE, PRUNED, FAIL), every metric
        of METRICS declared (so TensorBoard's table has all the columns whichever run it reads
        the experiment from) and the finite ones written; the session status says how it ended."""
        # HParams takes only bool/number/str; None and tuples become strings. Non-finite metrics
        # (a diverged trial) are kept out: they would hide the column's other values.
        from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
        from torch.utils.tensorboard.summary import Summary, SummaryMetadata
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        hp = {
            k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in hparams.items()
        }
        hp["state"] = state
        declared = {f"hparam/{k}": 0.0 for k in METRICS}
        finite = {f"hparam/{k}": float(v) for k, v in metrics.items() if math.isfinite(v)}
        exp, ssi, _ = hparams_summary(hp, declared)
        end = plugin_data_pb2.HParamsPluginData(
            session_end_info=plugin_data_pb2.SessionEndInfo(
                status=api_pb2.Status.Value(_STATUS[state])
            ),
            version=metadata.PLUGIN_DATA_VERSION,
        )
        sei = Summary(
            value=[
                Summary.Value(
                    tag=metadata.SESSION_END_INFO_TAG,
                    metadata=SummaryMetadata(
                        plugin_data=SummaryMetadata.PluginData(
                            plugin_name=metadata.PLUGIN_NAME, content=end.SerializeToString()
                        )
                    ),
                )
            ]
        )
        # What SummaryWriter.add_hparams writes, but into this run's own event file: add_hparams
        # opens a second writer (and file) per call, a cost paid once per trial.
        file_writer = self.writer._get_file_writer()
        for summary in (exp, ssi, sei):
            file_writer.add_summary(summary)
        for k, v in finite.items():
            self.writer.add_scalar(k, v)
        self.writer.close()


# The HParams metrics of every run: the trial's value (best validation MSE, or the last one of a
# pruned trial), the test MSE of the same weights, both on the last epoch's weights, and the
# network's parameter count (a two-objective study's second value).
METRICS = ("val_mse", "test_mse", "final_val_mse", "final_test_mse", "n_params")
# TensorBoard's session statuses have no "stopped early". A pruned run ended as the study meant
# it to (UNKNOWN would read as a run whose end was lost), so it is a success there and its
# `state` hparam says PRUNED; FAIL is a failure.
_STATUS = {"COMPLETE": "STATUS_SUCCESS", "PRUNED": "STATUS_SUCCESS", "FAIL": "STATUS_FAILURE"}


def trial_metrics(value: float | None, attrs: dict) -> dict[str, float]:
    """The METRICS a trial has: `value` as val_mse, the rest from its result attrs."""
    out = {"val_mse": math.inf if value is None else value}
    out.update({k: attrs[k] for k in METRICS[1:] if k in attrs})
    return out
