"""Reading the published splits table (``splits/`` of a dataset folder) into pandas."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from recsys_assets.data import schema as S

# what query states need: the evaluator's columns + the query tower's history
QUERY_SPLIT_COLUMNS = (S.USER, S.ITEM, S.TIMESTAMP, S.SPLIT, S.HISTORY, S.HISTORY_LEN, S.POSITION, S.RANKER_WINDOW)


def load_splits_frame(root: str | Path, columns: Sequence[str]):
    """The columns of ``<root>/splits`` as a pandas frame (Parquet, partitioned by split)."""
    import pyarrow.parquet as pq

    return pq.read_table(S.DatasetPaths(Path(root)).splits, columns=list(columns)).to_pandas()


def load_query_splits(root: str | Path):
    """The splits table with what query states need (history included)."""
    return load_splits_frame(root, QUERY_SPLIT_COLUMNS)
