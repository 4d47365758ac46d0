"""Unit tests of the Spark transforms (clean, index, temporal_split) on small hand-built DataFrames."""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from recsys_assets.data import schema as S
from recsys_assets.data.errors import DataValidationError
from recsys_assets.data.sources import RAW_INTERACTION_SCHEMA, RawTables
from recsys_assets.data.transforms import clean, index, require_holdout_users, temporal_split

INDEXED_SCHEMA = "user int, item int, timestamp bigint, rating float"


def _raw(spark, rows):
    return spark.createDataFrame(rows, RAW_INTERACTION_SCHEMA)


def _expected_splits(rows, history_length):
    """Reference implementation in plain Python: {(user, item, timestamp): (split, history, history_len)}."""
    by_user = defaultdict(list)
    for u, i, t, *_ in rows:
        by_user[u].append((t, i))
    out = {}
    for u, events in by_user.items():
        events.sort()
        n = len(events)
        for pos, (t, i) in enumerate(events):
            if n < 3:
                split = "train"
            elif pos == n - 1:
                split = "test"
            elif pos == n - 2:
                split = "validation"
            else:
                split = "train"
            earlier = [item for _, item in events[:pos]][::-1][:history_length]
            out[(u, i, t)] = (split, earlier + [S.PAD_ID] * (history_length - len(earlier)), len(earlier))
    return out


# ------------------------------------------------------------------------------------------------ clean
def test_clean_drops_and_counts_null_keys_and_exact_duplicates(spark):
    rows = [
        ("a", "x", 1, 4.0),
        ("a", "x", 1, 4.0),  # exact duplicate
        ("a", "x", 1, 4.0),  # and another
        ("a", "y", 2, 3.0),
        ("a", "y", 2, 5.0),  # same key, different rating: not an exact duplicate, kept
        ("b", "x", 3, None),
        ("b", "x", 3, None),  # exact duplicate with a null rating
        (None, "x", 4, 1.0),  # null user
        ("c", None, 5, 1.0),  # null item
        ("c", "z", None, 1.0),  # null timestamp
        (None, None, 6, 1.0),  # two null keys: one row
    ]
    cleaned, report = clean(_raw(spark, rows), null_keys="drop")
    assert report.rows_in == 11
    assert report.null_key_rows == 4
    assert report.null_keys_by_column == {"user": 2, "item": 2, "timestamp": 1}
    assert report.duplicate_rows == 3
    assert report.rows_out == 4 == cleaned.count()
    assert (report.users, report.items) == (2, 2)
    got = sorted((r.user, r.item, r.timestamp, r.rating) for r in cleaned.collect())
    assert got == [("a", "x", 1, 4.0), ("a", "y", 2, 3.0), ("a", "y", 2, 5.0), ("b", "x", 3, None)]


# ------------------------------------------------------------------------------------------------ index
def _tables_for_index(spark):
    rows = [
        ("u2", "i3", 10, 1.0),
        ("u2", "i0", 20, 2.0),
        ("u2", "i7", 30, 3.0),
        ("u0", "i3", 10, 4.0),
        ("u0", "i5", 11, 5.0),
        ("u0", "i0", 12, 1.0),
        ("u0", "i7", 13, 2.0),
        ("u9", "i5", 50, 3.0),
        ("u9", "i9", 51, 4.0),
    ]
    items = spark.createDataFrame(
        [
            ("i0", ["Drama", "Comedy"]),
            ("i3", ["Comedy"]),
            ("i5", []),
            ("i7", None),
            ("i8", ["Western"]),  # not interacted with: no row in item_features
            ("i0", ["Drama", "Comedy"]),  # duplicate item row
        ],
        "item string, categories array<string>",
    )
    users = spark.createDataFrame(
        [("u0", "25-34", "north"), ("u2", "18-24", None), ("u7", "55+", "south")],
        "user string, attr_age string, attr_region string",
    )
    raw = RawTables(interactions=_raw(spark, rows), items=items, users=users)
    return rows, raw


def test_index_ids_are_contiguous_from_zero_and_preserve_rows(spark):
    rows, raw = _tables_for_index(spark)
    cleaned, _ = clean(raw.interactions)
    idx = index(cleaned, raw)

    user_map = {r.raw_user: r.user for r in idx.user_index.collect()}
    item_map = {r.raw_item: r.item for r in idx.item_index.collect()}
    assert sorted(user_map.values()) == list(range(3))
    assert sorted(item_map.values()) == list(range(5))
    # Ids follow the order of the raw id, so the first raw id gets the real id 0.
    assert user_map == {"u0": 0, "u2": 1, "u9": 2}
    assert item_map == {"i0": 0, "i3": 1, "i5": 2, "i7": 3, "i9": 4}

    inter = idx.interactions
    assert {f.name: f.dataType.simpleString() for f in inter.schema.fields} == S.INTERACTION_COLUMNS
    got = sorted((r.user, r.item, r.timestamp, r.rating) for r in inter.collect())
    want = sorted((user_map[u], item_map[i], t, float(r)) for u, i, t, r in rows)
    assert got == want
    users = {r.user for r in inter.select("user").collect()}
    items = {r.item for r in inter.select("item").collect()}
    assert 0 in users and 0 in items


def test_item_categories_and_user_attributes_are_indexed(spark):
    _, raw = _tables_for_index(spark)
    cleaned, _ = clean(raw.interactions)
    idx = index(cleaned, raw)

    cats = {r.category: r.category_id for r in idx.category_index.collect()}
    assert sorted(cats.values()) == list(range(len(cats)))
    assert {"Comedy", "Drama"} <= set(cats)
    assert cats["Comedy"] < cats["Drama"]  # ordered by name, 0-based

    item_map = {r.raw_item: r.item for r in idx.item_index.collect()}
    feats = {r.item: list(r.categories) for r in idx.item_features.collect()}
    assert sorted(feats) == list(range(5))  # one row per interacted item, none for i8
    assert feats[item_map["i0"]] == sorted([cats["Drama"], cats["Comedy"]])
    assert feats[item_map["i3"]] == [cats["Comedy"]]
    assert feats[item_map["i5"]] == []  # empty list
    assert feats[item_map["i7"]] == []  # null list
    assert feats[item_map["i9"]] == []  # missing from the items table
    assert idx.item_features.schema["categories"].dataType.simpleString() == "array<int>"

    # Attributes: known values 1..k in sorted order, 0 = unknown (null value or user not in the table).
    assert idx.user_attribute_cardinalities == {"attr_age": 4, "attr_region": 3}
    user_map = {r.raw_user: r.user for r in idx.user_index.collect()}
    uf = {r.user: (r.attr_age, r.attr_region) for r in idx.user_features.collect()}
    assert sorted(uf) == list(range(3))
    # age values: 18-24 → 1, 25-34 → 2, 55+ → 3; region values: north → 1, south → 2
    assert uf[user_map["u0"]] == (2, 1)
    assert uf[user_map["u2"]] == (1, 0)
    assert uf[user_map["u9"]] == (0, 0)
    assert {f.name: f.dataType.simpleString() for f in idx.user_features.schema.fields} == {
        "user": "int",
        "attr_age": "int",
        "attr_region": "int",
    }


# ------------------------------------------------------------------------------------------------ splits
def test_temporal_split_leave_last_out_with_timestamp_tie(spark):
    rows = [
        # user 0: order by (timestamp, item) is 7, 3, 2, 9 -> test 9, validation 2 (tie on t=300)
        (0, 7, 100, 1.0),
        (0, 3, 200, 2.0),
        (0, 9, 300, 3.0),
        (0, 2, 300, 4.0),
        # user 1: exactly 3 interactions
        (1, 0, 5, 1.0),
        (1, 4, 6, 1.0),
        (1, 1, 7, 1.0),
        # user 2: 2 interactions, user 3: 1 interaction -> all train
        (2, 5, 1, 1.0),
        (2, 6, 2, 1.0),
        (3, 0, 1, 1.0),
    ]
    df = temporal_split(spark.createDataFrame(rows, INDEXED_SCHEMA), history_length=3)
    got = {(r.user, r.item): r.split for r in df.collect()}
    assert got == {
        (0, 7): "train",
        (0, 3): "train",
        (0, 2): "validation",
        (0, 9): "test",
        (1, 0): "train",
        (1, 4): "validation",
        (1, 1): "test",
        (2, 5): "train",
        (2, 6): "train",
        (3, 0): "train",
    }
    assert {f.name: f.dataType.simpleString() for f in df.schema.fields} == {
        "user": "int",
        "item": "int",
        "timestamp": "bigint",
        "rating": "float",
        "history": "array<int>",
        "history_len": "int",
        "position": "int",
        "ranker_window": "boolean",
        "split": "string",
    }
    assert {(r.user, r.item): r.position for r in df.collect()}[(0, 2)] == 3
    assert not any(r.ranker_window for r in df.collect())  # ranker_window 0: no window
    hist = {(r.user, r.item): (list(r.history), r.history_len) for r in df.collect()}
    assert hist[(0, 9)] == ([2, 3, 7], 3)  # the tie partner 2 comes before 9 in (timestamp, item) order
    assert hist[(0, 2)] == ([3, 7, -1], 2)
    assert hist[(0, 7)] == ([-1, -1, -1], 0)
    assert hist[(1, 1)] == ([4, 0, -1], 2)  # item 0 is a real id in the history, -1 the padding
    assert require_holdout_users(spark.createDataFrame(rows, INDEXED_SCHEMA)) == 2


def test_history_holds_only_strictly_earlier_items_most_recent_first(spark):
    rng = random.Random(7)
    rows = []
    for u in range(25):
        n = rng.randint(1, 12)
        items = rng.sample(range(30), n)  # a user never repeats an item here
        for i in items:
            rows.append((u, i, rng.randint(0, 4), float(rng.randint(1, 5))))  # many timestamp ties
    H = 4
    df = temporal_split(spark.createDataFrame(rows, INDEXED_SCHEMA), history_length=H)
    got = {(r.user, r.item, r.timestamp): (r.split, list(r.history), r.history_len) for r in df.collect()}
    expected = _expected_splits(rows, H)
    assert len(got) == len(rows)
    assert got == expected

    # The property itself, checked independently of the reference: every history id is an item of the same
    # user that is strictly earlier in (timestamp, item) order; the real ids are a prefix, then padding.
    order = {(u, i): (t, i) for u, i, t, _ in rows}
    for (u, i, t), (_, history, n) in got.items():
        assert len(history) == H
        real, pad = history[:n], history[n:]
        assert all(h != S.PAD_ID for h in real) and all(h == S.PAD_ID for h in pad)
        keys = [order[(u, h)] for h in real]
        assert all(k < (t, i) for k in keys)
        assert keys == sorted(keys, reverse=True)  # most recent first


def test_ranker_window_is_each_users_last_train_rows_after_the_first(spark):
    """ranker_window 2: a user's last min(2, train rows - 1) train rows; never its first row, never a held-out
    row; a user without held-out rows (fewer than 3) has a window too when it has an earlier row."""
    rows = [(0, i, 10 * i, 1.0) for i in range(6)]  # 4 train rows (positions 1-4), validation 5, test 6
    rows += [(1, i, 10 * i, 1.0) for i in range(4)]  # 2 train rows: a window of 1 (position 2)
    rows += [(2, i, 10 * i, 1.0) for i in range(2)]  # no held-out rows, 2 train rows: window = position 2
    rows += [(3, 0, 5, 1.0)]  # one row: no window
    df = temporal_split(spark.createDataFrame(rows, INDEXED_SCHEMA), history_length=3, ranker_window=2)
    window = sorted((r.user, r.position) for r in df.collect() if r.ranker_window)
    assert window == [(0, 3), (0, 4), (1, 2), (2, 2)]
    assert all(r.split == "train" for r in df.collect() if r.ranker_window)
    with pytest.raises(DataValidationError, match="ranker_window"):
        temporal_split(spark.createDataFrame(rows, INDEXED_SCHEMA), history_length=3, ranker_window=-1)


def test_temporal_split_rejects_history_length_zero(spark):
    from recsys_assets.data.errors import DataValidationError

    df = spark.createDataFrame([(0, 0, 1, 1.0)], INDEXED_SCHEMA)
    with pytest.raises(DataValidationError, match="history_length"):
        temporal_split(df, history_length=0)


# ------------------------------------------------------------------------------------------------ end to end
def test_id_zero_survives_into_splits_and_mds(spark, tmp_path: Path):
    from recsys_assets.data.mds import write_rows_to_mds
    from recsys_assets.training.block_loader import read_blocks

    rows, raw = _tables_for_index(spark)
    cleaned, _ = clean(raw.interactions)
    idx = index(cleaned, raw)
    splits = temporal_split(idx.interactions, history_length=5).cache()
    # Raw u0 / i0 are user 0 / item 0; u0's order is i3, i5, i0, i7: i0 is its validation row.
    by_key = {(r.user, r.item): r for r in splits.collect()}
    assert by_key[(0, 0)].split == "validation"
    assert list(by_key[(0, 0)].history) == [2, 1, -1, -1, -1]
    assert 0 in {u for u, _ in by_key} and 0 in {i for _, i in by_key}

    seen_users, seen_items, seen_in_history = set(), set(), set()
    total = 0
    for split in S.SPLITS:
        out = tmp_path / "mds" / split
        n = splits.filter(F.col("split") == split).count()
        summary = write_rows_to_mds(splits.filter(F.col("split") == split), out, history_length=5, rows=n, partitions=2)
        columns = read_blocks([out])
        assert summary["rows"] == len(columns["user"]) == n
        seen_users.update(columns["user"].tolist())
        seen_items.update(columns["item"].tolist())
        for history, length in zip(columns["history"], columns["history_len"]):
            seen_in_history.update(history[:length].tolist())
        total += n
    assert total == len(rows)
    assert 0 in seen_users and 0 in seen_items and 0 in seen_in_history
    assert seen_users == {0, 1, 2} and seen_items == set(range(5))
    splits.unpersist()


def test_integer_like_raw_ids_are_indexed_in_numeric_order(spark):
    """The protocol breaks timestamp ties by item id: "10" must come after "9", as in the raw MovieLens ids."""
    from recsys_assets.data.transforms import _contiguous_index

    df = spark.createDataFrame([("10",), ("9",), ("2",), ("100",)], "item string")
    got = {r.item: r.idx for r in _contiguous_index(df, "item", "idx").collect()}
    assert got == {"2": 0, "9": 1, "10": 2, "100": 3}
