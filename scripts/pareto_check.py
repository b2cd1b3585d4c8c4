"""Does pruning pay in a two-objective study? The default study with --objectives
val_mse,n_params, on the same wall-clock budget, pruned (Hyperband ranking each rung by Pareto
rank) and not pruned, from several study seeds: the hypervolume of the front found by each
moment of the budget.

    python scripts/pareto_check.py [--timeout 60] [--seeds 0,1,2] [--max-epochs 200] [--device cpu]

The front is measured in (log10 validation MSE, n_params / the space's largest network's) and
the hypervolume against the reference point (0, 1): an MSE of 1 (a network predicting zero
scores 0.5 on sin) and the largest network the space allows; larger is better, a front of
networks at MSE 1e-8 of no size would score 8. Trials that end after the budget (those
started just before it) count for nothing. The runs of one seed follow each other, pruned
first and then not (the machine's load falls on both alike). Prints one row per run, the
medians, and the ratio pruned / not pruned at each moment.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
from pathlib import Path

import optuna
from optuna.trial import TrialState

from study import config
from study.run import runner
from study.trial import objectives, pareto

FRACTIONS = (0.25, 0.5, 0.75, 1.0)  # of the budget: the moments the front is measured at


def reference_size(cfg: config.StudyConfig) -> int:
    """The largest network the search space allows."""
    return objectives.count_params((cfg.space.width[1],) * cfg.space.depth[1])


def one(pruner: str, seed: int, args: argparse.Namespace, folder: Path) -> dict:
    name = f"{pruner}-s{seed}"
    cfg = config.build(
        study=name,
        storage=f"sqlite:///{folder}/{name}.db",
        n_trials=100_000,
        timeout=args.timeout,
        seed=seed,
        objectives="val_mse,n_params",
        pruner=pruner,
        max_epochs=args.max_epochs,
        device=args.device,
        log_dir=str(folder / "tb"),
        artifact_dir=str(folder / "art"),
    )
    runner.run(cfg, progress=False, say=lambda line: None)
    trials = optuna.load_study(study_name=name, storage=cfg.storage).trials
    start = min(t.datetime_start for t in trials)
    size = reference_size(cfg)
    volumes = []
    for f in FRACTIONS:
        by = args.timeout * f
        points = [
            (math.log10(max(t.values[0], 1e-30)), t.values[1] / size)
            for t in trials
            if t.state == TrialState.COMPLETE
            and (t.datetime_complete - start).total_seconds() <= by
        ]
        volumes.append(pareto.hypervolume(points, (0.0, 1.0)))
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    return {
        "pruner": pruner,
        "seed": seed,
        "complete": len(complete),
        "pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "front": len(pareto.front_trials(trials)),
        "hv": volumes,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per study (default 60)")
    p.add_argument("--seeds", default="0,1,2", help="study seeds (default 0,1,2)")
    p.add_argument("--max-epochs", type=int, default=200, help="epochs per trial (default 200)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for pruner in ("hyperband", "none"):
                rows.append(one(pruner, seed, args, Path(tmp)))
                r = rows[-1]
                print(
                    f"| {r['pruner']} | {r['seed']} | {r['complete']} | {r['pruned']} | "
                    f"{r['front']} | " + " | ".join(f"{v:.3f}" for v in r["hv"]) + " |",
                    flush=True,
                )
    med = {
        pruner: [
            statistics.median(r["hv"][i] for r in rows if r["pruner"] == pruner)
            for i in range(len(FRACTIONS))
        ]
        for pruner in ("hyperband", "none")
    }
    for pruner, values in med.items():
        print(f"| {pruner} | median | | | | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    ratios = [
        f"{a / b:.2f}x" if b else "n/a" for a, b in zip(med["hyperband"], med["none"], strict=True)
    ]
    moments = ", ".join(f"{f:.0%}" for f in FRACTIONS)
    print(
        f"hypervolume pruned / not pruned at {moments} of {args.timeout:g} s: " + ", ".join(ratios)
    )


if __name__ == "__main__":
    main()
