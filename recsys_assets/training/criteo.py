"""A `DLRMTrainConfig` for a Criteo dataset written by `recsys_assets.data.criteo.write_criteo_dataset`.

    cfg = criteo_train_config("/data/criteo-ds", epochs=3, batch_size=512)
    result = train_dlrm(cfg)            # or: torchrun ... -m recsys_assets.training.dlrm --config cfg.json

The layout (26 tables, one per categorical feature), the dense feature count and the MDS / Parquet paths
come from the dataset's ``meta.json``; every other field is a keyword override. Early stopping and the
returned weights follow the validation set (``selection_set="validation"``); the test set is scored once,
with the returned weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from recsys_assets.training.dlrm import TEST_SET, DLRMTrainConfig


def load_criteo_meta(dataset_dir: str | Path) -> dict:
    path = Path(dataset_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no meta.json in {dataset_dir}: write the dataset with `python -m recsys_assets.data.criteo`"
        )
    meta = json.loads(path.read_text())
    if meta.get("format") != "criteo":
        raise ValueError(f"{path} is not a Criteo dataset (format={meta.get('format')!r})")
    return meta


def criteo_train_config(dataset_dir: str | Path, *, include_test: bool = True, **overrides: Any) -> DLRMTrainConfig:
    root = Path(dataset_dir).resolve()
    meta = load_criteo_meta(root)
    sets = {name: str(root / rel) for name, rel in meta["eval_sets"].items()}
    fields: dict[str, Any] = {
        "train_mds": (str(root / meta["train_mds"]),),
        "layout": tuple(meta["layout"]),
        "dense_in_features": int(meta["dense_in_features"]),
        "eval_sets": {name: path for name, path in sets.items() if name != TEST_SET},
        "final_sets": {TEST_SET: sets[TEST_SET]} if include_test and TEST_SET in sets else {},
        "selection_set": "validation",
        # Criteo pairs have no query ids, so no list metrics; its own settings (the ranker's defaults were chosen
        # on recommendation lists): the Criteo benchmark's figures were measured with these
        "early_stopping_metric": "auroc",
        "sparse_lr": 0.05,
        "batch_size": 256,
        "epochs": 5,
        "patience": 2,
    }
    fields.update(overrides)
    return DLRMTrainConfig.from_dict(fields)
