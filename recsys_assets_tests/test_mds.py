"""MDS round trips (one process and two ranks) and the atomicity of `publish_folder`."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

from recsys_assets.data import schema as S
from recsys_assets.data.mds import split_layout, summarize_mds, write_rows_to_mds
from recsys_assets.data.publish import publish_folder
from recsys_assets.data.transforms import temporal_split

H = 4


@pytest.fixture(scope="module")
def splits(spark):
    """Splits of 8 users: 7 with 5 interactions (3 train rows each), one with 2 (both train) -> 23 train rows,
    an odd count. Ratings of user 3 are null (implicit feedback)."""
    rows = []
    for u in range(7):
        for k in range(5):
            rows.append((u, (u * 3 + k) % 11, 1000 + 10 * k, None if u == 3 else float(1 + (u + k) % 5)))
    rows += [(7, 0, 5, 2.5), (7, 1, 6, 3.5)]
    df = spark.createDataFrame(rows, "user int, item int, timestamp bigint, rating float")
    out = temporal_split(df, history_length=H).cache()
    yield out
    out.unpersist()


def _key(user, item, timestamp) -> tuple[int, int, int]:
    return int(user), int(item), int(timestamp)


def _spark_rows(splits, split: str) -> dict:
    return {
        _key(r.user, r.item, r.timestamp): (r.rating, list(r.history), r.history_len)
        for r in splits.filter(f"split = '{split}'").collect()
    }


def _write_train(splits, out: Path, block_rows: int = 4) -> dict:
    """The train split in blocks of `block_rows` (min_blocks=1: the configured size, not a smaller one)."""
    return write_rows_to_mds(
        splits.filter("split = 'train'"),
        out,
        history_length=H,
        rows=23,
        block_rows=block_rows,
        partitions=2,
        min_blocks=1,
    )


def _loader(out: Path, batch_size: int, **kwargs):
    from recsys_assets.training.block_loader import open_loader
    from recsys_assets.training.streaming import prepare_streaming

    prepare_streaming()
    return open_loader([out], split_layout(H, 4).columns, batch_size, seed=3, **kwargs)


def _batch_rows(batch) -> dict:
    out = {}
    for k in range(len(batch[S.USER])):
        key = _key(batch[S.USER][k], batch[S.ITEM][k], batch[S.TIMESTAMP][k])
        out[key] = (float(batch[S.RATING][k]), batch[S.HISTORY][k].tolist(), int(batch[S.HISTORY_LEN][k]))
    return out


def test_blocks_round_trip_every_column(splits, tmp_path: Path):
    """Spark writes 23 rows in blocks of 4 from 2 partitions (so partial final blocks); the loader gives back
    every row exactly once with every column: id 0, the -1 history padding, NaN for a null rating, dtypes."""
    import torch

    out = tmp_path / "train"
    summary = _write_train(splits, out)
    expected = _spark_rows(splits, "train")
    assert len(expected) == 23 and summary["rows"] == 23
    assert summary["columns"] == split_layout(H).mds_columns() and summary == summarize_mds(out)
    sizes = [int(ds_sample["rows"]) for ds_sample in _samples(out)]
    assert sum(sizes) == 23 and max(sizes) == 4 and min(sizes) < 4  # full blocks and partial ones
    assert (
        summary["blocks"]
        == len(sizes)
        == sum(s["samples"] for s in json.loads((out / "index.json").read_text())["shards"])
    )

    got = {}
    for batch in _loader(out, batch_size=5):
        assert batch[S.USER].dtype == torch.int32 and batch[S.ITEM].dtype == torch.int32
        assert batch[S.TIMESTAMP].dtype == torch.int64 and batch[S.RATING].dtype == torch.float32
        assert batch[S.HISTORY].dtype == torch.int32 and batch[S.HISTORY].shape[1:] == (H,)
        rows = _batch_rows(batch)
        assert not rows.keys() & got.keys()
        got.update(rows)
    assert got.keys() == expected.keys()
    assert any(key[0] == 0 for key in got) and any(key[1] == 0 for key in got)  # id 0 is a real id
    assert any(-1 in h for _, h, _ in got.values())  # the padding survives
    for key, (rating, history, history_len) in expected.items():
        g_rating, g_history, g_len = got[key]
        assert (g_history, g_len) == (history, history_len), key
        if rating is None:
            assert math.isnan(g_rating), key  # null ratings are written as NaN
        else:
            assert g_rating == pytest.approx(rating), key


def _samples(out: Path) -> list[dict]:
    from streaming import StreamingDataset

    ds = StreamingDataset(local=str(out), shuffle=False, batch_size=1)
    return [ds[k] for k in range(ds.num_samples)]


def test_batches_shuffle_blocks_and_rows_per_epoch(splits, tmp_path: Path):
    """Another epoch reorders the blocks and the rows inside them; the same seed repeats an epoch."""
    out = tmp_path / "train"
    _write_train(splits, out)
    loader = _loader(out, 23)
    first, second = ([k for b in loader for k in _batch_rows(b)] for _ in range(2))
    again = [k for b in _loader(out, 23) for k in _batch_rows(b)]
    assert again == first and first != second and sorted(first) == sorted(second) and len(first) == 23
    blocks = [{_key(u, i, t) for u, i, t in zip(s[S.USER], s[S.ITEM], s[S.TIMESTAMP])} for s in _samples(out)]
    in_block = [[k for k in first if k in b] for b in blocks]  # each block's rows, in epoch-0 order
    assert any(rows != [k for k in second if k in b] for rows, b in zip(in_block, blocks) if len(b) > 1)


def test_resumed_epoch_yields_exactly_the_rows_that_remained(splits, tmp_path: Path):
    out = tmp_path / "train"
    _write_train(splits, out)
    loader = _loader(out, 3)
    batches = iter(loader)
    before = [k for _ in range(3) for k in _batch_rows(next(batches))]  # 9 rows: stops inside a block
    state = loader.state_dict()
    assert state["rows_done"] == 9 and 9 % 4  # inside a block of 4
    remaining = [k for b in batches for k in _batch_rows(b)]
    assert len(before) + len(remaining) == 23

    resumed = _loader(out, 3)
    resumed.load_state_dict(state)
    assert [k for b in resumed for k in _batch_rows(b)] == remaining
    assert resumed.state_dict()["epoch"] == state["epoch"] + 1  # the next iteration is the next epoch


RANK_WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch.distributed as dist
    from recsys_assets.data.mds import split_layout
    from recsys_assets.training.streaming import prepare_streaming
    from recsys_assets.training.block_loader import open_loader

    local, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    prepare_streaming()
    loader = open_loader([local], split_layout(4, 4).columns, 2, seed=0, rank=dist.get_rank(), world_size=2)
    keys, sizes = [], []
    for batch in loader:
        sizes.append(len(batch["user"]))
        for u, i, t in zip(batch["user"].tolist(), batch["item"].tolist(), batch["timestamp"].tolist()):
            keys.append([u, i, t])
    with open(out, "w") as f:
        json.dump({"rank": dist.get_rank(), "keys": keys, "sizes": sizes}, f)
    dist.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_ranks_never_see_the_same_row(splits, tmp_path: Path):
    out = tmp_path / "train"
    _write_train(splits, out)
    expected = set(_spark_rows(splits, "train"))
    n = len(expected)

    script = tmp_path / "rank_worker.py"
    script.write_text(RANK_WORKER)
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), str(out), str(tmp_path / f"rank{rank}.json")],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    deadline = time.monotonic() + 180
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a rank process did not finish within 180 s")
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{log[-3000:]}"

    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    ranks = [[tuple(k) for k in r["keys"]] for r in results]
    assert [r["rank"] for r in results] == [0, 1]
    assert results[0]["sizes"] == results[1]["sizes"] == [2] * 5 + [1]  # equal batches: 11 rows each
    both = Counter(ranks[0]) + Counter(ranks[1])
    assert max(both.values()) == 1  # no row twice, within or across ranks
    assert set(both) <= expected
    assert len(both) == n - n % 2  # every row but the odd one out: the ranks share the longer rank's tail


# ------------------------------------------------------------------------------------------------ publish
def _write(folder: Path, text: str) -> None:
    (folder / "data.txt").write_text(text)
    (folder / "part").mkdir()
    (folder / "part" / "x.bin").write_bytes(text.encode())


def _hidden(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def test_publish_folder_success_and_latest(tmp_path: Path):
    root = tmp_path / "assets" / "thing"
    with publish_folder(root / "v1") as tmp:
        assert tmp.parent == root and ".tmp-" in tmp.name
        assert not (root / "v1").exists()  # invisible until the block ends
        _write(tmp, "one")
    assert (root / "v1" / "data.txt").read_text() == "one"
    assert os.readlink(root / "latest") == "v1"
    assert _hidden(root) == []

    with publish_folder(root / "v2") as tmp:
        _write(tmp, "two")
    assert os.readlink(root / "latest") == "v2"
    assert (root / "latest" / "data.txt").read_text() == "two"
    assert (root / "v1" / "data.txt").read_text() == "one"  # the previous version stays
    assert _hidden(root) == []


def test_publish_folder_exception_keeps_previous_version(tmp_path: Path):
    root = tmp_path / "assets" / "thing"
    with publish_folder(root / "v1") as tmp:
        _write(tmp, "one")

    # A new version that fails: nothing appears, `latest` still points at v1, no temp folder.
    with pytest.raises(RuntimeError, match="boom"):
        with publish_folder(root / "v2") as tmp:
            _write(tmp, "half")
            raise RuntimeError("boom")
    assert not (root / "v2").exists()
    assert os.readlink(root / "latest") == "v1"
    assert _hidden(root) == []

    # Re-publishing the same version that fails: the old content is untouched, also while writing.
    with pytest.raises(KeyboardInterrupt):
        with publish_folder(root / "v1") as tmp:
            _write(tmp, "replacement")
            assert (root / "v1" / "data.txt").read_text() == "one"
            raise KeyboardInterrupt  # BaseException too
    assert (root / "v1" / "data.txt").read_text() == "one"
    assert (root / "v1" / "part" / "x.bin").read_bytes() == b"one"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "v1"]

    # ...and a successful re-publish replaces it completely, leaving no `.old-` folder.
    with publish_folder(root / "v1") as tmp:
        _write(tmp, "new")
    assert (root / "v1" / "data.txt").read_text() == "new"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "v1"]


def test_publish_folder_prunes_old_versions(tmp_path: Path):
    root = tmp_path / "assets" / "thing"
    for k in range(5):
        with publish_folder(root / f"v{k}", keep_versions=3) as tmp:
            _write(tmp, str(k))
        os.utime(root / f"v{k}", (1_000_000 + k, 1_000_000 + k))  # distinct, increasing mtimes
    assert sorted(p.name for p in root.iterdir()) == ["latest", "v2", "v3", "v4"]
    assert os.readlink(root / "latest") == "v4"
