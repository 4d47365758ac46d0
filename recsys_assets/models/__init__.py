"""Models (pure torch / TorchRec; no Dagster or Spark in here)."""

from recsys_assets.models.features import FeatureSpec, FeatureStore, batch_to_kjt, build_kjt
from recsys_assets.models.two_tower import (
    ItemEncoder,
    QueryEncoder,
    TwoTower,
    TwoTowerModelConfig,
    TwoTowerTrainTask,
    build_two_tower,
    load_two_tower,
)

__all__ = [
    "FeatureSpec",
    "FeatureStore",
    "ItemEncoder",
    "QueryEncoder",
    "TwoTower",
    "TwoTowerModelConfig",
    "TwoTowerTrainTask",
    "batch_to_kjt",
    "build_kjt",
    "build_two_tower",
    "load_two_tower",
]
