"""The opening of a run: `open_run(cfg) -> Run`, made once and handed to the engines and workers.

Order matters: config and device are validated, then the storage is checked (read-only), and
only then is anything written. A study that exists is continued, but only with the same search
space and data: mixing trials of two spaces would make its importances and best trial meaningless.
Nothing after the opening opens the storage from the config: every process of the run uses the
run's store (a worker process reconnects it).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna
import torch

from study import __version__, store
from study.config import ConfigError, StudyConfig, models_at_once, to_dict
from study.quiet import experimental
from study.run import interrupt
from study.run.batched import kernels
from study.run.budget import Budget
from study.run.search import make_pruner, make_sampler
from study.store import Store, recovery
from study.store.outage import Outage
from study.trial import attrs, objectives
from study.views import folders

VERSION_ATTR = "sinstudy_version"
# every trial's first value: its best validation MSE (the mean over repeats); a second, if the
# study has two objectives: its parameter count
METRIC_NAME = "val_mse"


def resolve_device(name: str, *, say: Callable[[str], None] = print) -> torch.device:
    """auto -> cuda if available (saying once when it is not), else check the named device."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        say("note: no GPU found (torch.cuda.is_available() is False); training on the CPU")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ConfigError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"device {name!r} is not available (no CUDA GPU visible); use --device cpu or auto"
        )
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(
            f"device {name!r} does not exist: {torch.cuda.device_count()} GPU(s) visible; use "
            f"cuda:0..cuda:{torch.cuda.device_count() - 1}"
        )
    return dev


def check_devices(devices: tuple[int, ...]) -> torch.device:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ConfigError(
            "--devices needs CUDA GPUs, but none is visible; drop --devices or use --workers N"
        )
    bad = [d for d in devices if d >= count]
    if bad:
        raise ConfigError(
            f"--devices {bad[0]} does not exist: {count} GPU(s) visible (ids 0..{count - 1})"
        )
    return torch.device("cuda")


def open_study_store(cfg: StudyConfig, parsed: store.StorageURL | None = None) -> store.Store:
    """The study's storage with the heartbeat settings of the config (every process alike)."""
    hb = store.Heartbeat(
        cfg.heartbeat_interval, cfg.grace_period, cfg.max_retries, cfg.storage_outage
    )
    opened = store.open_store(parsed or store.parse(cfg.storage), hb)
    opened.outage.give_up = interrupt.requested  # Ctrl-C ends a wait for the storage
    return opened


def _identity(cfg: StudyConfig) -> dict[str, Any]:
    """What must match for two runs to share a study: the search space, the data and the
    repeats per trial (a trial's value is a mean over that many seeds)."""
    d = to_dict(cfg)
    return {"search_space": d["space"], "data": d["data"], "repeats": cfg.repeats}


def check_study(cfg: StudyConfig, storage: optuna.storages.BaseStorage) -> None:
    """An existing study must minimise the configured objectives and have been made with the
    same space and data."""
    if cfg.study not in optuna.get_all_study_names(storage):
        return
    existing = optuna.load_study(study_name=cfg.study, storage=storage)
    check_objectives(cfg, existing)
    if any(d != optuna.study.StudyDirection.MINIMIZE for d in existing.directions):
        raise ConfigError(
            f"study {cfg.study!r} maximises its value; sinstudy minimises MSE; use another "
            f"--study name"
        )
    stored = _stored_identity(existing)
    if stored is None:
        raise ConfigError(
            f"study {cfg.study!r} was not made by sinstudy; use another --study name"
        )
    stored, identity = json.loads(stored), json.loads(json.dumps(_identity(cfg)))
    stored.setdefault("repeats", 1)  # studies made before repeats existed had one model per trial
    diff = [k for k in identity if stored.get(k) != identity[k]]
    if diff:
        raise ConfigError(
            f"study {cfg.study!r} was created with another {' and '.join(diff)}; run with the "
            f"config it was created with, or start a new study with --study NAME"
        )


def budget_note(cfg: StudyConfig, storage: optuna.storages.BaseStorage) -> str | None:
    """A run whose epochs per trial differ from those the study was created with joins it (a
    resume at a shorter budget is a common check), but says so: a value is the best of a
    trial's epochs and the pruner's rungs are fractions of them, so the views rank values of two
    budgets as one."""
    if cfg.study not in optuna.get_all_study_names(storage):
        return None
    attrs = optuna.load_study(study_name=cfg.study, storage=storage).user_attrs
    was = json.loads(attrs.get("config", "{}")).get("train", {}).get("max_epochs")
    if was is None or was == cfg.train.max_epochs:
        return None
    return (
        f"note: study {cfg.study!r} was created with {was} epochs per trial and this run trains "
        f"{cfg.train.max_epochs}: the views rank both budgets' values as one; --max-epochs {was} "
        f"keeps them comparable, another --study keeps them apart"
    )


def check_objectives(cfg: StudyConfig, study: optuna.Study) -> None:
    """A study keeps the objectives it was made with: one value per trial, or two."""
    names = study.metric_names  # None: made before sinstudy named them, or by another tool
    want = ",".join(cfg.objectives)
    if names is None:
        if len(study.directions) == len(cfg.objectives):
            return
        raise ConfigError(
            f"study {cfg.study!r} has {len(study.directions)} objectives, not "
            f"{len(cfg.objectives)} ({want}); use another --study name"
        )
    if tuple(names) != tuple(cfg.objectives):
        now = ",".join(names)
        raise ConfigError(
            f"study {cfg.study!r} has the objectives {now}, not {want}; run it with "
            f"--objectives {now}, or start a new study with --study NAME"
        )


CREATION_WAIT_S = 10.0  # how long a study that another run is creating may lack its identity


def _stored_identity(study: optuna.Study) -> str | None:
    """The study's identity attr. A study without one and without trials may be one that
    another run has created a moment ago and is about to label (open_study): wait for it."""
    deadline = time.monotonic() + CREATION_WAIT_S
    while True:
        attrs = study._storage.get_study_user_attrs(study._study_id)
        if "identity" in attrs:
            return attrs["identity"]
        if study._storage.get_n_trials(study._study_id) or time.monotonic() > deadline:
            return None
        time.sleep(0.2)


def open_study(cfg: StudyConfig, storage: optuna.storages.BaseStorage) -> optuna.Study:
    """Create the study, or load it (after check_study), recording the config on creation.

    Only the run that created the study labels it (its id, identity, config): two runs that
    labelled one new study at the same moment each claimed the TensorBoard folder with their
    own id, and the id that stood refused the other's folder. A run that finds the study waits
    for its creator's label (check_study)."""
    kw = dict(study_name=cfg.study, storage=storage, sampler=make_sampler(cfg))
    try:
        study = optuna.create_study(
            **kw, directions=objectives.directions(cfg), pruner=make_pruner(cfg)
        )
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(**kw, pruner=make_pruner(cfg))
        check_study(cfg, storage)  # waits for the label of a study created a moment ago
        if UID_ATTR not in study.user_attrs:  # made before sinstudy stored an id
            study.set_user_attr(UID_ATTR, uuid.uuid4().hex)
        name_metric(study, cfg.objectives)
        return study
    name_metric(study, cfg.objectives)
    study.set_user_attr(UID_ATTR, uuid.uuid4().hex)
    study.set_user_attr("identity", json.dumps(_identity(cfg)))
    # no password in it: optuna-dashboard serves study attrs to anyone who can reach it
    stored = {**to_dict(cfg), "storage": store.redact(cfg.storage)}
    study.set_user_attr("config", json.dumps(stored))
    study.set_user_attr(VERSION_ATTR, __version__)
    return study


def name_metric(study: optuna.Study, objectives: tuple[str, ...] = (METRIC_NAME,)) -> None:
    """The values' names, as optuna-dashboard and Optuna's plots show them (not "Objective 0")."""
    if study.metric_names is None:
        with experimental():
            study.set_metric_names(list(objectives))


def check_folders(cfg: StudyConfig) -> None:
    """The TensorBoard and artifact folders must take a file (folders.probe; exit 1 if not)."""
    for flag, folder in (("log_dir", cfg.log_dir), ("artifact_dir", cfg.artifact_dir)):
        folders.probe(flag, folder)


UID_ATTR = "sinstudy_uid"  # a study's own id: it travels with a copied or moved storage


def _marker(cfg: StudyConfig) -> Path:
    return Path(cfg.log_dir) / cfg.study / ".study-uid"


def check_tensorboard_owner(
    cfg: StudyConfig, storage: optuna.storages.BaseStorage | None, new_file: Path | None = None
) -> None:
    """TensorBoard runs go to <log_dir>/<study>/trial-NNNN: two studies of the same name in two
    storages would append to the same runs. The folder records the id of the study it belongs
    to; a run of another study is refused with the fix. `storage` None: a storage not created
    yet (its file `new_file` absent when the caller looked), which cannot hold that study."""
    marker = _marker(cfg)
    if not marker.exists():
        return
    if storage is None and new_file is not None and new_file.exists():
        # Another run of the command created the storage since (and claimed the folder): the
        # check after opening it decides.
        return
    uid = None
    if storage is not None and cfg.study in optuna.get_all_study_names(storage):
        uid = optuna.load_study(study_name=cfg.study, storage=storage).user_attrs.get(UID_ATTR)
    if uid != marker.read_text().strip():
        raise ConfigError(
            f"TensorBoard folder {str(marker.parent)!r} holds the runs of another study named "
            f"{cfg.study!r} "
            "(in another storage); use another --study name, another [study] log_dir, or delete "
            "that folder"
        )


def claim_tensorboard_folder(cfg: StudyConfig, study: optuna.Study) -> None:
    marker = _marker(cfg)
    marker.parent.mkdir(parents=True, exist_ok=True)
    uid = study.user_attrs[UID_ATTR] + "\n"
    with contextlib.suppress(FileNotFoundError):
        if marker.read_text() == uid:
            return
    # Written aside, then renamed over it: a run checking the folder at that moment reads the
    # old marker or the new one, never an empty file (which it would refuse as another study's).
    aside = marker.with_name(f"{marker.name}.{os.getpid()}.tmp")
    aside.write_text(uid)
    os.replace(aside, marker)


def estimate_bytes(cfg: StudyConfig, slots: int) -> int:
    """Memory of `slots` copies of the largest model the space allows, as the batched engine
    holds them: weights, optimizer state, best weights, gradient and scratch rows, plus the
    activations of a minibatch and of the validation set (float32)."""
    d, w = cfg.space.depth[1], cfg.space.width[1]
    params = 2 * w + (d - 1) * (w * w + w) + w + 1
    rows = 6 * params
    activations = (
        4 * cfg.train.batch_size * w * d + 2 * cfg.data.n_val * w * d + 3 * cfg.data.n_train
    )
    return 4 * slots * (rows + activations)


def _available_ram() -> int:
    """Bytes a new allocation can get: Linux's MemAvailable (free plus reclaimable page cache),
    else all of physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# What one process of a run holds besides its models (torch, Optuna, SQLAlchemy, and in a writer
# TensorBoard and matplotlib), with some margin.
PROCESS_BYTES = 350 * 2**20


def check_memory(
    cfg: StudyConfig, device: torch.device, slots: int, *, processes: int = 1
) -> None:
    """Refuse (exit 2) a space whose largest model, `slots` times, cannot fit the device, or a
    run whose `processes` (workers and their writers) cannot fit this machine's memory."""
    need = estimate_bytes(cfg, slots)
    ram = _available_ram()
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else ram
    if need > 0.8 * free:
        raise ConfigError(
            f"the largest model of the search space (depth {cfg.space.depth[1]}, width "
            f"{cfg.space.width[1]}) "
            f"in {slots} slot(s) needs about {need / 2**30:.1f} GiB, more than the "
            f"{free / 2**30:.1f} GiB free on "
            f"{device}; lower search_space.depth / width or --slots"
        )
    host = processes * PROCESS_BYTES + (need if device.type == "cpu" else 0)
    if processes > 1 and host > 0.8 * ram:
        raise ConfigError(
            f"{processes} processes (workers and their storage writers, about "
            f"{PROCESS_BYTES // 2**20} MiB each) need about {host / 2**30:.1f} GiB, more than "
            f"the {ram / 2**30:.1f} GiB of memory available; use fewer --workers"
        )


def worker_devices(cfg: StudyConfig, device: str) -> list[tuple[str, dict[str, str]]]:
    """(device, extra environment) per worker: with --devices each worker sees only its card."""
    if cfg.devices is None:
        return [(device, {})] * cfg.workers
    n = max(cfg.workers, len(cfg.devices))
    return [
        ("cuda:0", {"CUDA_VISIBLE_DEVICES": str(cfg.devices[i % len(cfg.devices)])})
        for i in range(n)
    ]


@dataclass
class Run:
    """What a run opens once, before anything trains, and hands to its engines and worker
    processes: the checked device and each worker's placement, the run's store (a spawned
    process reconnects it), its budget, name and what its start found. Each process loads the
    study itself (`load_study`): an Optuna Study keeps a cache of its storage's trials."""

    cfg: StudyConfig
    device: torch.device
    placements: list[tuple[str, dict[str, str]]]
    store: Store
    budget: Budget
    name: str  # the `run` attr of every trial this run's processes start
    recovered: dict[int, str]  # trials of earlier runs its start failed: number -> why
    before: frozenset[int]  # the study's trial numbers before it (queued ones excepted)
    running_before: frozenset[int]  # of those, the ones RUNNING (other runs') when it started

    @classmethod
    def queued(cls, cfg: StudyConfig, opened: Store, device: torch.device, n: int) -> Run:
        """A run of `n` trials queued in a study on a store opened already (compare's cells)."""
        none = frozenset()
        placements = [(str(device), {})]
        budget = Budget(n, None)
        return cls(cfg, device, placements, opened, budget, attrs.run_id(), {}, none, none)

    def sampler(self, seed: int | None = None, stored: int = 0) -> optuna.samplers.BaseSampler:
        return make_sampler(self.cfg, seed=seed, stored=stored)

    def pruner(self) -> optuna.pruners.BasePruner:
        return make_pruner(self.cfg)

    def load_study(self, seed: int | None = None) -> optuna.Study:
        """The run's study in this process, its sampler seeded with `seed` plus the trials it
        holds (make_sampler) and its pruner."""
        study = optuna.load_study(
            study_name=self.cfg.study, storage=self.store.optuna, pruner=self.pruner()
        )
        study.sampler = self.sampler(seed, stored=len(study.get_trials(deepcopy=False)))
        return study

    @property
    def in_process(self) -> bool:
        """One engine in this process (no --workers, no --devices)."""
        return len(self.placements) == 1 and not self.cfg.devices

    def where(self) -> str:
        """Where it trains, as the summary says it."""
        if len(self.placements) == 1 and not self.placements[0][1]:
            return self.placements[0][0]
        gpus = sorted({env["CUDA_VISIBLE_DEVICES"] for _, env in self.placements if env})
        return f"{len(self.placements)} workers on " + (
            f"GPUs {','.join(gpus)}" if gpus else self.placements[0][0]
        )


def with_folders(cfg: StudyConfig) -> StudyConfig:
    """The config with its view folders named: one not set goes beside the study's storage
    (store.beside), where every reader looks for it."""
    return replace(
        cfg,
        log_dir=cfg.log_dir or store.beside(cfg.storage, "tensorboard"),
        artifact_dir=cfg.artifact_dir or store.beside(cfg.storage, "artifacts"),
    )


def open_run(cfg: StudyConfig, *, say: Callable[[str], None] = print) -> Run:
    """Check everything a run needs, then open its study: the device (and the engine's
    kernels on it), the memory of its processes, the storage (read, never written, until every
    check passed), its folders and the study's identity. Then the study is created or
    continued, the TensorBoard folder claimed, earlier runs' dead trials failed and retried.
    Notes are said only once every check has passed, so a refusal stays one line."""
    cfg = with_folders(cfg)
    notes: list[str] = []
    device = _device(cfg, notes)
    placements = worker_devices(cfg, str(device))
    # models held at once on one device: every CPU worker shares this machine, GPU workers
    # their card; each worker is a process, and a batched engine's writer another
    sharing = Counter(env.get("CUDA_VISIBLE_DEVICES") for _, env in placements)
    processes = len(placements) * (2 if cfg.engine == "batched" else 1)
    check_memory(
        cfg,
        device,
        models_at_once(cfg, device.type) * max(sharing.values()),
        processes=processes,
    )
    opened = _open_store(cfg, notes, workers=len(placements))
    for note in notes:
        say(note)
    study = open_study(cfg, opened.optuna)
    Path(cfg.artifact_dir).mkdir(parents=True, exist_ok=True)
    claim_tensorboard_folder(cfg, study)
    recovered = recovery.sweep_stale(
        opened, study, grace_period=cfg.grace_period, max_retries=cfg.max_retries
    )
    for n, why in recovered.items():
        retry = " and queued for retry" if cfg.max_retries else ""
        say(f"trial #{n} of an earlier run: {why}; marked FAIL{retry}")
    stored = study.get_trials(deepcopy=False)
    return Run(
        cfg=cfg,
        device=device,
        placements=placements,
        store=opened,
        budget=Budget(cfg.n_trials, cfg.timeout, workers=len(placements)),
        name=attrs.new_run(),
        recovered=recovered,
        before=frozenset(t.number for t in stored if t.state != optuna.trial.TrialState.WAITING),
        running_before=frozenset(
            t.number for t in stored if t.state == optuna.trial.TrialState.RUNNING
        ),
    )


def _device(cfg: StudyConfig, notes: list[str]) -> torch.device:
    """The run's device, checked, with full float32 matmuls (the engines must agree with
    train.py) and the batched engine's kernels probed on it."""
    device = (
        resolve_device(cfg.device, say=notes.append)
        if cfg.devices is None
        else check_devices(cfg.devices)
    )
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if cfg.engine == "batched":
        kernels.check(device.type)
    return device


def _open_store(cfg: StudyConfig, notes: list[str], *, workers: int) -> Store:
    """Check the storage (read-only) and the folders, then open the store and check the study
    it holds (its identity, its TensorBoard folder's owner)."""
    waits = Outage(cfg.storage_outage, meanwhile="the run starts when it answers", past="stopped")
    waits.give_up = interrupt.requested
    parsed = store.check(cfg.storage, outage=waits)
    check_folders(cfg)
    if (new_file := parsed.missing_file()) is not None:
        check_tensorboard_owner(cfg, None, new_file)  # before the file is created
    opened = open_study_store(cfg, parsed)
    check_study(cfg, opened.optuna)
    check_tensorboard_owner(cfg, opened.optuna)
    notes += [n for n in [budget_note(cfg, opened.optuna)] if n]
    notes += opened.advice(workers)
    notes += opened.opening_notes()
    return opened
