"""The saved-model format, written and read in one place: a trial's best weights as an Optuna
artifact (`model.pt`: the TrainConfig that rebuilds the network plus its state_dict), and the
fit image stored beside it. Both engines write through `store_model`; `best`, `plot` and
`report` read through `load_model`, so nothing ever retrains."""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import BinaryIO

import numpy as np
import optuna
import torch
from optuna.artifacts import FileSystemArtifactStore, download_artifact, upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import FrozenTrial
from torch import nn

from study.config import ConfigError, TrainConfig
from study.trial.model import build_mlp
from study.views import analysis, folders

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


class ArtifactFolder(FileSystemArtifactStore):
    """Optuna's file-system artifact store, less the partial file a failed write leaves (a full
    disk): the file goes again, so no file is left that no trial references."""

    def __init__(self, base_path: str | Path):
        super().__init__(base_path)
        self.base = Path(base_path)

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        try:
            super().write(artifact_id, content_body)
        except OSError:
            (self.base / Path(artifact_id).name).unlink(missing_ok=True)
            raise


def store_model(
    store: ArtifactFolder,
    trial: optuna.Trial | FrozenTrial,
    number: int,
    tcfg: TrainConfig,
    state: State,
    storage: optuna.storages.BaseStorage | None = None,
    *,
    scaling: str = "unit",
) -> dict[str, str]:
    """A new best's weights and its fit image as artifacts of its (still running) trial: Optuna
    takes no artifacts on finished trials. Returns the trial's attr: `model_artifact`, the
    weights' artifact id, or, where they could not be written, folders.MISSING_ATTR with why
    (one warning per process; the trial is stored all the same). A fit image that cannot be
    written is warned of and left out."""
    from study.views import plots  # plotly and matplotlib: loaded only when a new best is drawn

    def upload(path: Path, mimetype: str) -> str | OSError:
        try:
            return upload_artifact(
                artifact_store=store,
                file_path=str(path),
                study_or_trial=trial,
                storage=storage,
                mimetype=mimetype,
            )
        except OSError as e:
            folders.warn_once("artifact", store.base, e, _LOST)
            return e

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / MODEL_FILE
        save_model(tcfg, state, path, scaling)
        artifact_id = upload(path, "application/octet-stream")
        if isinstance(artifact_id, OSError):
            why = f"{folders.cause(artifact_id)}: {store.base} could not be written"
            return {folders.MISSING_ATTR: why}
        image = Path(tmp) / f"fit-trial-{number:04d}.png"
        plots.fit_png(
            analysis.fit(build_model(tcfg, state), scaling=scaling),
            image,
            title=f"trial #{number} vs sin(x)",
        )
        upload(image, "image/png")  # a fit image that cannot be written is warned of, no more
    return {"model_artifact": artifact_id}


_LOST = f"new bests' weights or fit images are not stored (trial attr {folders.MISSING_ATTR})"


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
    if artifact_id is None and folders.MISSING_ATTR in trial.user_attrs:
        raise ConfigError(
            f"trial {trial.number}'s weights were not stored "
            f"({trial.user_attrs[folders.MISSING_ATTR]})"
        )
    if artifact_id is None:
        raise ConfigError(
            f"trial {trial.number} has no stored model; only trials that were best when they "
            f"finished keep one"
        )
    path = Path(tmp_dir) / f"trial-{trial.number}.pt"
    try:
        download_artifact(
            artifact_store=FileSystemArtifactStore(str(artifact_dir)),
            file_path=str(path),
            artifact_id=artifact_id,
        )
    except ArtifactNotFound:
        raise ConfigError(
            f"the weights of trial {trial.number} ({Path(artifact_dir) / artifact_id}) are not "
            f"in the artifact folder {str(artifact_dir)!r}; give the folder its run stored them "
            f"in with --artifact-dir (the run's [study] artifact_dir)"
        ) from None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    tc = saved["train_config"]
    if isinstance(tc.get("width"), list):
        tc["width"] = tuple(tc["width"])
    tcfg = TrainConfig(**tc)
    model = build_mlp(tcfg.widths, tcfg.activation)
    model.load_state_dict(saved["state_dict"])
    return model.eval(), tcfg, saved.get("input_scaling", "unit")
