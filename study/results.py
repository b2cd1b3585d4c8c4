"""Read a finished (or running) study back from storage alone: never retrains, never writes."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import torch
from optuna.artifacts import FileSystemArtifactStore, download_artifact
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from . import storage as storage_mod
from .config import ConfigError, TrainConfig
from .model import build_mlp


def open_for_reading(url: str) -> optuna.storages.BaseStorage:
    """Open a storage that must already exist (a missing file is a ConfigError, not created)."""
    parsed = storage_mod.check(url)
    if parsed.path is not None and not parsed.path.exists():
        raise ConfigError(f"no study storage at {str(parsed.path)!r}; run `sinstudy run` first or fix --storage")
    return storage_mod.open_storage(parsed)


def load_existing(study_name: str, url: str) -> optuna.Study:
    """Load a study that must already exist; a missing file or study is a ConfigError."""
    storage = open_for_reading(url)
    names = optuna.get_all_study_names(storage)
    if study_name not in names:
        known = ", ".join(repr(n) for n in names) or "none"
        raise ConfigError(f"no study {study_name!r} in {url} (studies there: {known}); fix --study")
    return optuna.load_study(study_name=study_name, storage=storage)


def best_trial(study: optuna.Study) -> FrozenTrial:
    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        raise ConfigError(f"study {study.study_name!r} has no complete trial yet; run more trials")
    return study.best_trial


def load_model(trial: FrozenTrial, artifact_dir: str | Path, tmp_dir: str | Path) -> tuple[nn.Module, TrainConfig]:
    """The trial's stored best-epoch weights, rebuilt as a CPU model in eval mode."""
    artifact_id = trial.user_attrs.get("model_artifact")
    if artifact_id is None:
        raise ConfigError(f"trial {trial.number} has no stored model; only trials that were best when they finished keep one")
    path = Path(tmp_dir) / f"trial-{trial.number}.pt"
    download_artifact(artifact_store=FileSystemArtifactStore(str(artifact_dir)), file_path=str(path), artifact_id=artifact_id)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    tc = saved["train_config"]
    if isinstance(tc.get("width"), list):
        tc["width"] = tuple(tc["width"])
    tcfg = TrainConfig(**tc)
    model = build_mlp(tcfg.widths, tcfg.activation)
    model.load_state_dict(saved["state_dict"])
    return model.eval(), tcfg


def best_text(study_name: str, url: str) -> str:
    from .analysis import Counts
    from .runner import describe_trial

    study = load_existing(study_name, url)
    trial = best_trial(study)
    c = Counts.of(study.get_trials(deepcopy=False))
    cfg = json.loads(study.user_attrs.get("config", "{}"))
    lines = [f"study          {study_name}  ({c.complete} complete, {c.pruned} pruned, {c.failed} failed)"]
    lines += describe_trial(trial)
    if cfg:
        lines.append(f"max epochs     {cfg['train']['max_epochs']}, sampler {cfg['sampler']}, pruner {cfg['pruner']}")
    return "\n".join(lines)
