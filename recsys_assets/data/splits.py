"""Reading the published splits table (``splits/`` of a dataset folder) into pandas."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def load_splits_frame(root: str | Path, columns: Sequence[str]):
    """The columns of ``<root>/splits`` as a pandas frame (Parquet, partitioned by split)."""
    import pyarrow.parquet as pq

    from recsys_assets.data.schema import DatasetPaths

    return pq.read_table(DatasetPaths(Path(root)).splits, columns=list(columns)).to_pandas()
