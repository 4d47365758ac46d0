"""The ranker's labelled pairs in memory: a Parquet pairs table (``label``, ``dense``, sparse columns and an
optional ``query_id``) as tensors, with the columns the model's layout needs checked on read."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recsys_assets.data.schema import DENSE, LABEL, QUERY_ID


@dataclasses.dataclass
class PairSet:
    """An evaluation set in memory: the columns as tensors (dense [n, D], bags [n, L] padded with -1)."""

    columns: dict[str, torch.Tensor]
    labels: np.ndarray
    query_ids: np.ndarray | None

    @property
    def n(self) -> int:
        return len(self.labels)

    def rows(self, lo: int, hi: int) -> dict[str, torch.Tensor]:
        return {k: v[lo:hi] for k, v in self.columns.items()}


def _pad_lists(values: Sequence, fill: int = -1) -> np.ndarray:
    lengths = np.fromiter((len(v) for v in values), dtype=np.int64, count=len(values))
    width = max(1, int(lengths.max()) if len(lengths) else 1)
    out = np.full((len(values), width), fill, dtype=np.int64)
    for i, v in enumerate(values):
        if len(v):
            out[i, : len(v)] = v
    return out


def load_pair_set(path: str | Path, layout: Sequence[Any], dense_in_features: int) -> PairSet:
    """Read a Parquet pairs table (file or folder) into a PairSet, checking the columns the model needs."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"evaluation pairs not found: {path}")
    table = pq.read_table(path)
    needed = [LABEL, DENSE] + [f.name for f in layout]
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise ValueError(f"evaluation pairs {path} lack columns {missing} (have {table.column_names})")
    cols: dict[str, torch.Tensor] = {}
    dense_lists = table.column(DENSE).to_pylist()
    dense = (
        np.asarray(dense_lists, dtype=np.float32).reshape(len(dense_lists), -1)
        if dense_lists
        else np.zeros((0, dense_in_features), np.float32)
    )
    if dense.shape[1] != dense_in_features:
        raise ValueError(
            f"evaluation pairs {path}: dense has {dense.shape[1]} features, the model expects {dense_in_features}"
        )
    cols[DENSE] = torch.from_numpy(dense)
    for f in layout:
        col = table.column(f.name)
        if f.multi_valued:
            cols[f.name] = torch.from_numpy(_pad_lists(col.to_pylist()))
        else:
            cols[f.name] = torch.from_numpy(col.to_numpy().astype(np.int64))
    labels = table.column(LABEL).to_numpy().astype(np.float32)
    qids = table.column(QUERY_ID).to_numpy().astype(np.int64) if QUERY_ID in table.column_names else None
    return PairSet(columns=cols, labels=labels, query_ids=qids)
