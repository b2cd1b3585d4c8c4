"""One typed, validated configuration: dataclasses, TOML loading, and the checks.

Every mistake a user can make in a TOML file or a flag raises `ConfigError` with one line that
names the fix; the CLI prints it and exits 2. Nothing here touches storage or the device.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

ACTIVATIONS = ("relu", "tanh", "sigmoid", "silu", "gelu", "leaky_relu", "elu", "identity")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("none", "step", "cosine", "exponential")
SAMPLERS = ("tpe", "random", "grid", "gp", "cmaes", "nsga2")
# What a trial's values are, in order; the first is always the validation MSE. Both minimised.
OBJECTIVES = ("val_mse", "n_params")
# samplers that rank two objectives (CMA-ES optimises one)
MULTI_OBJECTIVE_SAMPLERS = ("tpe", "random", "grid", "gp", "nsga2")
# pruners that rank trials at rungs, which a Pareto rank can do (the median has one order)
MULTI_OBJECTIVE_PRUNERS = ("hyperband", "sha", "none")
PRUNERS = ("hyperband", "median", "sha", "none")
SAMPLINGS = ("uniform", "grid")
INPUT_SCALINGS = ("unit", "raw")
ENGINES = ("auto", "batched", "standard")
STACKS = ("rebuild", "fixed")
# models the batched engine trains at once, by device type
DEFAULT_SLOTS = {
    "cpu": 32,
    "cuda": 1024,
}


class ConfigError(ValueError):
    """A bad setting. Its message is one line that says how to fix it."""


@dataclass(frozen=True)
class DataConfig:
    """The sin(x) data set on [0, 2*pi)."""

    n_train: int = 1000
    """training points, drawn uniformly at random (or on a grid, see `sampling`)"""
    n_val: int = 200
    """validation points, drawn like the training points but independently"""
    n_test: int = 2000
    """test points: a dense uniform grid at half-step offsets, apart from both sets above"""
    noise: float = 0.0
    """standard deviation of Gaussian noise added to the train and validation targets"""
    sampling: str = "uniform"
    """how train/validation x are drawn: uniform (random) or grid"""
    seed: int = 0
    """seed of the data draw; the same seed gives the same sets on every device"""
    input_scaling: str = "unit"
    """what the network is fed: unit (x / pi - 1, in [-1, 1)) or raw (x itself, in [0, 2*pi))"""


@dataclass(frozen=True)
class TrainConfig:
    """Everything one trial trains with. Knows nothing of Optuna: train(cfg, data) runs alone."""

    depth: int = 3
    """number of hidden layers"""
    width: int | tuple[int, ...] = 64
    """units per hidden layer: one number for all, or one per layer"""
    activation: str = "tanh"
    """hidden activation; identity = none (the report's third comparison)"""
    lr: float = 3e-3
    """initial learning rate"""
    optimizer: str = "adam"
    """adam, adamw or sgd (with momentum)"""
    momentum: float = 0.9
    """SGD momentum (ignored by Adam/AdamW)"""
    weight_decay: float = 0.0
    """L2 (SGD, Adam) or decoupled (AdamW) weight decay"""
    scheduler: str = "cosine"
    """learning-rate schedule applied per epoch: none, step, cosine, exponential"""
    step_size: int = 50
    """epochs between decays of the step schedule"""
    gamma: float = 0.5
    """decay factor of the step schedule (per step_size) and the exponential one (per epoch)"""
    batch_size: int = 64
    """minibatch size; batches are reshuffled every epoch"""
    max_epochs: int = 200
    """epochs per trial (unless pruned)"""
    seed: int = 0
    """seed of the weights and the minibatch order"""

    @property
    def widths(self) -> tuple[int, ...]:
        if isinstance(self.width, int):
            return (self.width,) * self.depth
        return tuple(self.width)


@dataclass(frozen=True)
class SearchSpace:
    """Ranges Optuna searches. A one-element list (or equal bounds) fixes a value."""

    depth: tuple[int, int] = (1, 6)
    """hidden layers, int range (inclusive)"""
    width: tuple[int, int] = (8, 256)
    """units per hidden layer, int range on a log scale"""
    lr: tuple[float, float] = (1e-4, 3e-2)
    """learning rate, float range on a log scale"""
    activation: tuple[str, ...] = ("relu", "tanh", "sigmoid", "silu", "gelu", "leaky_relu", "elu")
    """activation choices"""
    scheduler: tuple[str, ...] | None = None
    """scheduler choices to search; None keeps [train].scheduler fixed"""
    optimizer: tuple[str, ...] | None = None
    """optimizer choices to search; None keeps [train].optimizer fixed"""
    per_layer_width: bool = False
    """suggest one width per hidden layer instead of one shared width"""


@dataclass(frozen=True)
class StudyConfig:
    """A whole `sinstudy run`: the study, its storage, the budget and the defaults of a trial."""

    study: str = "sinstudy"
    """study name; the same name and storage continue (resume) a study"""
    storage: str = "sqlite:///storage/sinstudy.db"
    """any Optuna storage URL; relative SQLite paths are relative to the working directory"""
    n_trials: int = 40
    """trials this run adds to the study"""
    timeout: float | None = None
    """stop starting new trials after this many seconds"""
    objectives: tuple[str, ...] = ("val_mse",)
    """what a trial's values are: val_mse (its best validation MSE) alone, or val_mse,n_params
    (a two-objective study: accuracy against size, its Pareto front; both minimised)"""
    sampler: str = "tpe"
    """tpe, random, grid, gp, cmaes or nsga2 (NSGA-II)"""
    pruner: str = "hyperband"
    """hyperband, median, sha (successive halving) or none"""
    seed: int = 0
    """seed of the sampler and of every trial's weights (trial k, repeat r: seed + repeats*k+r)"""
    repeats: int = 1
    """models per trial, one per seed, trained side by side; the trial reports their mean
    validation MSE each epoch (pruning acts on the mean curve) and its value is that curve's
    best"""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N"""
    engine: str = "auto"
    """batched (many trials as one computation), standard (Optuna's study.optimize, one trial at
    a time) or auto: batched"""
    slots: int | None = None
    """models the batched engine trains at once, per worker (default 32 on CPU, 1024 on GPU, at
    least --repeats); a trial takes --repeats of them"""
    stacks: str = "rebuild"
    """how the batched engine groups its slots: rebuild (each stack rebuilt from its current
    members whenever they change; no compute on free slots) or fixed (a stack per shape class
    keeps its buffers, and a new trial takes an ended one's slot in place; a free slot costs its
    share of arithmetic, but the buffers keep their addresses, as a CUDA graph needs)"""
    workers: int = 1
    """worker processes on this machine sharing the study, one engine each; --n-trials is met
    exactly across them"""
    devices: tuple[int, ...] | None = None
    """GPU ids, one worker (one engine) per id, round-robin when --workers is larger (none
    given: --device decides)"""
    heartbeat_interval: int = 5
    """seconds between a running trial's heartbeats (RDB: Optuna's heartbeat; journal: ours)"""
    grace_period: int = 20
    """a running trial silent this long is failed and retried by the next worker that looks"""
    max_retries: int = 1
    """how many times a crashed trial's params are retried"""
    storage_outage: int = 300
    """seconds a run waits out a storage it cannot reach (a database restarting, a full disk
    under SQLite), training on and storing what waited when it returns; 0: stop at once"""
    log_dir: str = ""
    """TensorBoard runs go to <log_dir>/<study>/trial-NNNN (default: `tensorboard` beside a
    SQLite or journal file; storage/tensorboard for PostgreSQL)"""
    artifact_dir: str = ""
    """Optuna artifact store (best-model weights), shared with optuna-dashboard (default:
    `artifacts` beside a SQLite or journal file; storage/artifacts for PostgreSQL)"""
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    space: SearchSpace = field(default_factory=SearchSpace)


# ---------------------------------------------------------------- validation


# Upper bounds: far above any sensible study, low enough that a typo fails here, in one line,
# instead of deep inside torch (an allocation of terabytes) or numpy (a seed past 2**32).
MAX_SEED = 2**31 - 1  # samplers seed numpy with seed + worker index + trials so far: < 2**32
MAX_POINTS = 10_000_000
MAX_WIDTH = 4096
MAX_DEPTH = 64
MAX_COUNT = 10_000_000  # trials, epochs
MAX_SECONDS = 7 * 24 * 3600
MAX_NAME = 100
MAX_REPEATS = 1024  # seeds per trial
_UNSAFE_NAME = re.compile(r"[/\\\x00-\x1f\x7f]")


def _positive_int(name: str, value: Any, *, minimum: int = 1, maximum: int = MAX_COUNT) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ConfigError(
            f"{name} must be an integer from {minimum} to {maximum:,}, got {value!r}"
        )


def check_study_name(name: Any) -> str:
    """A study name is a name, not a path: it names folders under storage/ (TensorBoard, plots)."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError("the study name must be a non-empty string (--study NAME)")
    if (
        len(name) > MAX_NAME
        or _UNSAFE_NAME.search(name)
        or name.startswith(".")
        or name != name.strip()
    ):
        raise ConfigError(
            f"study name {name[:40]!r}{'...' if len(name) > 40 else ''} is not a plain name; use "
            f"at most "
            f"{MAX_NAME} characters, no '/', '\\', control characters or leading '.' or spaces, "
            "e.g. --study sin-deep"
        )
    return name


def _positive_float(name: str, value: Any, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} must be a finite number {bound}, got {value!r}")


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")


def _range(
    name: str, value: Any, *, kind: type, low: float, log: bool, high: float = math.inf
) -> tuple:
    """Accept [lo, hi] (or [v] to fix v) and check type, order and bounds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or len(value) not in (1, 2):
        raise ConfigError(f"search_space.{name} must be [low, high], e.g. {name} = [1, 8]")
    lo, hi = value[0], value[-1]
    for v in (lo, hi):
        bad_type = isinstance(v, bool) or not isinstance(v, (int, float))
        if bad_type or (kind is int and not float(v).is_integer()) or not math.isfinite(v):
            raise ConfigError(f"search_space.{name} bounds must be {kind.__name__}s, got {v!r}")
    lo, hi = kind(lo), kind(hi)
    if lo > hi:
        raise ConfigError(f"search_space.{name} = [{lo}, {hi}] is reversed; write [{hi}, {lo}]")
    if lo < low or (log and lo <= 0):
        raise ConfigError(f"search_space.{name} must start at >= {low} (got {lo})")
    if hi > high:
        raise ConfigError(f"search_space.{name} must end at <= {high:,} (got {hi:,})")
    return (lo, hi)


def _choices(name: str, value: Any, allowed: tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(
            f"search_space.{name} must be a non-empty list, e.g. {name} = [{allowed[0]!r}]"
        )
    for v in value:
        if v not in allowed:
            raise ConfigError(
                f"unknown {name} {v!r} in search_space.{name}; choose from: {', '.join(allowed)}"
            )
    return tuple(dict.fromkeys(value))


def validate(cfg: StudyConfig) -> StudyConfig:
    """Check every field; return the config with ranges normalised. Raises ConfigError."""
    check_study_name(cfg.study)
    _positive_int("--n-trials", cfg.n_trials)
    if cfg.timeout is not None:
        _positive_float("--timeout", cfg.timeout)
        if cfg.timeout > MAX_SECONDS:
            raise ConfigError(
                f"--timeout must be at most {MAX_SECONDS} s (a week), got {cfg.timeout!r}"
            )
    _choice("sampler", cfg.sampler, SAMPLERS)
    _choice("pruner", cfg.pruner, PRUNERS)
    objectives = _validate_objectives(cfg)
    _validate_engine(cfg)
    _validate_recovery(cfg)
    _validate_data(cfg.data)
    validate_train(cfg.train)
    space = validate_space(cfg.space)
    if cfg.sampler == "cmaes":
        for name in ("activation", "scheduler", "optimizer"):
            choices = getattr(space, name)
            if choices is not None and len(choices) > 1:
                raise ConfigError(
                    f"the cmaes sampler cannot search the categorical {name!r}; fix it to one "
                    f"choice in [search_space] or use --sampler tpe"
                )
    engine = "batched" if cfg.engine == "auto" else cfg.engine
    return replace(cfg, space=space, engine=engine, objectives=objectives)


def _validate_objectives(cfg: StudyConfig) -> tuple[str, ...]:
    """The objectives, and a sampler and pruner that rank them all."""
    objectives = check_objectives(cfg.objectives)
    if len(objectives) > 1:
        if cfg.sampler not in MULTI_OBJECTIVE_SAMPLERS:
            raise ConfigError(
                f"the {cfg.sampler} sampler optimises one objective; with --objectives "
                f"{','.join(objectives)} use --sampler "
                f"{' / '.join(MULTI_OBJECTIVE_SAMPLERS)}"
            )
        if cfg.pruner not in MULTI_OBJECTIVE_PRUNERS:
            raise ConfigError(
                f"the {cfg.pruner} pruner ranks one objective; with --objectives "
                f"{','.join(objectives)} use --pruner {' / '.join(MULTI_OBJECTIVE_PRUNERS)}"
            )
    return objectives


def _validate_engine(cfg: StudyConfig) -> None:
    """The seed, the repeats and where and how the engines train them."""
    _positive_int("seed", cfg.seed, minimum=0, maximum=MAX_SEED)
    _positive_int("--repeats", cfg.repeats, maximum=MAX_REPEATS)
    if cfg.slots is not None and cfg.slots < cfg.repeats:
        raise ConfigError(
            f"--slots {cfg.slots} cannot hold one trial of --repeats {cfg.repeats}; "
            f"give --slots at least {cfg.repeats} (a trial's repeats train side by side)"
        )
    _positive_int("--workers", cfg.workers, maximum=256)
    _choice("engine", cfg.engine, ENGINES)
    _choice("stacks", cfg.stacks, STACKS)
    if cfg.slots is not None:
        _positive_int("--slots", cfg.slots, maximum=65536)
    if cfg.devices is not None:
        if not cfg.devices:
            raise ConfigError("--devices needs at least one GPU id, e.g. --devices 0,1")
        for d in cfg.devices:
            _positive_int("--devices", d, minimum=0, maximum=1023)


def _validate_recovery(cfg: StudyConfig) -> None:
    """Heartbeats and retries: a live trial must never look dead."""
    _positive_int("heartbeat_interval", cfg.heartbeat_interval, maximum=3600)
    _positive_int("grace_period", cfg.grace_period, maximum=MAX_SECONDS)
    if cfg.grace_period <= cfg.heartbeat_interval:
        raise ConfigError(
            f"grace_period ({cfg.grace_period}) must exceed heartbeat_interval "
            f"({cfg.heartbeat_interval}); "
            "a live trial would look dead"
        )
    _positive_int("max_retries", cfg.max_retries, minimum=0, maximum=100)
    _positive_int("storage_outage", cfg.storage_outage, minimum=0, maximum=MAX_SECONDS)


def _validate_data(d: DataConfig) -> None:
    _positive_int("data.n_train", d.n_train, minimum=2, maximum=MAX_POINTS)
    _positive_int("data.n_val", d.n_val, maximum=MAX_POINTS)
    _positive_int("data.n_test", d.n_test, maximum=MAX_POINTS)
    _positive_float("data.noise", d.noise, allow_zero=True)
    _choice("data.sampling", d.sampling, SAMPLINGS)
    _positive_int("data.seed", d.seed, minimum=0, maximum=MAX_SEED)
    _choice("data.input_scaling", d.input_scaling, INPUT_SCALINGS)


def check_objectives(value: Any) -> tuple[str, ...]:
    """val_mse alone, or val_mse and n_params (in that order: the first value is the MSE)."""
    if isinstance(value, str):
        value = tuple(v.strip() for v in value.split(","))
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(
            'objectives must be a list of names, e.g. objectives = ["val_mse", "n_params"]'
        )
    for v in value:
        if v not in OBJECTIVES:
            raise ConfigError(
                f"unknown objective {v!r}; use --objectives val_mse or val_mse,n_params"
            )
    value = tuple(value)
    if value not in (OBJECTIVES[:1], OBJECTIVES):
        raise ConfigError(
            f"objectives {','.join(value)!r} are not a study sinstudy runs; use --objectives "
            "val_mse or val_mse,n_params (the validation MSE first, each name once)"
        )
    return value


def validate_train(t: TrainConfig) -> None:
    _positive_int("train.depth", t.depth, maximum=MAX_DEPTH)
    widths = t.width if isinstance(t.width, (list, tuple)) else [t.width]
    for w in widths:
        _positive_int("train.width", w, maximum=MAX_WIDTH)
    if isinstance(t.width, (list, tuple)) and len(t.width) != t.depth:
        raise ConfigError(
            f"train.width lists {len(t.width)} widths for depth {t.depth}; give one per layer"
        )
    _choice("activation", t.activation, ACTIVATIONS)
    _positive_float("train.lr", t.lr)
    _choice("optimizer", t.optimizer, OPTIMIZERS)
    _positive_float("train.momentum", t.momentum, allow_zero=True)
    _positive_float("train.weight_decay", t.weight_decay, allow_zero=True)
    _choice("scheduler", t.scheduler, SCHEDULERS)
    _positive_int("train.step_size", t.step_size)
    _positive_float("train.gamma", t.gamma)
    _positive_int("train.batch_size", t.batch_size, maximum=MAX_POINTS)
    _positive_int("--max-epochs", t.max_epochs)
    _positive_int("train.seed", t.seed, minimum=0, maximum=MAX_SEED)


def validate_space(s: SearchSpace) -> SearchSpace:
    return SearchSpace(
        depth=_range("depth", s.depth, kind=int, low=1, log=False, high=MAX_DEPTH),
        width=_range("width", s.width, kind=int, low=1, log=True, high=MAX_WIDTH),
        lr=_range("lr", s.lr, kind=float, low=0.0, log=True),
        activation=_choices("activation", s.activation, ACTIVATIONS),
        scheduler=None if s.scheduler is None else _choices("scheduler", s.scheduler, SCHEDULERS),
        optimizer=None if s.optimizer is None else _choices("optimizer", s.optimizer, OPTIMIZERS),
        per_layer_width=_bool("search_space.per_layer_width", s.per_layer_width),
    )


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    return value


# ---------------------------------------------------------------- TOML


_SECTIONS = {
    "study": StudyConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "search_space": SearchSpace,
}
_NESTED = {"data", "train", "space"}


def _known(cls: type) -> set[str]:
    return {f.name for f in fields(cls)} - _NESTED


def load_toml(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a TOML file into {section: {key: value}}, rejecting unknown sections and keys."""
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"config file {str(p)!r} does not exist; check the --config path"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {str(p)!r}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid TOML: {e}") from None
    for section, table in raw.items():
        if section not in _SECTIONS:
            raise ConfigError(
                f"unknown section [{section}] in {p}; use one of: "
                f"{', '.join('[' + s + ']' for s in _SECTIONS)}"
            )
        if not isinstance(table, dict):
            raise ConfigError(f"{section} in {p} must be a [{section}] table")
        unknown = set(table) - _known(_SECTIONS[section])
        if unknown:
            key = sorted(unknown)[0]
            raise ConfigError(
                f"unknown key {key!r} in [{section}] of {p}; known keys: "
                f"{', '.join(sorted(_known(_SECTIONS[section])))}"
            )
    return raw


def build(toml: dict[str, dict[str, Any]] | None = None, **overrides: Any) -> StudyConfig:
    """Defaults, then the TOML tables, then CLI overrides (None = not given); validated."""
    toml = toml or {}
    space_kw = {
        k: (tuple(v) if isinstance(v, list) else v)
        for k, v in toml.get("search_space", {}).items()
    }
    train_kw = dict(toml.get("train", {}))
    if isinstance(train_kw.get("width"), list):
        train_kw["width"] = tuple(train_kw["width"])
    for key in ("max_epochs",):
        if overrides.get(key) is not None:
            train_kw[key] = overrides[key]
    study_kw = {**toml.get("study", {}), **{k: v for k, v in overrides.items() if v is not None}}
    if isinstance(study_kw.get("devices"), list):
        study_kw["devices"] = tuple(study_kw["devices"])
    if isinstance(study_kw.get("objectives"), list):
        study_kw["objectives"] = tuple(study_kw["objectives"])
    study_kw.pop("max_epochs", None)
    try:
        cfg = StudyConfig(
            **study_kw,
            data=DataConfig(**toml.get("data", {})),
            train=TrainConfig(**train_kw),
            space=SearchSpace(**space_kw),
        )
    except TypeError as e:  # unknown override name: a programming error, not user input
        raise ConfigError(str(e)) from None
    return validate(cfg)


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of config dataclass `cls` (its flag's help)."""
    import ast
    import inspect

    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
        ):
            docs[node.target.id] = after.value.value
    return docs


def models_at_once(cfg: StudyConfig, device_type: str) -> int:
    """Models one engine holds at once: the batched engine's slots, the standard one's repeats."""
    if cfg.engine == "standard":
        return cfg.repeats
    return cfg.slots or max(DEFAULT_SLOTS[device_type], cfg.repeats)


def to_dict(cfg: StudyConfig) -> dict[str, Any]:
    """Plain JSON-able dict, stored with the study so every setting travels with the result."""
    return asdict(cfg)
