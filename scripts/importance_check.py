"""How many trials does the default study need for a stable importance ranking?

    python scripts/importance_check.py [--trials 120] [--at 20,40,80,120] [--seeds 0,1,2]

Runs the default study (`sinstudy run`'s defaults: TPE, Hyperband, 200 epochs) once per study
seed, then reads its first N trials for each N of --at, as a study stopped there: the complete
ones among them, and every trial at each budget it reached (study.views.importance). Prints one
line per seed and N: the complete trials, each evaluator's leader and the share of bootstrap
resamples it leads, and whether the evaluators agree; then, per N, in how many seeds both
leaders were stable (first in >= 90% of resamples) and the same.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import optuna
from optuna.trial import TrialState

from study import config
from study.run import runner
from study.views import analysis, importance


def study_of(seed: int, n: int, folder: Path, device: str) -> optuna.Study:
    name = f"s{seed}"
    cfg = config.build(
        study=name,
        storage=f"sqlite:///{folder}/{name}.db",
        n_trials=n,
        seed=seed,
        device=device,
        log_dir=str(folder / "tb"),
        artifact_dir=str(folder / "art"),
    )
    runner.run(cfg, progress=False, say=lambda line: None)
    return optuna.load_study(study_name=name, storage=cfg.storage)


def first(study: optuna.Study, n: int) -> optuna.Study:
    """The study as it stood when its first `n` trials had ended (an in-memory copy)."""
    copy = optuna.create_study(study_name=study.study_name)
    copy.set_user_attr("config", study.user_attrs.get("config", "{}"))
    ended = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    copy.add_trials([t for t in ended if t.number < n])
    return copy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=120, help="trials per study")
    ap.add_argument("--at", default="20,40,80,120", help="trial counts to read the study at")
    ap.add_argument("--seeds", default="0,1,2", help="study seeds")
    ap.add_argument("--resamples", type=int, default=importance.RESAMPLES)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    sizes = [int(x) for x in args.at.split(",")]
    settled: dict[int, list[bool]] = {n: [] for n in sizes}
    alone: dict[tuple[int, str], list[bool]] = {}  # (N, evaluator): its leader stable
    with tempfile.TemporaryDirectory() as tmp:
        for seed in (int(s) for s in args.seeds.split(",")):
            study = study_of(seed, args.trials, Path(tmp), args.device)
            for n in sizes:
                part = first(study, n)
                if analysis.importance_shortfall(part):
                    print(f"seed {seed}, {n:>4} trials: too few complete trials")
                    settled[n].append(False)
                    continue
                found = importance.evaluate(part, resamples=args.resamples)
                leads = "; ".join(
                    f"{importance.NAMES[e.evaluator]} {e.leader.param} {e.leader.first:.0%}"
                    for e in found.evaluated
                )
                off = found.disagreements()
                agree = f"disagree on {', '.join(off)}" if off else "agree"
                fid = importance.fidelities(part, ("fanova",), resamples=args.resamples)
                budgets = ", ".join(
                    f"{f.found.evaluated[0].leader.param}@{f.epoch}" for f in fid[:-1]
                )
                print(
                    f"seed {seed}, {n:>4} trials ({found.trials:>3} complete): {leads}; {agree}"
                    f"; fANOVA leader by budget: {budgets or '-'}"
                )
                for e in found.evaluated:
                    alone.setdefault((n, e.evaluator), []).append(e.stable)
                leaders = {e.leader.param for e in found.evaluated}
                settled[n].append(all(e.stable for e in found.evaluated) and len(leaders) == 1)
    for n in sizes:
        each = ", ".join(
            f"{importance.NAMES[ev]}'s alone in {sum(got)}"
            for (m, ev), got in alone.items()
            if m == n
        )
        print(
            f"at {n} trials: both evaluators' leader stable and the same in "
            f"{sum(settled[n])} of {len(settled[n])} seeds ({each or 'none evaluated'})"
        )


if __name__ == "__main__":
    main()
