"""The user attrs every trial carries, from either engine, the trial seed rule and what a
trial trains (one TrainConfig per repeat)."""

from __future__ import annotations

import math
import os
import random
import socket
import time
from dataclasses import dataclass, fields, replace

import optuna
import torch
from optuna.trial import FrozenTrial

from study.config import StudyConfig, TrainConfig
from study.trial.objectives import count_params
from study.trial.space import suggest
from study.trial.train import TrainResult

WORKER = f"{socket.gethostname()}:{os.getpid()}"  # which machine and process ran a trial
RUN_ENV = "SINSTUDY_RUN"  # the run a process belongs to: its workers and writers inherit it


def new_run() -> str:
    """Name the run this process starts (`host:pid:time`); the processes it spawns inherit it."""
    os.environ[RUN_ENV] = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns() // 1_000_000}"
    return os.environ[RUN_ENV]


def run_id() -> str:
    return os.environ.get(RUN_ENV) or WORKER


# Streams this far apart: worker i of a run samples with seed + i * SEED_STREAM (the samplers add
# the study's trial count), and its batched engine counts its trials from i * SEED_STREAM.
SEED_STREAM = 1_000_003


MAX_LOST = 100  # proposals lost to other engines in a row before an engine stops asking
EXHAUSTED = (
    f"sinstudy: the last {MAX_LOST} parameter sets this engine proposed were trained by other "
    "engines already; it starts no more trials (is the search space that small?)"
)


def fresh_stream() -> int:
    """A seed count of its own, for an engine that met another's seed (far from the workers')."""
    return random.SystemRandom().randrange(1 << 10, 1 << 20) * SEED_STREAM


def trial_seed(cfg: StudyConfig, trial_number: int, repeat: int = 0) -> int:
    """Trial k's repeat r (of S = cfg.repeats) trains with seed `seed + S*k + r` (its weights and
    its minibatch order): with S = 1, seed + k. k is the trial's number as its engine counted it
    when it started: its number in the study when one engine runs; worker i of a run counts from
    i * SEED_STREAM, and an engine that finds a seed taken by another moves to a stream of its
    own, so no two trials of a study share a seed (retries reuse their trial's)."""
    return cfg.seed + cfg.repeats * trial_number + repeat


def trial_configs(cfg: StudyConfig, trial: optuna.Trial, seed: int) -> list[TrainConfig]:
    """What a trial trains: the space's suggestion, once per repeat r with seed `seed + r`.
    `seed` is trial_seed(cfg, its count), or for a retry the first seed of the trial it repeats
    (taken as stored, not recomputed: runs of one study may differ in --seed)."""
    tcfg = suggest(trial, cfg.space, cfg.train, seed=seed)
    return [replace(tcfg, seed=seed + r) for r in range(cfg.repeats)]


def start_attrs(engine: str, tcfg: TrainConfig, params: dict, repeats: int = 1) -> dict:
    """Stored when a trial starts, so pruned and failed trials carry them too: who trains it,
    its (first) seed, and what of its TrainConfig its params do not show, one short attr per
    field (`train_<field>`: one long JSON value would stretch optuna-dashboard's trial page),
    and its parameter count (a second objective, which the Pareto pruners read at each rung)."""
    attrs = {
        "engine": engine,
        "seed": tcfg.seed,
        "worker": WORKER,
        "run": run_id(),
        "n_params": count_params(tcfg.widths),
    }
    if repeats > 1:
        attrs["repeats"] = repeats
    shown = set(params) | ({"width"} if any(p.startswith("width_") for p in params) else set())
    for f in fields(TrainConfig):
        if f.name not in shown and f.name != "seed":
            value = getattr(tcfg, f.name)
            attrs[f"train_{f.name}"] = list(value) if isinstance(value, tuple) else value
    return attrs


def train_config(trial: FrozenTrial) -> TrainConfig:
    """The TrainConfig a stored trial trained with (its first repeat's), from its params and
    attrs: what `train(config, data)` needs to train it again."""
    ua, p = trial.user_attrs, trial.params
    values = {k.removeprefix("train_"): v for k, v in ua.items() if k.startswith("train_")}
    values.update({k: v for k, v in p.items() if k in {f.name for f in fields(TrainConfig)}})
    widths = [p[f"width_{i}"] for i in range(len(p)) if f"width_{i}" in p]
    if widths:
        values["width"] = tuple(widths)
    if isinstance(values.get("width"), list):
        values["width"] = tuple(values["width"])
    return TrainConfig(**values, seed=ua["seed"])


def result_attrs(result: TrainResult, tcfg: TrainConfig) -> dict:
    """Stored when a trial ends with a result (complete, or pruned for divergence)."""
    return {
        "test_mse": result.test_mse,
        "final_val_mse": result.final_val_mse,
        "final_test_mse": result.final_test_mse,
        "best_epoch": result.best_epoch,
        "n_params": result.n_params,
        "epochs": result.epochs,
        "seconds": round(result.seconds, 4),  # from its start to its end
        "compute_seconds": round(result.seconds, 4),  # the device's time it took (alone: all)
        "device": result.device,
        "seed": tcfg.seed,
    }


@dataclass(frozen=True)
class Outcome:
    """A trial's result from its repeats' results, as both engines store it."""

    value: float  # the best of the mean validation curve (one repeat: train.py's best_val_mse)
    attrs: dict
    diverged: str | None  # a repeat's divergence, naming its seed when there are several
    model: torch.nn.Module  # the repeat with the lowest validation MSE at the chosen epoch
    model_cfg: TrainConfig  # and its config (its seed)


def repeat_reason(reason: str, seed: int, repeats: int) -> str:
    """A repeat's reason as its trial's: naming the seed when the trial has several."""
    return f"seed {seed}: {reason}" if repeats > 1 else reason


def outcome(results: list[TrainResult], tcfgs: list[TrainConfig]) -> Outcome:
    gone = [(r, c) for r, c in zip(results, tcfgs, strict=True) if r.diverged]
    diverged = repeat_reason(gone[0][0].diverged, gone[0][1].seed, len(results)) if gone else None
    i = min(range(len(results)), key=lambda j: results[j].best_val_mse)
    return Outcome(
        value=sum(r.best_val_mse for r in results) / len(results),
        attrs=repeat_attrs(results, tcfgs),
        diverged=diverged,
        model=results[i].model,
        model_cfg=tcfgs[i],
    )


def repeat_attrs(results: list[TrainResult], tcfgs: list[TrainConfig]) -> dict:
    """A trial's attrs from its repeats (one result per seed, all of the same epoch): the means
    under the usual names, the spread and every seed's own value beside them. One repeat: exactly
    result_attrs."""
    if len(results) == 1:
        return result_attrs(results[0], tcfgs[0])
    attrs = result_attrs(results[0], tcfgs[0])  # epochs, best epoch, n_params, device, first seed

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    def std(xs: list[float]) -> float:  # sample standard deviation; inf/nan where a seed diverged
        m = mean(xs)
        return (
            math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
            if all(map(math.isfinite, xs))
            else math.inf
        )

    per = {
        key: [getattr(r, key) for r in results]
        for key in ("best_val_mse", "test_mse", "final_val_mse", "final_test_mse")
    }
    seconds = round(max(r.seconds for r in results), 4)  # side by side: the longest
    attrs.update(
        test_mse=mean(per["test_mse"]),
        final_val_mse=mean(per["final_val_mse"]),
        final_test_mse=mean(per["final_test_mse"]),
        seconds=seconds,
        compute_seconds=seconds,  # trained in lockstep, alone: all of it its own
        repeats=len(results),
        val_mse_std=std(per["best_val_mse"]),
        test_mse_std=std(per["test_mse"]),
        seeds=[c.seed for c in tcfgs],
        **{f"{key.removeprefix('best_')}_per_seed": values for key, values in per.items()},
    )
    return attrs
