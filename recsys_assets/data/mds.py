"""Writing the splits to Mosaic Streaming MDS with Spark, and reading their index back."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from recsys_assets.data import schema as S

if TYPE_CHECKING:  # Spark / the converter are imported where used: training validates MDS without Spark
    from pyspark.sql import DataFrame


def write_split_to_mds(
    splits: DataFrame,
    split: str,
    out: str | Path,
    *,
    partitions: int = 2,
    compression: str | None = "zstd",
    size_limit: str = "64mb",
    remote: str | None = None,
) -> dict:
    """Writes the rows of one split (MDS_COLUMNS, explicit types) and returns its index summary.

    Nullable ratings (implicit data) are written as NaN: MDS float columns have no null.
    remote: also upload the split there (s3://, gs://, dbfs:/, file://, ...) through Streaming's own uploader
        (``out=(local, remote)``: each writer task uploads its shards, the merged index.json follows); the local
        copy in `out` is kept (the summary and the MDS checks read it)."""
    from pyspark.sql import functions as F
    from streaming.base.converters import dataframe_to_mds

    rows = splits.filter(F.col(S.SPLIT) == split).select(
        F.col(S.USER).cast("int"),
        F.col(S.ITEM).cast("int"),
        F.col(S.TIMESTAMP).cast("bigint"),
        F.coalesce(F.col(S.RATING), F.lit(float("nan"))).cast("float").alias(S.RATING),
        F.col(S.HISTORY).cast("array<int>"),
        F.col(S.HISTORY_LEN).cast("int"),
    )
    target = (str(out), streaming_remote(remote)) if remote else str(out)
    mds_kwargs = {"out": target, "columns": dict(S.MDS_COLUMNS), "size_limit": size_limit}
    if remote:
        mds_kwargs["keep_local"] = True
    if compression:
        mds_kwargs["compression"] = compression
    dataframe_to_mds(rows.repartition(partitions), merge_index=True, mds_kwargs=mds_kwargs)
    return summarize_mds(out)


# URI schemes Streaming 0.13 uploads to / downloads from, plus file:// (see `streaming_remote`).
REMOTE_SCHEMES = ("s3", "gs", "oci", "azure", "azure-dl", "hf", "dbfs", "file")


def streaming_remote(uri: str) -> str:
    """A remote URI as Mosaic Streaming takes it. Object-store URIs (s3://b/p, gs://b/p, dbfs:/p, ...) pass
    unchanged; ``file:///abs/path`` becomes ``/abs/path``: Streaming's local uploader and downloader are
    registered for the empty scheme and refuse ``file`` ("Invalid Cloud provider prefix: file")."""
    from urllib.parse import unquote, urlparse

    parsed = urlparse(uri)
    if parsed.scheme not in REMOTE_SCHEMES:
        raise ValueError(f"MDS remote {uri!r}: expected a URI with one of the schemes {REMOTE_SCHEMES}")
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"MDS remote {uri!r}: file:// URIs must be absolute (file:///path)")
        return unquote(parsed.path)
    return uri


def join_remote(root: str, *parts: str) -> str:
    """`root` (a URI) with path parts appended by '/'."""
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])


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


class CorruptMDSError(ValueError):
    """An MDS folder whose files disagree with its index.json (missing, truncated, wrong hash, wrong columns)."""


def validate_mds(path: str | Path, *, columns: Mapping[str, str] | None = None, check_hashes: bool = True) -> dict:
    """Cheap check of an MDS folder before training: index.json parses; every shard file it names exists with
    the byte size it records (the compressed file, or the raw file Streaming decompresses next to it); the
    hashes recorded in the index (if the writer recorded any) match; `columns` (name -> encoding) are present
    with those encodings in every shard. Raises CorruptMDSError naming the folder and the file; returns
    `summarize_mds`-like counts. Reads only file sizes unless hashes are recorded."""
    path = Path(path)
    index_file = path / "index.json"
    if not index_file.is_file():
        raise CorruptMDSError(f"MDS folder {path}: no index.json")
    try:
        index = json.loads(index_file.read_text())
        shards = index["shards"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptMDSError(f"MDS folder {path}: unreadable index.json ({exc})") from exc
    if not shards:
        raise CorruptMDSError(f"MDS folder {path}: index.json lists no shards")
    rows = 0
    for i, shard in enumerate(shards):
        names = dict(zip(shard.get("column_names", []), shard.get("column_encodings", [])))
        if columns:
            missing = [c for c in columns if c not in names]
            if missing:
                raise CorruptMDSError(
                    f"MDS folder {path}: shard {i} lacks column(s) {missing} the model needs "
                    f"(has {sorted(names)}); re-materialize mds_splits"
                )
            wrong = {c: (names[c], enc) for c, enc in columns.items() if names[c] != enc}
            if wrong:
                raise CorruptMDSError(f"MDS folder {path}: shard {i} column encodings (found, expected) {wrong}")
        candidates = [d for d in (shard.get("zip_data"), shard.get("raw_data")) if d]
        present = [(d, path / d["basename"]) for d in candidates if (path / d["basename"]).is_file()]
        if not present:
            raise CorruptMDSError(
                f"MDS folder {path}: shard file {candidates[0]['basename'] if candidates else i} is missing"
            )
        for data, file in present:
            size = file.stat().st_size
            if size != int(data["bytes"]):
                raise CorruptMDSError(
                    f"MDS folder {path}: shard file {file.name} has {size} bytes, index.json says "
                    f"{data['bytes']} (truncated or corrupt)"
                )
            hashes = data.get("hashes") or {}
            if check_hashes and hashes:
                from streaming.base.hashing import get_hash

                blob = file.read_bytes()
                for algo, expected in hashes.items():
                    if get_hash(algo, blob) != expected:
                        raise CorruptMDSError(f"MDS folder {path}: shard file {file.name} fails its {algo} hash")
        rows += int(shard.get("samples", 0))
    return {"rows": rows, "shards": len(shards)}
