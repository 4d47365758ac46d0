"""Distributed TorchRec training (no Dagster or Spark in here).

- `recsys_assets.training.common`: process group, sharding plan + DMP, optimizers, gathering sharded state,
  broadcasting results, Streaming loaders, progress reporting (shared by the Two Tower and DLRM trainers).
- `recsys_assets.training.two_tower`: `train_two_tower(TwoTowerTrainConfig) -> TwoTowerTrainResult`, also
  runnable as ``torchrun --nproc_per_node N -m recsys_assets.training.two_tower --config cfg.json``.

Names are resolved lazily (PEP 562) so that ``python -m recsys_assets.training.two_tower`` runs cleanly.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from recsys_assets.training.two_tower import TwoTowerTrainConfig, TwoTowerTrainResult, train_two_tower

_TWO_TOWER_NAMES = ("TwoTowerTrainConfig", "TwoTowerTrainResult", "train_two_tower")


def __getattr__(name: str) -> Any:
    if name in _TWO_TOWER_NAMES:
        return getattr(importlib.import_module("recsys_assets.training.two_tower"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_TWO_TOWER_NAMES)
