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

import numpy as np
import pytest

from recsys_assets.data import schema as S
from recsys_assets.data.mds import summarize_mds, write_split_to_mds
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


def test_mds_round_trip_one_process(splits, tmp_path: Path):
    import torch
    from streaming import StreamingDataLoader, StreamingDataset

    out = tmp_path / "train"
    summary = write_split_to_mds(splits, "train", out, partitions=2)
    expected = _spark_rows(splits, "train")
    assert len(expected) == 23
    assert summary["rows"] == 23 and summary["columns"] == S.MDS_COLUMNS
    assert summary == summarize_mds(out)
    index = json.loads((out / "index.json").read_text())
    assert sum(s["samples"] for s in index["shards"]) == 23

    ds = StreamingDataset(local=str(out), shuffle=False, batch_size=4)
    assert len(ds) == 23
    got = {}
    for k in range(len(ds)):
        s = ds[k]
        assert set(s) == set(S.MDS_COLUMNS)
        for col in (S.USER, S.ITEM, S.HISTORY_LEN):
            assert isinstance(s[col], np.int32), (col, type(s[col]))
        assert isinstance(s[S.TIMESTAMP], np.int64)
        assert isinstance(s[S.RATING], np.float32)
        assert s[S.HISTORY].dtype == np.int32 and s[S.HISTORY].shape == (H,)
        got[_key(s[S.USER], s[S.ITEM], s[S.TIMESTAMP])] = (
            float(s[S.RATING]),
            s[S.HISTORY].tolist(),
            int(s[S.HISTORY_LEN]),
        )
    assert got.keys() == expected.keys()
    for key, (rating, history, history_len) in expected.items():
        g_rating, g_history, g_len = got[key]
        assert (g_history, g_len) == (history, history_len), key
        if rating is None:
            assert math.isnan(g_rating), key  # null ratings are written as NaN
        else:
            assert g_rating == pytest.approx(rating), key

    # Through the loader: int32 columns stay int32 tensors, the history is a fixed-width matrix.
    loader = StreamingDataLoader(ds, batch_size=4)
    seen = 0
    for batch in loader:
        assert batch[S.USER].dtype == torch.int32 and batch[S.ITEM].dtype == torch.int32
        assert batch[S.HISTORY_LEN].dtype == torch.int32
        assert batch[S.HISTORY].dtype == torch.int32 and batch[S.HISTORY].shape[1] == H
        assert batch[S.TIMESTAMP].dtype == torch.int64
        seen += len(batch[S.USER])
    assert seen == 23


RANK_WORKER = textwrap.dedent(
    """
    import json, os, sys
    from streaming import StreamingDataLoader, StreamingDataset

    local, out = sys.argv[1], sys.argv[2]
    ds = StreamingDataset(local=local, shuffle=False, batch_size=2)
    keys = []
    for batch in StreamingDataLoader(ds, batch_size=2):
        for u, i, t in zip(batch["user"].tolist(), batch["item"].tolist(), batch["timestamp"].tolist()):
            keys.append([u, i, t])
    with open(out, "w") as f:
        json.dump({"rank": int(os.environ["RANK"]), "len": len(ds), "keys": keys}, f)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_mds_two_ranks_get_disjoint_partitions(splits, tmp_path: Path):
    out = tmp_path / "train"
    write_split_to_mds(splits, "train", out, partitions=2)
    expected = set(_spark_rows(splits, "train"))
    n = len(expected)
    assert n % 2 == 1  # odd: one rank gets a padding repeat

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
    per_rank = math.ceil(n / 2)
    assert [r["rank"] for r in results] == [0, 1]
    assert [len(k) for k in ranks] == [per_rank, per_rank]  # each rank its half, padded to equal size
    assert set(ranks[0]) | set(ranks[1]) == expected  # together every row
    both = Counter(ranks[0]) + Counter(ranks[1])
    repeats = {k: c for k, c in both.items() if c > 1}
    assert sum(c - 1 for c in repeats.values()) == 2 * per_rank - n == 1  # only the padding repeat
    assert len(set(ranks[0]) & set(ranks[1])) <= 1


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


def test_process_killed_while_publishing_leaves_previous_version_readable(tmp_path: Path):
    """A run killed mid-write (SIGKILL-like os._exit: no exception handler runs) never touches what readers see:
    the previous version and `latest` stay, and the half-written folder is hidden (dot-prefixed)."""
    import subprocess
    import sys

    root = tmp_path / "assets" / "thing"
    with publish_folder(root / "v1") as tmp:
        _write(tmp, "one")
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from recsys_assets.data.publish import publish_folder\n"
        f"with publish_folder(Path({str(root / 'v2')!r})) as tmp:\n"
        "    (tmp / 'data.txt').write_text('half')\n"
        "    os._exit(9)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script])
    assert proc.returncode == 9
    assert not (root / "v2").exists()
    assert os.readlink(root / "latest") == "v1"
    assert (root / "latest" / "data.txt").read_text() == "one"
    leftovers = _hidden(root)
    assert len(leftovers) == 1 and ".v2.tmp-" in leftovers[0]
    # the next successful publish of that version is complete and visible
    with publish_folder(root / "v2") as tmp:
        _write(tmp, "two")
    assert (root / "latest" / "data.txt").read_text() == "two"
