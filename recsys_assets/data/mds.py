"""Writing the splits to Mosaic Streaming MDS blocks (data/blocks.py) with Spark, and reading their index back."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from recsys_assets.data import blocks as B
from recsys_assets.data import schema as S
from recsys_assets.data.streaming_import import import_streaming

if TYPE_CHECKING:  # Spark / the converter are imported where used: training validates MDS without Spark
    from pyspark.sql import DataFrame


def split_layout(history_length: int, block_rows: int = B.DEFAULT_BLOCK_ROWS) -> B.BlockLayout:
    """The block layout of the interaction splits (schema.MDS_COLUMNS; history is `history_length` wide)."""
    widths = {S.HISTORY: history_length}
    return B.BlockLayout.of({c: (dtype, widths.get(c, 0)) for c, dtype in S.MDS_COLUMNS.items()}, block_rows)


def write_rows_to_mds(
    frame: DataFrame,
    out: str | Path,
    *,
    history_length: int,
    rows: int,
    block_rows: int = B.DEFAULT_BLOCK_ROWS,
    **write_options: Any,
) -> dict:
    """Writes rows of the splits table (`frame`, `rows` of them) as MDS blocks (`split_layout`); returns the
    summary.
    `write_options`: `write_blocks_with_spark`'s keywords (partitions, compression, size_limit, remote, ...).

    Nullable ratings (implicit data) are written as NaN: MDS float columns have no null."""
    from pyspark.sql import functions as F

    columns = frame.select(
        F.col(S.USER).cast("int"),
        F.col(S.ITEM).cast("int"),
        F.col(S.TIMESTAMP).cast("bigint"),
        F.coalesce(F.col(S.RATING), F.lit(float("nan"))).cast("float").alias(S.RATING),
        F.col(S.HISTORY).cast("array<int>"),
        F.col(S.HISTORY_LEN).cast("int"),
    )
    return write_blocks_with_spark(columns, split_layout(history_length, block_rows), out, rows=rows, **write_options)


def write_blocks_with_spark(
    df: DataFrame,
    layout: B.BlockLayout,
    out: str | Path,
    *,
    rows: int,
    partitions: int = 2,
    compression: str | None = "zstd",
    size_limit: str = "64mb",
    remote: str | None = None,
    seed: int = 0,
    min_blocks: int = B.MIN_BLOCKS,
) -> dict:
    """The `rows` rows of `df` (the layout's columns) as MDS blocks in `out`, written by Spark tasks with
    Streaming's MDSWriter: rows are shuffled within each partition (so a block mixes users), cut into blocks of
    `block_rows_for(rows, layout.block_rows)` (full blocks, then at most one partial block per partition), and
    the partitions' indexes merged into one index.json in the order of their results. Returns the summary
    (rows, blocks, shards, bytes, columns); LAYOUT_FILE records the layout and every block's rows in that
    order (their total is checked against `rows`)."""
    from pyspark.sql import functions as F

    import_streaming()
    from streaming.base.util import merge_index

    layout = dataclasses.replace(layout, block_rows=B.block_rows_for(rows, layout.block_rows, min_blocks))
    local = str(Path(out).resolve())
    shutil.rmtree(local, ignore_errors=True)
    Path(local).mkdir(parents=True)
    target_remote = streaming_remote(remote) if remote else None
    writer_kwargs = {"columns": layout.mds_columns(), "size_limit": size_limit}
    if compression:
        writer_kwargs["compression"] = compression
    write = functools.partial(
        _write_partition, layout=layout.to_dict(), local=local, remote=target_remote, writer_kwargs=writer_kwargs
    )
    parts = (
        df.select(*layout.names)
        .repartition(partitions)
        .sortWithinPartitions(F.rand(seed))
        .mapInPandas(write, schema="index_local string, index_remote string, rows long")
        .collect()
    )
    total = int(sum(p["rows"] for p in parts))
    if total != rows:
        raise RuntimeError(f"MDS {out}: the writer tasks wrote {total} rows, expected {rows}")
    if parts:
        urls = [(p["index_local"], p["index_remote"]) if target_remote else p["index_local"] for p in parts]
        merge_index(urls, (local, target_remote) if target_remote else local, keep_local=True, download_timeout=60)
    else:  # an empty split: an index without shards, so readers see zero rows rather than no folder
        B.write_blocks(
            local, {c.name: np.zeros((0, c.width) if c.width else 0, c.dtype) for c in layout.columns}, layout
        )
    sizes = [n for p in parts for n in B.partition_block_sizes(int(p["rows"]), layout.block_rows)]
    B.write_layout(local, layout, block_sizes=sizes)
    if target_remote:  # remote readers (summaries, tools) find the layout next to the index too
        import_streaming()
        from streaming.base.storage.upload import CloudUploader

        CloudUploader.get((local, target_remote), keep_local=True, exist_ok=True).upload_file(B.LAYOUT_FILE)
    return summarize_mds(local)


def _write_partition(batches, *, layout: dict, local: str, remote: str | None, writer_kwargs: dict):
    """A Spark task: its rows (pandas batches) as MDS blocks in ``<local>/<task id>/`` (+ uploaded to
    ``<remote>/<task id>/``); yields the partition's index.json and row count."""
    import pandas as pd
    from pyspark import TaskContext

    import_streaming()
    from streaming import MDSWriter

    lay = B.BlockLayout.from_dict(layout)
    task = str(TaskContext.get().taskAttemptId())
    part_local = os.path.join(local, task)
    part_out = (part_local, f"{remote.rstrip('/')}/{task}") if remote else part_local
    rows, carry, writer = 0, None, None
    for pdf in batches:
        arrays = lay.arrays(pdf)
        if carry is not None:
            arrays = {k: np.concatenate([carry[k], v]) for k, v in arrays.items()}
        n = len(next(iter(arrays.values())))
        full = n - n % lay.block_rows
        if full:
            writer = writer or MDSWriter(out=part_out, keep_local=True, **writer_kwargs)
            for sample in lay.encode({k: v[:full] for k, v in arrays.items()}):
                writer.write(sample)
        carry, rows = {k: v[full:] for k, v in arrays.items()}, rows + full
    if carry is not None and len(next(iter(carry.values()))):
        writer = writer or MDSWriter(out=part_out, keep_local=True, **writer_kwargs)
        for sample in lay.encode(carry):
            writer.write(sample)
        rows += len(next(iter(carry.values())))
    if writer is None:
        return
    writer.finish()
    index = "index.json"
    yield pd.DataFrame(
        {
            "index_local": [os.path.join(part_local, index)],
            "index_remote": [f"{part_out[1]}/{index}" if remote else ""],
            "rows": [rows],
        }
    )


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
    """Rows (LAYOUT_FILE), blocks, shards and bytes of an MDS block folder."""
    path = Path(path)
    index = json.loads((path / "index.json").read_text())
    shards = index["shards"]
    files = [p for p in path.rglob("*") if p.is_file()]
    return {
        "rows": B.read_rows(path),
        "blocks": int(sum(s["samples"] for s in shards)),
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
    the samples and shards (a sample is a block of rows in this project's layout). Reads only file sizes
    unless hashes are recorded."""
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
    samples = 0
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
                import_streaming()
                from streaming.base.hashing import get_hash

                blob = file.read_bytes()
                for algo, expected in hashes.items():
                    if get_hash(algo, blob) != expected:
                        raise CorruptMDSError(f"MDS folder {path}: shard file {file.name} fails its {algo} hash")
        samples += int(shard.get("samples", 0))
    return {"samples": samples, "shards": len(shards)}
