"""Do repeats pay? The default study, on the same wall-time budget, with one model per trial and
with S seeds per trial, each from several study seeds: how stable is the parameter-importance
ranking across study seeds, and what best test MSE does each find?

    python scripts/repeats_check.py [--timeout 60] [--seeds 0,1,2] [--repeats 1,3] [--device cpu]

Prints one row per study (trials, best validation and test MSE, the PED-ANOVA and fANOVA
rankings), then per repeats setting the pairwise Spearman rank correlation of the importances
between study seeds (1: the same ranking every time) and its mean.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
from pathlib import Path

import optuna
from scipy.stats import spearmanr

from study import config
from study.run import runner
from study.views import analysis


def one(repeats: int, seed: int, args: argparse.Namespace, folder: Path) -> dict:
    name = f"r{repeats}-s{seed}"
    cfg = config.build(
        study=name,
        storage=f"sqlite:///{folder}/{name}.db",
        n_trials=100_000,
        timeout=args.timeout,
        seed=seed,
        repeats=repeats,
        device=args.device,
        log_dir=str(folder / "tb"),
        artifact_dir=str(folder / "art"),
    )
    summary = runner.run(cfg, progress=False, say=lambda line: None)
    study = optuna.load_study(study_name=name, storage=cfg.storage)
    best = summary.best
    return {
        "repeats": repeats,
        "seed": seed,
        "trials": len(study.trials),
        "complete": summary.total.complete,
        "best_val": best.value if best else float("nan"),
        "best_test": best.user_attrs.get("test_mse", float("nan")) if best else float("nan"),
        "ped": analysis.importances(study, "ped-anova"),
        "fanova": analysis.importances(study, "fanova"),
    }


def rho(a: dict[str, float], b: dict[str, float]) -> float:
    params = sorted(set(a) | set(b))
    return float(
        spearmanr([a.get(p, 0.0) for p in params], [b.get(p, 0.0) for p in params]).statistic
    )


def ranking(imp: dict[str, float]) -> str:
    return " > ".join(f"{p} {v:.2f}" for p, v in sorted(imp.items(), key=lambda kv: -kv[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds of training per study")
    ap.add_argument("--seeds", default="0,1,2", help="study seeds")
    ap.add_argument("--repeats", default="1,3", help="repeats settings to compare")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeats in (int(r) for r in args.repeats.split(",")):
            for seed in seeds:
                rows.append(one(repeats, seed, args, Path(tmp)))
                r = rows[-1]
                print(
                    f"repeats {repeats} seed {seed}: {r['trials']} trials ({r['complete']} "
                    f"complete), best val "
                    f"{r['best_val']:.2e}, test {r['best_test']:.2e}; PED-ANOVA "
                    f"{ranking(r['ped'])}; "
                    f"fANOVA {ranking(r['fanova'])}",
                    flush=True,
                )
    print(
        f"\ndefault study, {args.timeout:g} s per study on {args.device}, study seeds {args.seeds}"
    )
    print(
        "| repeats | trials (mean) | best test MSE (median) | PED-ANOVA rho, pairwise | mean | "
        "fANOVA rho, pairwise | mean |"
    )
    print("|---|---|---|---|---|---|---|")
    for repeats in sorted({r["repeats"] for r in rows}):
        rs = [r for r in rows if r["repeats"] == repeats]
        ped = [rho(a["ped"], b["ped"]) for a, b in itertools.combinations(rs, 2)]
        fan = [rho(a["fanova"], b["fanova"]) for a, b in itertools.combinations(rs, 2)]
        print(
            f"| {repeats} | {statistics.fmean(r['trials'] for r in rs):.0f} | "
            f"{statistics.median(r['best_test'] for r in rs):.2e} | "
            f"{', '.join(f'{x:.2f}' for x in ped)} | {statistics.fmean(ped):.2f} | "
            f"{', '.join(f'{x:.2f}' for x in fan)} | {statistics.fmean(fan):.2f} |"
        )


if __name__ == "__main__":
    main()
