"""Standard engine vs batched engine on the same study budget, in one run.

    python scripts/bench.py [--n-trials 128] [--max-epochs 100] [--space small|default] [--device
    cpu|cuda]
                            [--slots K] [--storage sqlite|journal] [--raw K] [--engines
                            standard,batched] [--stacks rebuild|fixed]

Printed, in order:
  - unless --raw 0, the raw engine: K models drawn at random from the space (RandomSampler
    through space.suggest: mixed depth, width, activation, lr), stacked as the engine stacks
    them, trained for a few epochs with no Optuna in the timed loop, against train.py training
    such models one at a time: model-steps/s of each (a model-step: one minibatch of one model);
  - what the batched engine's writer pays per storage write (start, flush, heartbeat, end);
  - both engines on the same budget: the same search space, seed, trial count, epochs, pruner
    and storage (a fresh file each): model-steps/s, trials/min, the share of wall time spent on
    bookkeeping (sampler, pruner, storage, TensorBoard; for the batched engine, in its training
    process) and the best validation MSE. The last line is `speedup <X>x`: trials/min, batched
    over standard.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import optuna

from study import config
from study.run import runner
from study.views import results

# Small models (width <= 64): trials cost overhead, not arithmetic, which is what batching
# removes. The full default space (width up to 256, depth up to 6) is
# arithmetic-bound on a 2-core CPU; run it with --space default.
SPACES = {
    "small": {"depth": [1, 4], "width": [8, 64], "lr": [1e-4, 3e-2]},
    "default": {},
}


STORAGES = {
    "sqlite": "sqlite:///{folder}/bench-{engine}.db",
    "journal": "journal:///{folder}/bench-{engine}.log",
}


def one(engine: str, args: argparse.Namespace, folder: Path) -> dict:
    cfg = config.build(
        {"search_space": SPACES[args.space]},
        study=f"bench-{engine}",
        storage=STORAGES[args.storage].format(folder=folder, engine=engine),
        n_trials=args.n_trials,
        max_epochs=args.max_epochs,
        seed=args.seed,
        device=args.device,
        engine=engine,
        slots=args.slots,
        stacks=args.stacks,
        log_dir=str(folder / "tensorboard"),
        artifact_dir=str(folder / "artifacts"),
    )
    cuda = args.device.startswith("cuda")
    if cuda:
        import torch

        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    s = runner.run(cfg, progress=False, say=lambda line: None)
    wall = time.perf_counter() - t0
    study = results.load_existing(cfg.study, cfg.storage)
    steps_per_epoch = math.ceil(cfg.data.n_train / cfg.train.batch_size)
    epochs = sum(len(t.intermediate_values) for t in study.trials)
    finished = s.this_run.complete + s.this_run.pruned
    return {
        "engine": engine,
        "trials": finished,
        "complete": s.this_run.complete,
        "wall_s": wall,
        "model_steps_per_s": epochs * steps_per_epoch / wall,
        "trials_per_min": 60 * finished / wall,
        "bookkeeping": (s.bookkeeping_seconds or math.nan) / wall,
        "best_val_mse": s.best.value if s.best else math.nan,
        "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else math.nan,
    }


def raw(args: argparse.Namespace) -> str:
    """The engine without Optuna: model-steps/s of K stacked mixed models vs train.py's loop."""
    import torch

    from study.run.batched.engine import _shape
    from study.run.batched.stack import Stack, new_slot
    from study.trial.data import make_data
    from study.trial.space import suggest
    from study.trial.train import train

    cfg = config.build({"search_space": SPACES[args.space]})
    device = torch.device(args.device)
    data = make_data(cfg.data, device)
    drawn = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=args.seed))

    def draw(seed: int):  # a random point of the space, as a trial of the study would get it
        return suggest(drawn.ask(), cfg.space, cfg.train, seed=seed)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    steps_per_epoch = math.ceil(cfg.data.n_train / cfg.train.batch_size)
    groups: dict = {}
    for slot in (new_slot(draw(i), device) for i in range(args.raw)):
        groups.setdefault(_shape(slot), []).append(slot)
    stacks = [Stack(g, data) for g in groups.values()]
    for s in stacks:  # warm-up: buffers, kernels
        s.train_epoch()
    epochs = 5
    sync()
    t0 = time.perf_counter()
    for _ in range(epochs):
        for s in stacks:
            s.train_epoch()[1].tolist()  # the engine's one sync per stack per epoch
    batched = args.raw * epochs * steps_per_epoch / (time.perf_counter() - t0)
    graph_line = (
        graphed(stacks, epochs, steps_per_epoch, args.raw) if device.type == "cuda" else ""
    )
    train(replace(draw(-1), max_epochs=1), data)  # warm-up
    t0 = time.perf_counter()
    n_models, one_epochs = 4, 3
    for i in range(n_models):
        train(replace(draw(args.raw + i), max_epochs=one_epochs), data)
    single = n_models * one_epochs * steps_per_epoch / (time.perf_counter() - t0)
    return (
        f"raw engine, {args.raw} mixed models in {len(stacks)} stacks: {batched:,.0f} "
        f"model-steps/s; "
        f"train.py one at a time: {single:,.0f} model-steps/s; "
        f"{batched / single:,.0f}x{graph_line}"
    )


def graphed(stacks: list, epochs: int, steps_per_epoch: int, k: int) -> str:
    """Probe (the engine runs eagerly): each stack's whole epoch captured once as a CUDA graph
    and replayed; checked against an eager epoch from the same state, then timed like it."""
    import torch

    def snapshot(s):
        return [f.clone() for f in s.flat], s.t.clone(), [x.order.get_state() for x in s.slots]

    def restore(s, snap):
        flat, t, gens = snap
        for f, g in zip(s.flat, flat, strict=True):
            f.copy_(g)
        s.t.copy_(t)
        for x, g in zip(s.slots, gens, strict=True):
            x.order.set_state(g)

    replays, capture_s, worst = [], 0.0, 0.0
    for s in stacks:
        perm, lr = s.orders(), s.lrs()  # static inputs: each replay reads them where they are
        snap = snapshot(s)
        _, eager_val = s.epoch(perm, lr)
        eager_val = eager_val.clone()
        restore(s, snap)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            outputs = s.epoch(perm, lr)
        torch.cuda.synchronize()
        capture_s += time.perf_counter() - t0
        g.replay()
        worst = max(
            worst, ((outputs[1] - eager_val).abs() / eager_val.abs().clamp_min(1e-30)).max().item()
        )
        replays.append((s, g, perm, lr, outputs))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(epochs):
        for s, g, perm, lr, outputs in replays:
            perm.copy_(s.orders())
            lr.copy_(s.lrs())
            g.replay()
            outputs[1].tolist()
    rate = k * epochs * steps_per_epoch / (time.perf_counter() - t0)
    return (
        f"; one CUDA graph per stack and epoch: {rate:,.0f} model-steps/s, capture "
        f"{1000 * capture_s:.0f} ms "
        f"for {len(stacks)} stacks, largest relative difference from eager {worst:.1e}"
    )


def writes(args: argparse.Namespace, folder: Path) -> str:
    """What the batched engine's writer pays per storage write, on a fresh study: creating one
    trial at its start, one flush of `--raw` running trials' new values (one epoch each), one
    heartbeat of them all, and finishing a trial of `--max-epochs` epochs (median of 20 each)."""
    import statistics
    from datetime import datetime

    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    from optuna.trial import FrozenTrial, TrialState

    from study import store

    url = STORAGES[args.storage].format(folder=folder, engine="writes")
    st = store.open_store(store.parse(url)).optuna
    study_id = optuna.create_study(storage=st, study_name="writes")._study_id
    dists = {
        "depth": IntDistribution(1, 6),
        "width": IntDistribution(8, 256, log=True),
        "lr": FloatDistribution(1e-4, 3e-2, log=True),
        "activation": CategoricalDistribution(["relu", "tanh"]),
    }

    def template() -> FrozenTrial:
        return FrozenTrial(
            number=0,
            state=TrialState.RUNNING,
            value=None,
            datetime_start=datetime.now(),
            datetime_complete=None,
            params={"depth": 3, "width": 64, "lr": 1e-3, "activation": "tanh"},
            distributions=dists,
            user_attrs={"engine": "batched", "seed": 0, "worker": "bench"},
            system_attrs={},
            intermediate_values={},
            trial_id=0,
        )

    def ms(fn) -> float:
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
        return statistics.median(times)

    k = max(args.raw, 1)
    ids = [
        tid
        for tid, _ in store.of(st).add_trials(
            study_id, [template() for _ in range(k)], heartbeat=True
        )
    ]
    step = iter(range(1, 10**6))
    start = ms(lambda: store.of(st).add_trials(study_id, [template()], heartbeat=True))
    flush = ms(
        lambda: store.of(st).append_values(
            {tid: {s: 0.5} for tid, s in zip(ids, [next(step)] * k, strict=True)}
        )
    )
    beat = ms(lambda: store.of(st).beat(ids))
    values = {e: 1.0 / e for e in range(1, args.max_epochs + 1)}

    def finish() -> None:
        ((tid, _),) = store.of(st).add_trials(study_id, [template()], heartbeat=True)
        store.of(st).finish_trial(
            tid,
            state=TrialState.COMPLETE,
            value=1e-6,
            values=values,
            user_attrs={"test_mse": 1e-6, "epochs": args.max_epochs},
            system_attrs={},
            completed=datetime.now(),
        )

    end = ms(finish) - start
    return (
        f"writer, {args.storage}: trial start {start:.1f} ms, flush of {k} trials' values "
        f"{flush:.1f} ms, "
        f"heartbeat of {k} trials {beat:.1f} ms, trial end with {args.max_epochs} values "
        f"{end:.1f} ms"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-trials", type=int, default=128)
    ap.add_argument("--max-epochs", type=int, default=100)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--slots", type=int, default=None, help="batched engine slots (default: 32 CPU, 1024 GPU)"
    )
    ap.add_argument(
        "--raw", type=int, default=32, help="models in the raw-engine measurement (0: skip it)"
    )
    ap.add_argument(
        "--stacks", choices=["rebuild", "fixed"], default="rebuild", help="batched engine's stacks"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engines", default="standard,batched")
    ap.add_argument(
        "--space",
        choices=list(SPACES),
        default="small",
        help="small: width <= 64, depth <= 4 (default)",
    )
    ap.add_argument(
        "--storage",
        choices=list(STORAGES),
        default="sqlite",
        help="a fresh file of this kind per engine",
    )
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    if args.raw:
        print(raw(args), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        print(writes(args, Path(tmp)), flush=True)
        rows = [one(e, args, Path(tmp)) for e in args.engines.split(",") if e]
    space = ", ".join(f"{k} {v}" for k, v in SPACES[args.space].items()) or "the default space"
    print(
        f"device {args.device}, {args.n_trials} trials, {args.max_epochs} epochs max, {space}, "
        f"TPE + Hyperband, {args.storage}, {args.stacks} stacks"
    )
    print(
        "| engine | trials | complete | wall s | model-steps/s | trials/min | bookkeeping | best "
        "val MSE | peak GPU MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['engine']} | {r['trials']} | {r['complete']} | {r['wall_s']:.1f} | "
            f"{r['model_steps_per_s']:,.0f} | "
            f"{r['trials_per_min']:.1f} | {100 * r['bookkeeping']:.0f}% | {r['best_val_mse']:.2e} "
            f"| {'-' if math.isnan(r['peak_mib']) else format(r['peak_mib'], ',.0f')} |"
        )
    by = {r["engine"]: r for r in rows}
    if {"standard", "batched"} <= set(by):
        print(f"speedup {by['batched']['trials_per_min'] / by['standard']['trials_per_min']:.1f}x")


if __name__ == "__main__":
    main()
