"""The model files of a published model folder: what a training run saves and what serving loads back
(weights_only: no arbitrary unpickling)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# file of each Two Tower fit, by phase (data/phases.py): "test" = the served model (refit on train +
# validation), "validation" = the train-only fit (its candidates are the ranker's holdout lists), "ranker" = the
# fit on the train rows before the ranker window (its candidates train the ranker); no model that saw a query's
# row, or a later one, proposes that query's candidates
TWO_TOWER_FILES = {"test": "model.pt", "validation": "model_validation.pt", "ranker": "model_ranker.pt"}
DLRM_FILE = "model.pt"

# a folder path, or an asset value that carries one (TrainedModel)
ModelFolder = str | Path | Any


def _folder(model: ModelFolder) -> Path:
    return Path(getattr(model, "path", model))


def save_two_tower(folder: Path, result: Any, phase: str = "test") -> None:
    """A TwoTowerTrainResult's weights, model config and feature spec."""
    import torch

    torch.save(
        {
            "state_dict": result.state_dict,
            "model_config": result.model_config,
            "feature_spec": result.feature_spec,
            "fit_folders": list(result.fit_folders),
        },
        Path(folder) / TWO_TOWER_FILES[phase],
    )


def load_trained_two_tower(model: ModelFolder, phase: str = "test"):
    """(unsharded TwoTower, FeatureSpec) of a published Two Tower folder; `phase` as in TWO_TOWER_FILES."""
    import torch

    from recsys_assets.models.features import FeatureSpec
    from recsys_assets.models.two_tower import TwoTowerModelConfig, load_two_tower

    if phase not in TWO_TOWER_FILES:
        raise ValueError(f"phase must be one of {sorted(TWO_TOWER_FILES)}, got {phase!r}")
    blob = torch.load(_folder(model) / TWO_TOWER_FILES[phase], weights_only=True)
    spec_dict = dict(blob["feature_spec"])
    spec_dict["user_attributes"] = tuple(tuple(x) for x in spec_dict["user_attributes"])
    spec = FeatureSpec(**spec_dict)
    return load_two_tower(blob["state_dict"], spec, TwoTowerModelConfig.from_dict(blob["model_config"])), spec


def two_tower_fit_folders(model: ModelFolder, phase: str) -> list[str]:
    """The MDS folders (schema.DatasetPaths.mds) the phase's Two Tower fit was trained on."""
    import torch

    blob = torch.load(_folder(model) / TWO_TOWER_FILES[phase], weights_only=True)
    return list(blob["fit_folders"])


def save_dlrm(folder: Path, result: Any) -> None:
    """A DLRMTrainResult's weights, model config and sparse layout."""
    import torch

    torch.save(
        {"state_dict": result.state_dict, "model_config": result.model_config, "layout": result.layout},
        Path(folder) / DLRM_FILE,
    )


def load_dlrm_model(model: ModelFolder):
    """(unsharded DLRM, layout, DLRMModelConfig) of a published DLRM folder."""
    import torch

    from recsys_assets.models.dlrm import DLRMModelConfig, layout_from_dicts, load_dlrm

    blob = torch.load(_folder(model) / DLRM_FILE, weights_only=True)
    layout = layout_from_dicts(blob["layout"])
    cfg = DLRMModelConfig.from_dict(blob["model_config"])
    return load_dlrm(blob["state_dict"], layout, cfg), layout, cfg
