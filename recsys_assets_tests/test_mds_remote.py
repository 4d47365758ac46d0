"""MDS on object storage, exercised with a ``file://`` remote (a temporary folder): Spark writes a split and
Streaming's uploader copies it to the remote; `StreamingDataset(remote=..., local=cache)` reads the same rows
back with the local copy deleted; the `mds_splits` asset records the remote in meta.json; the Two Tower trainer
streams its fit splits from a remote into a cache folder."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import dagster as dg
import pytest

from recsys_assets.data import schema as S
from recsys_assets.data.mds import join_remote, streaming_remote, summarize_mds, write_rows_to_mds
from recsys_assets.data.transforms import temporal_split

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_mds import write_synthetic_dataset  # noqa: E402

H = 4


def test_remote_uris_as_streaming_takes_them():
    assert streaming_remote("file:///tmp/x/mds") == "/tmp/x/mds"
    assert streaming_remote("file://localhost/tmp/a%20b") == "/tmp/a b"
    for uri in ("s3://bucket/p/mds", "gs://bucket/p", "dbfs:/Volumes/c/s/v/mds", "dbfs:/tmp/mds"):
        assert streaming_remote(uri) == uri
    with pytest.raises(ValueError, match="schemes"):
        streaming_remote("http://example.com/mds")
    with pytest.raises(ValueError, match="absolute"):
        streaming_remote("file://host/tmp/x")
    assert join_remote("s3://b/root/", "mds_splits", "run1", "/train") == "s3://b/root/mds_splits/run1/train"


def _rows(samples) -> list[tuple]:
    return sorted(
        (
            int(s[S.USER]),
            int(s[S.ITEM]),
            int(s[S.TIMESTAMP]),
            tuple(int(x) for x in s[S.HISTORY]),
            int(s[S.HISTORY_LEN]),
        )
        for s in samples
    )


def test_split_written_to_file_remote_reads_back_through_a_cache(spark, tmp_path: Path):

    from recsys_assets.data.blocks import read_layout
    from recsys_assets.training.block_loader import open_loader, read_blocks
    from recsys_assets.training.streaming import prepare_streaming

    rows = [(u, (u * 3 + k) % 11, 1000 + 10 * k, float(1 + k)) for u in range(7) for k in range(5)]
    splits = temporal_split(spark.createDataFrame(rows, "user int, item int, timestamp bigint, rating float"), H)
    expected = sorted(
        (r.user, r.item, r.timestamp, tuple(r.history), r.history_len)
        for r in splits.filter("split = 'train'").collect()
    )
    local, remote_dir = tmp_path / "local" / "train", tmp_path / "bucket" / "mds" / "train"
    remote = remote_dir.as_uri()  # file:///.../bucket/mds/train
    summary = write_rows_to_mds(
        splits.filter("split = 'train'"), local, history_length=H, rows=21, partitions=2, remote=remote
    )
    assert summary["rows"] == len(expected) == 21

    # the remote holds the merged index and every shard it names; the local copy is kept and equal
    index = json.loads((remote_dir / "index.json").read_text())
    assert index == json.loads((local / "index.json").read_text())
    for shard in index["shards"]:
        name = (shard.get("zip_data") or shard["raw_data"])["basename"]
        assert (remote_dir / name).read_bytes() == (local / name).read_bytes()
    assert summarize_mds(remote_dir)["rows"] == summary["rows"]

    layout = read_layout(local)
    shutil.rmtree(local)  # what follows can only come from the remote
    cache = tmp_path / "cache" / "train"
    columns = read_blocks([cache], layout, remotes=[remote])
    assert _rows(dict(zip(columns, row)) for row in zip(*columns.values())) == expected
    assert (cache / "index.json").is_file()

    # the trainers' loader: remote + a fresh cache folder (the layout file is fetched from the remote too)
    prepare_streaming()
    needed = [layout.column(c) for c in (S.USER, S.ITEM, S.TIMESTAMP, S.HISTORY, S.HISTORY_LEN)]
    batches = list(open_loader([tmp_path / "cache2"], needed, 4, seed=0, remotes=[remote]))
    got = []
    for batch in batches:
        got += [
            {k: batch[k][i] for k in (S.USER, S.ITEM, S.TIMESTAMP, S.HISTORY, S.HISTORY_LEN)}
            for i in range(len(batch[S.USER]))
        ]
    assert _rows(got) == expected


def test_mds_splits_asset_uploads_to_remote_root_and_records_it(spark, tmp_path: Path):
    from recsys_assets.defs.data_assets import data_assets
    from recsys_assets.defs.resources import SparkResource, StateResource
    from recsys_assets.defs.storage import AssetFolderIOManager

    bucket, state = tmp_path / "bucket", StateResource(root=str(tmp_path / "state"))
    result = dg.materialize(
        data_assets,
        run_config={
            "ops": {
                "raw_interactions": {"config": {"synthetic": {"size": "tiny"}}},
                "mds_splits": {"config": {"remote_root": bucket.as_uri(), "partitions": 2}},
            }
        },
        resources={
            "spark": SparkResource(master="local[2]", shuffle_partitions=4),
            "state": state,
            "io_manager": AssetFolderIOManager(state=state),
        },
    )
    assert result.success
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == "mds_splits"]
    paths = S.DatasetPaths(Path(event.materialization.metadata["path"].value))
    meta = S.DatasetMeta.load(paths.meta)
    assert meta.mds_remote == f"{bucket.as_uri()}/mds_splits/{result.run_id}"
    for split in S.SPLITS:
        remote_dir = Path(streaming_remote(join_remote(meta.mds_remote, split)))
        assert remote_dir.is_relative_to(bucket)
        assert summarize_mds(remote_dir)["rows"] == meta.rows[split] == summarize_mds(paths.mds(split))["rows"]


def test_two_tower_trains_from_a_remote_into_a_cache(tmp_path: Path):
    """One process, one epoch: the fit split exists only at the remote (the local mds/ folder is gone)."""
    from recsys_assets.training.two_tower import TwoTowerTrainConfig, train_two_tower

    data = write_synthetic_dataset(tmp_path / "ds", num_users=120, num_items=80)
    bucket = tmp_path / "bucket" / "mds"
    shutil.copytree(data.root / "mds", bucket)
    shutil.rmtree(data.root / "mds")
    cache = tmp_path / "cache"
    config = TwoTowerTrainConfig(
        data_root=str(data.root),
        mds_remote=bucket.as_uri(),
        mds_cache_dir=str(cache),
        epochs=1,
        batch_size=64,
        embedding_dim=8,
        layer_sizes=(16, 8),
        num_threads=1,
        seed=0,
    )
    result = train_two_tower(config)
    assert result.history[0]["samples"] == data.meta.rows["train"]
    assert (cache / "train" / "index.json").is_file()
    assert 0.0 <= result.final_metrics["hr@10"] <= 1.0
