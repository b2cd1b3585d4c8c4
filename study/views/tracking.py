"""TensorBoard: one run per trial under <log_dir>/<study>/trial-NNNN.

Scalars are grouped the CleanRL way (loss/train, mse/val, lr), one point per epoch. When a
trial ends (complete, pruned or diverged) its hyperparameters and final metrics go to the
HParams tab, written into the same run folder so curves and hparams stay together.
"""

from __future__ import annotations

import itertools
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

from study.trial.train import EpochLog
from study.views import folders

FLUSH_S = 2.0  # a live run's curve reaches the file at most this long after its epoch
_FILES = itertools.count()  # event files this process opened: part of each file's name


def run_dir(log_dir: str | Path, study: str, trial_number: int) -> Path:
    return Path(log_dir) / study / f"trial-{trial_number:04d}"


class TrialLogger:
    """One trial's TensorBoard run, written in the caller's thread: a write that fails raises
    here, not in a thread of its own (as torch's SummaryWriter does, which prints a traceback
    and fails some later call). A run that cannot be written (a full disk, a folder removed)
    stops logging where it is, with folders.warn_once; the caller trains and stores its trial
    as if nothing happened."""

    def __init__(self, log_dir: str | Path, study: str, trial_number: int):
        from tensorboard.summary.writer.record_writer import RecordWriter

        self.log_dir = str(log_dir)
        self.path = run_dir(log_dir, study, trial_number)
        self._records = None
        self._flushed = time.monotonic()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            name = (
                f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
                f"{os.getpid()}.{next(_FILES)}"
            )
            self._records = RecordWriter(open(self.path / name, "wb"))  # noqa: SIM115
            self._event(file_version="brain.Event:2")
        except OSError as e:
            self._failed(e)

    def log_epoch(self, log: EpochLog, walltime: float | None = None) -> None:
        """`walltime`: when the epoch ended, for a run written after the fact (batched engine)."""
        self._scalar("loss/train", log.train_loss, log.epoch, walltime)
        self._scalar("mse/val", log.val_mse, log.epoch, walltime)
        self._scalar("lr", log.lr, log.epoch, walltime)
        if time.monotonic() - self._flushed >= FLUSH_S:
            self._guarded(self._records.flush if self._records else None)
            self._flushed = time.monotonic()

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
        for summary in (exp, ssi, sei):
            self._event(summary=summary)
        for k, v in finite.items():
            self._scalar(k, v)
        self.end()

    def end(self) -> None:
        """Close the run's file as it is (an interrupted or failed trial keeps its curve)."""
        records, self._records = self._records, None
        if records is not None:
            try:
                records.close()
            except OSError as e:
                self._failed(e)

    def _scalar(
        self, tag: str, value: float, step: int | None = None, walltime: float | None = None
    ) -> None:
        from torch.utils.tensorboard.summary import scalar

        self._event(summary=scalar(tag, value), step=step, wall_time=walltime)

    def _event(self, step: int | None = None, wall_time: float | None = None, **fields) -> None:
        if self._records is None:
            return
        from tensorboard.compat.proto import event_pb2

        event = event_pb2.Event(wall_time=wall_time or time.time(), **fields)
        if step is not None:
            event.step = int(step)
        self._guarded(self._records.write, event.SerializeToString())

    def _guarded(self, write, *args) -> None:
        if write is None:
            return
        try:
            write(*args)
        except OSError as e:
            self._failed(e)

    def _failed(self, e: OSError) -> None:
        records, self._records = self._records, None
        if records is not None:
            try:
                records.close()  # flushes what is buffered: it may fail the same way
            except OSError:
                pass
        folders.warn_once(
            "TensorBoard",
            self.log_dir,
            e,
            f"trial runs there stop where the write failed (first {self.path.name})",
        )


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
