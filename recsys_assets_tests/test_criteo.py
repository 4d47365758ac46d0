"""The Criteo (Kaggle display-advertising) reader on the 900-line sample, and a DLRM trained on it.

Oracle for the parser: the same file split by plain Python (``line.split("\\t")``), independent of Spark.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from recsys_assets.data import criteo as C
from recsys_assets.data.errors import DataValidationError

pytestmark = pytest.mark.timeout(300)

NUM_EMBEDDINGS = 1000


@pytest.fixture(scope="module")
def sample(shared_data: Path) -> Path:
    path = shared_data / "criteo-dac-head" / "train_head900.txt"
    if not path.is_file():
        pytest.skip(f"Criteo sample not found at {path} (the first 900 lines of the Kaggle DAC train.txt)")
    return path


@pytest.fixture(scope="module")
def lines(sample: Path) -> list[list[str]]:
    return [ln.split("\t") for ln in sample.read_text().splitlines()]


@pytest.fixture(scope="module")
def parsed(spark, sample: Path):
    return C.read_criteo_report(spark, sample).df.orderBy(C.ROW_INDEX).toPandas()


def test_reads_the_sample(parsed, lines):
    assert len(lines) == 900 and all(len(f) == 40 for f in lines)
    assert len(parsed) == 900
    assert list(parsed.columns) == [C.LABEL, *C.INT_COLUMNS, *C.CAT_COLUMNS, C.ROW_INDEX]
    assert len(C.INT_COLUMNS) + len(C.CAT_COLUMNS) + 1 == 40
    assert set(parsed[C.LABEL].unique()) == {0.0, 1.0}
    assert parsed[C.ROW_INDEX].tolist() == list(range(900))  # input order kept
    assert parsed[C.LABEL].tolist() == [float(f[0]) for f in lines]
    # Missing values are nulls, counted per column exactly as the raw fields are empty.
    for j, col in enumerate([*C.INT_COLUMNS, *C.CAT_COLUMNS], start=1):
        assert int(parsed[col].isna().sum()) == sum(f[j] == "" for f in lines), col
    assert int(parsed["int_0"].isna().sum()) == 413  # anchors: the sample's own counts
    assert int(parsed["cat_21"].isna().sum()) == 732
    assert int(parsed["int_1"].min()) == min(int(f[2]) for f in lines if f[2]) < 0  # negatives kept as read
    assert parsed["int_4"].tolist()[:2] == [1382, 102]
    assert parsed["cat_0"].tolist()[:2] == ["68fd1e64", "68fd1e64"]


def test_line_order_survives_many_partitions(spark, sample, lines):
    """Split the file into ~40 blocks: row_index must still be the line order."""
    old = spark.conf.get("spark.sql.files.maxPartitionBytes")
    spark.conf.set("spark.sql.files.maxPartitionBytes", "4096")
    try:
        read = C.read_criteo_report(spark, sample)
        assert spark.read.text(str(sample)).rdd.getNumPartitions() > 10
        got = read.df.select(C.ROW_INDEX, "cat_1").orderBy(C.ROW_INDEX).toPandas()
    finally:
        spark.conf.set("spark.sql.files.maxPartitionBytes", old)
    assert got[C.ROW_INDEX].tolist() == list(range(900))
    assert got["cat_1"].fillna("").tolist() == [f[15] for f in lines]


def test_features(spark, sample, lines):
    feats = C.criteo_features(C.read_criteo(spark, sample), num_embeddings_per_feature=NUM_EMBEDDINGS)
    df = feats.orderBy(C.ROW_INDEX).toPandas()
    dense = np.stack(df[C.DENSE].to_numpy())
    assert dense.shape == (900, 13) and dense.dtype == np.float32
    expected = np.array([[math.log1p(max(int(v), 0)) if v else 0.0 for v in f[1:14]] for f in lines], dtype=np.float32)
    np.testing.assert_allclose(dense, expected, rtol=1e-6)
    assert dense[4, 1] == 0.0  # int_1 = -1 → log(1 + max(-1, 0)) = 0
    for j, col in enumerate(C.CAT_COLUMNS, start=14):
        ids = df[col]
        assert ids.notna().all(), col
        assert ids.min() >= 0 and ids.max() < NUM_EMBEDDINGS, col
        raw = [f[j] for f in lines]
        # Missing ↔ the reserved id 0 (hashed values are >= 1); a string always gets the same id.
        assert (ids == C.MISSING_ID).tolist() == [v == "" for v in raw], col
        pairs = {(v, i) for v, i in zip(raw, ids.tolist())}
        assert len(pairs) == len(set(raw)), col
    assert feats.schema[C.DENSE].dataType.simpleString() == "array<float>"
    assert all(feats.schema[c].dataType.simpleString() == "int" for c in C.CAT_COLUMNS)


def test_malformed_lines(spark, sample, tmp_path):
    good = sample.read_text().splitlines()[:50]
    bad = tmp_path / "bad.txt"
    fields39 = good[0].rsplit("\t", 1)[0]
    label2 = "2" + good[1][1:]
    not_int = good[2].split("\t")
    not_int[3] = "x7"
    bad.write_text("\n".join(good[:20] + [fields39] + good[20:30] + [label2, "\t".join(not_int)] + good[30:]) + "\n")
    with pytest.raises(DataValidationError) as e:
        C.read_criteo(spark, bad)
    msg = str(e.value)
    assert "bad.txt" in msg and "3 of 53 lines" in msg, msg
    assert "bad.txt:21: 39 tab-separated fields" in msg, msg
    assert "bad.txt:32: label 2 is not 0 or 1" in msg, msg
    assert "bad.txt:33: integer field x7" in msg, msg
    read = C.read_criteo_report(spark, bad, bad_lines="drop")
    assert (read.lines, read.rows, read.bad_lines) == (53, 50, 3)
    assert read.df.count() == 50
    with pytest.raises(DataValidationError, match="does not exist"):
        C.read_criteo(spark, tmp_path / "missing.txt")


@pytest.fixture(scope="module")
def dataset(spark, sample, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("criteo") / "ds"
    C.write_criteo_dataset(spark, sample, out, num_embeddings_per_feature=NUM_EMBEDDINGS)
    return out


def test_written_dataset(dataset):
    import pandas as pd

    from recsys_assets.data.mds import summarize_mds

    meta = json.loads((dataset / "meta.json").read_text())
    assert meta["splits"]["train"]["rows"] == 720
    assert meta["splits"]["validation"]["rows"] == meta["splits"]["test"]["rows"] == 90
    assert meta["dense_in_features"] == 13 and len(meta["layout"]) == 26
    assert {f["num_embeddings"] for f in meta["layout"]} == {NUM_EMBEDDINGS}
    summary = summarize_mds(dataset / "train")
    assert summary["rows"] == 720
    assert (
        summary["columns"] == C.BLOCK_LAYOUT.mds_columns() and summary["blocks"] >= 60
    )  # blocks of 12 rows: at least 64 blocks where rows allow
    val = pd.read_parquet(dataset / "validation.parquet")
    assert len(val) == 90 and len(val[C.DENSE].iloc[0]) == 13
    assert not [p for p in dataset.parent.iterdir() if p.name.startswith(".") or p.name == "latest"]


def test_dlrm_trains_on_criteo(dataset):
    from recsys_assets.training.criteo import criteo_train_config
    from recsys_assets.training.dlrm import train_dlrm

    config = criteo_train_config(
        dataset,
        epochs=4,
        patience=4,
        batch_size=64,
        embedding_dim=8,
        bottom_layer_sizes=(32, 8),
        top_layer_sizes=(32, 1),
        num_threads=2,
        seed=0,
    )
    assert config.dense_in_features == 13 and len(config.layout) == 26
    result = train_dlrm(config)
    val = result.final_metrics["validation"]
    assert math.isfinite(val["auroc"]) and 0.0 <= val["auroc"] <= 1.0, val
    assert math.isfinite(val["logloss"]), val
    assert "test" in result.final_metrics
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    assert result.samples_per_second > 0
    model = result.load_model()
    assert sum(p.numel() for p in model.sparse_arch.parameters()) == 26 * NUM_EMBEDDINGS * 8
