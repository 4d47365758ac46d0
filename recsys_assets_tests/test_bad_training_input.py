"""Bad input to training is refused with an error naming the problem BEFORE any model is built or process
launched: corrupt / truncated / missing MDS shards, a split whose columns do not match what the model reads,
a history setting beyond the data's history length, embedding tables smaller than the largest id, an
unreachable MLflow server. (A missing checkpoint on an explicit resume: test_checkpoint_resume.py.)"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_mds import write_synthetic_dataset  # noqa: E402

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def clean_dataset(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("bad_training_input") / "ds", num_users=120, num_items=80)


@pytest.fixture()
def data(clean_dataset, tmp_path) -> Path:
    """A private copy of the dataset for a test to damage."""
    root = tmp_path / "ds"
    shutil.copytree(clean_dataset.root, root)
    return root


def _train_fails(root: Path, tmp_path: Path, error, match: str, **config):
    """train_two_tower (one process, here) raises `error` matching `match`, quickly and before it starts."""
    from recsys_assets.training.two_tower import TwoTowerTrainConfig, train_two_tower

    progress = tmp_path / "progress.jsonl"
    cfg = TwoTowerTrainConfig(
        data_root=str(root), epochs=1, batch_size=64, num_threads=1, progress_file=str(progress), **config
    )
    start = time.monotonic()
    with pytest.raises(error, match=match) as err:
        train_two_tower(cfg)
    assert time.monotonic() - start < 30
    assert not progress.exists()  # the "start" event (after the model is built) never happened
    return err.value


def _shard_files(folder: Path) -> list[Path]:
    index = json.loads((folder / "index.json").read_text())
    return [folder / s["zip_data"]["basename"] for s in index["shards"]]


def test_truncated_mds_shard(data, tmp_path):
    from recsys_assets.data.mds import CorruptMDSError

    shard = _shard_files(data / "mds" / "train")[0]
    blob = shard.read_bytes()
    shard.write_bytes(blob[: len(blob) // 2])
    err = _train_fails(data, tmp_path, CorruptMDSError, r"truncated or corrupt")
    assert shard.name in str(err) and str(data / "mds" / "train") in str(err)
    assert f"{len(blob) // 2} bytes, index.json says {len(blob)}" in str(err)


def test_missing_mds_shard(data, tmp_path):
    from recsys_assets.data.mds import CorruptMDSError

    shard = _shard_files(data / "mds" / "train")[-1]
    shard.unlink()
    err = _train_fails(data, tmp_path, CorruptMDSError, "is missing")
    assert shard.name in str(err)


def test_corrupt_shard_fails_its_recorded_hash(tmp_path):
    """Same size, different bytes: caught where the writer recorded hashes (MDSWriter(hashes=[...]))."""
    from streaming import MDSWriter

    from recsys_assets.data.mds import CorruptMDSError, validate_mds

    out = tmp_path / "mds"
    with MDSWriter(out=str(out), columns={"user": "int32"}, hashes=["sha1"]) as w:
        for u in range(100):
            w.write({"user": np.int32(u)})
    assert validate_mds(out)["samples"] == 100
    [shard] = [out / s["raw_data"]["basename"] for s in json.loads((out / "index.json").read_text())["shards"]]
    blob = bytearray(shard.read_bytes())
    blob[-1] ^= 0xFF
    shard.write_bytes(bytes(blob))
    with pytest.raises(CorruptMDSError, match=f"{shard.name} fails its sha1 hash"):
        validate_mds(out)


def test_split_without_the_history_column(data, tmp_path, clean_dataset):
    """An MDS split written with other columns than the model reads (no `history`)."""
    from recsys_assets.data.blocks import BlockLayout, LayoutMismatchError, write_blocks

    train = data / "mds" / "train"
    shutil.rmtree(train)
    layout = BlockLayout.of({"user": ("int32", 0), "item": ("int32", 0), "history_len": ("int32", 0)})
    write_blocks(train, {"user": np.arange(10), "item": np.arange(10), "history_len": np.zeros(10)}, layout)
    h = clean_dataset.meta.history_length
    err = _train_fails(
        data, tmp_path, LayoutMismatchError, rf"column\(s\) \['history: int32\[{h}\] \(found nothing\)'\]"
    )
    assert str(train) in str(err)


def test_history_width_differs_from_the_dataset(data, tmp_path, clean_dataset):
    """Blocks whose history is narrower than meta.json's history_length: refused, both widths named."""
    from recsys_assets.data.blocks import LayoutMismatchError, write_blocks
    from recsys_assets.data.mds import split_layout

    h = clean_dataset.meta.history_length
    train = data / "mds" / "train"
    shutil.rmtree(train)
    rows = {c: np.zeros(8) for c in ("user", "item", "timestamp", "rating", "history_len")}
    write_blocks(train, {**rows, "history": np.zeros((8, h - 1))}, split_layout(h - 1))
    _train_fails(data, tmp_path, LayoutMismatchError, rf"history: int32\[{h}\] \(found history: int32\[{h - 1}\]\)")


def test_row_layout_mds_is_refused(data, tmp_path):
    """MDS written one row per sample (the layout before blocks, no layout.json): refused, saying what to do."""
    from streaming import MDSWriter

    from recsys_assets.data.blocks import LayoutMismatchError

    train = data / "mds" / "train"
    shutil.rmtree(train)
    with MDSWriter(out=str(train), columns={"user": "int32", "item": "int32"}) as w:
        for u in range(10):
            w.write({"user": np.int32(u), "item": np.int32(u)})
    err = _train_fails(data, tmp_path, LayoutMismatchError, "written in the row layout")
    assert "re-materialize" in str(err) and str(train) in str(err)


def test_max_history_beyond_the_data_history_length(data, tmp_path, clean_dataset):
    h = clean_dataset.meta.history_length
    _train_fails(
        data, tmp_path, ValueError, rf"max_history={h + 4} exceeds the dataset's history_length={h}", max_history=h + 4
    )


@pytest.mark.parametrize("field, column", [("num_items", "item"), ("num_users", "user")])
def test_embedding_table_smaller_than_the_largest_id(data, tmp_path, clean_dataset, field, column):
    meta = json.loads((data / "meta.json").read_text())
    meta[field] = getattr(clean_dataset.meta, field) - 5
    (data / "meta.json").write_text(json.dumps(meta))
    err = _train_fails(data, tmp_path, ValueError, rf"{column} ids .* span \[0, \d+\] but meta.json says {field}=")
    assert str(getattr(clean_dataset.meta, field) - 1) in str(err)  # the largest id


def test_unreachable_mlflow_tracking_uri_is_named():
    from recsys_assets.defs.resources import MLflowResource, StateResource

    uri = "http://127.0.0.1:9"  # discard port: nothing listens
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="unreachable") as err:
        MLflowResource(state=StateResource(), tracking_uri=uri).check_reachable(timeout_s=2)
    assert repr(uri) in str(err.value)
    assert time.monotonic() - start < 15
