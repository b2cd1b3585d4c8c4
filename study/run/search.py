"""How a study's trials are proposed and pruned: the configured sampler and pruner."""

from __future__ import annotations

import optuna

from study.config import ConfigError, StudyConfig
from study.trial import objectives, pareto
from study.trial.space import grid


def make_sampler(
    cfg: StudyConfig, *, seed: int | None = None, stored: int = 0
) -> optuna.samplers.BaseSampler:
    """The configured sampler, seeded with `seed` (default: the study seed) plus `stored`, the
    number of trials the study already holds: a resumed study must not replay the points its
    first run proposed. Optuna's TPE runs with its constant liar (the default), so trials still
    training count as bad guesses and parallel trials spread out."""
    seed = ((cfg.seed if seed is None else seed) + stored) % 2**32  # numpy's limit
    s = cfg.sampler
    if s == "tpe":
        # two objectives: pruned trials carry MSE curves, which Optuna's own TPE cannot rank
        tpe = pareto.ParetoTPESampler if objectives.multi(cfg) else optuna.samplers.TPESampler
        return tpe(seed=seed)
    if s == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s == "grid":
        if cfg.space.per_layer_width:
            raise ConfigError(
                "the grid sampler cannot search per-layer widths; set per_layer_width = false"
            )
        # Always the study seed: GridSampler shuffles its grid with it, and a grid_id must name
        # the same point in every run and worker of the study.
        return optuna.samplers.GridSampler(grid(cfg.space), seed=cfg.seed)
    if s == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if s == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)


def make_pruner(cfg: StudyConfig) -> optuna.pruners.BasePruner:
    """The configured pruner; with two objectives its Pareto-ranking form (study/pareto.py)."""
    epochs = cfg.train.max_epochs
    two = objectives.multi(cfg)
    if cfg.pruner == "hyperband":
        # Optuna's benchmarks recommend Hyperband with TPE. Rungs from max_epochs/27 upward.
        hyperband = pareto.ParetoHyperband if two else optuna.pruners.HyperbandPruner
        return hyperband(
            min_resource=max(1, epochs // 27), max_resource=epochs, reduction_factor=3
        )
    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=max(1, epochs // 10))
    if cfg.pruner == "sha":
        halving = pareto.ParetoHalving if two else optuna.pruners.SuccessiveHalvingPruner
        return halving(min_resource=max(1, epochs // 27), reduction_factor=3)
    return optuna.pruners.NopPruner()
