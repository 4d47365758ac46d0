"""Writing the splits to Mosaic Streaming MDS with Spark, and reading their index back."""
from __future__ import annotations

import json
from pathlib import Path

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from streaming.base.converters import dataframe_to_mds

from recsys_assets.data import schema as S


def write_split_to_mds(splits: DataFrame, split: str, out: str | Path, *, partitions: int = 2,
                       compression: str | None = "zstd", size_limit: str = "64mb") -> dict:
    """Writes the rows of one split (MDS_COLUMNS, explicit types) and returns its index summary.

    Nullable ratings (implicit data) are written as NaN: MDS float columns have no null."""
    rows = splits.filter(F.col(S.SPLIT) == split).select(
        F.col(S.USER).cast("int"),
        F.col(S.ITEM).cast("int"),
        F.col(S.TIMESTAMP).cast("bigint"),
        F.coalesce(F.col(S.RATING), F.lit(float("nan"))).cast("float").alias(S.RATING),
        F.col(S.HISTORY).cast("array<int>"),
        F.col(S.HISTORY_LEN).cast("int"),
    )
    mds_kwargs = {"out": str(out), "columns": dict(S.MDS_COLUMNS), "size_limit": size_limit}
    if compression:
        mds_kwargs["compression"] = compression
    dataframe_to_mds(rows.repartition(partitions), merge_index=True, mds_kwargs=mds_kwargs)
    return summarize_mds(out)


def summarize_mds(path: str | Path) -> dict:
    """Rows, shards and bytes from a merged MDS index.json."""
    path = Path(path)
    index = json.loads((path / "index.json").read_text())
    shards = index["shards"]
    files = [p for p in path.rglob("*") if p.is_file()]
    return {
        "rows": int(sum(s["samples"] for s in shards)),
        "shards": len(shards),
        "bytes": int(sum(p.stat().st_size for p in files)),
        "columns": dict(zip(shards[0]["column_names"], shards[0]["column_encodings"])) if shards else {},
    }
