"""The saved-model format, written and read in one place: a trial's best weights as an Optuna
artifact (`model.pt`: the TrainConfig that rebuilds the network plus its state_dict), and the
fit image stored beside it. Both engines write through `upload_model`; `best`, `plot` and
`report` read through `load_model`, so nothing ever retrains."""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import optuna
import torch
from optuna.artifacts import FileSystemArtifactStore, download_artifact, upload_artifact
from optuna.trial import FrozenTrial
from torch import nn

from study.config import ConfigError, TrainConfig
from study.trial.model import build_mlp
from study.views import analysis

MODEL_FILE = "model.pt"  # artifact file name of a trial's best weights

State = dict[str, np.ndarray]  # a network's weights as plain arrays: picklable by value


def model_state(model: nn.Module) -> State:
    """The weights as plain CPU arrays. Plain data, not tensors: a tensor sent to another
    process travels as a handle into the sender's memory, unreadable once the sender is gone."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def build_model(tcfg: TrainConfig, state: State) -> nn.Sequential:
    model = build_mlp(tcfg.widths, tcfg.activation)
    model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
    return model.eval()


def save_model(tcfg: TrainConfig, state: State, path: Path, scaling: str = "unit") -> None:
    """Weights plus the TrainConfig that rebuilds them and how inputs were scaled
    (data.scale_inputs):
    enough for later commands, no retraining."""
    torch.save(
        {
            "train_config": asdict(tcfg),
            "input_scaling": scaling,
            "state_dict": {k: torch.as_tensor(v) for k, v in state.items()},
        },
        path,
    )


def upload_model(
    store: FileSystemArtifactStore,
    trial: optuna.Trial | FrozenTrial,
    number: int,
    tcfg: TrainConfig,
    state: State,
    storage: optuna.storages.BaseStorage | None = None,
    *,
    scaling: str = "unit",
) -> str:
    """A new best's weights and its fit image as artifacts of its (still running) trial: Optuna
    takes no artifacts on finished trials. Returns the weights' artifact id."""
    from study.views import plots  # plotly and matplotlib: loaded only when a new best is drawn

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / MODEL_FILE
        save_model(tcfg, state, path, scaling)
        artifact_id = upload_artifact(
            artifact_store=store,
            file_path=str(path),
            study_or_trial=trial,
            storage=storage,
            mimetype="application/octet-stream",
        )
        image = Path(tmp) / f"fit-trial-{number:04d}.png"
        plots.fit_png(
            analysis.fit(build_model(tcfg, state), scaling=scaling),
            image,
            title=f"trial #{number} vs sin(x)",
        )
        upload_artifact(
            artifact_store=store,
            file_path=str(image),
            study_or_trial=trial,
            storage=storage,
            mimetype="image/png",
        )
    return artifact_id


def best_fit(study: optuna.Study, artifact_dir: str | Path):
    """(analysis.Fit of the best trial's stored network, its trial), or (None, None) when no
    complete trial has stored weights."""
    top = analysis.top_trials(study, 1)
    if not top or "model_artifact" not in top[0].user_attrs:
        return None, None
    with tempfile.TemporaryDirectory() as tmp:
        model, _, scaling = load_model(top[0], artifact_dir, tmp)
    return analysis.fit(model, scaling=scaling), top[0]


def load_model(
    trial: FrozenTrial, artifact_dir: str | Path, tmp_dir: str | Path
) -> tuple[nn.Module, TrainConfig, str]:
    """The trial's stored best-epoch weights, rebuilt as a CPU model in eval mode, its config
    and the input scaling it was trained with (data.scale_inputs)."""
    artifact_id = trial.user_attrs.get("model_artifact")
    if artifact_id is None:
        raise ConfigError(
            f"trial {trial.number} has no stored model; only trials that were best when they "
            f"finished keep one"
        )
    path = Path(tmp_dir) / f"trial-{trial.number}.pt"
    download_artifact(
        artifact_store=FileSystemArtifactStore(str(artifact_dir)),
        file_path=str(path),
        artifact_id=artifact_id,
    )
    saved = torch.load(path, map_location="cpu", weights_only=True)
    tc = saved["train_config"]
    if isinstance(tc.get("width"), list):
        tc["width"] = tuple(tc["width"])
    tcfg = TrainConfig(**tc)
    model = build_mlp(tcfg.widths, tcfg.activation)
    model.load_state_dict(saved["state_dict"])
    return model.eval(), tcfg, saved.get("input_scaling", "unit")
