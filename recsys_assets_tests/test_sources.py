"""Tests of the source readers: the synthetic generator, MovieLens layouts and the generic table reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pyspark.sql import functions as F

from recsys_assets.data.errors import DataValidationError
from recsys_assets.data.sources import (
    ML100K_GENRES,
    RAW_INTERACTION_SCHEMA,
    ColumnMapping,
    movielens_layout,
    read_movielens,
    read_synthetic,
    read_table,
)
from recsys_assets.data.synthetic import SyntheticSpec, generate


def _schema(df) -> dict[str, str]:
    return {f.name: f.dataType.simpleString() for f in df.schema.fields}


RAW_TYPES = {f.name: f.dataType.simpleString() for f in RAW_INTERACTION_SCHEMA.fields}


# ------------------------------------------------------------------------------------------------ synthetic
def test_synthetic_is_reproducible_with_a_seed_and_differs_across_seeds():
    a = generate(SyntheticSpec.of_size("tiny", seed=3))
    b = generate(SyntheticSpec.of_size("tiny", seed=3))
    c = generate(SyntheticSpec.of_size("tiny", seed=4))
    pd.testing.assert_frame_equal(a.interactions, b.interactions)
    pd.testing.assert_frame_equal(a.items, b.items)
    pd.testing.assert_frame_equal(a.users, b.users)
    assert not a.interactions.equals(c.interactions)
    assert not a.users.equals(c.users)


def test_synthetic_shape_and_basic_invariants():
    spec = SyntheticSpec.of_size("tiny", seed=0)
    d = generate(spec)
    it = d.interactions
    assert list(it.columns) == ["user", "item", "timestamp", "rating"]
    assert it["user"].nunique() == spec.num_users
    assert it.groupby("user").size().min() >= 3  # everyone gets a validation and a test row
    assert not it.duplicated(["user", "item"]).any()  # no repeats
    assert it["rating"].between(1, 5).all()
    assert set(it["item"]) <= set(d.items["item"])
    assert set(it["user"]) == set(d.users["user"])
    assert 0 not in set(it["user"]) and 0 not in set(it["item"])  # raw ids are offset: indexing has work to do
    assert len(d.items) == spec.num_items
    assert all(1 <= len(c) <= 3 for c in d.items["categories"])


def test_synthetic_has_long_tailed_popularity():
    d = generate(SyntheticSpec.of_size("tiny", seed=0))
    counts = d.interactions["item"].value_counts().to_numpy()  # sorted, most popular first
    top = counts[: len(d.items) // 10].sum() / counts.sum()
    assert top > 0.2, f"top 10% of items hold only {top:.1%} of interactions (uniform would be 10%)"


def test_synthetic_consecutive_items_are_more_similar_than_random_pairs():
    """The planted sequential effect, seen through the public output: categories follow the item factors, so
    consecutive items of a user share a category much more often than random pairs (same popularity)."""
    d = generate(SyntheticSpec.of_size("tiny", seed=0))
    cats = {item: set(c) for item, c in zip(d.items["item"], d.items["categories"])}
    it = d.interactions  # sorted by user, timestamp, item
    items, users = it["item"].to_numpy(), it["user"].to_numpy()
    same_user = users[1:] == users[:-1]
    consecutive = np.mean([bool(cats[a] & cats[b]) for a, b, s in zip(items[:-1], items[1:], same_user) if s])
    perm = np.random.default_rng(0).permutation(len(items))
    random_pairs = np.mean([bool(cats[a] & cats[b]) for a, b in zip(items, items[perm])])
    assert consecutive > 1.25 * random_pairs, (consecutive, random_pairs)


def test_read_synthetic_gives_the_raw_schema(spark):
    spec = SyntheticSpec(num_users=30, num_items=20, mean_interactions_per_user=5, seed=1)
    raw = read_synthetic(spark, spec)
    expected = generate(spec)
    assert _schema(raw.interactions) == RAW_TYPES
    assert raw.interactions.count() == len(expected.interactions)
    assert raw.items.count() == spec.num_items
    assert _schema(raw.items) == {"item": "string", "categories": "array<string>"}
    assert _schema(raw.users) == {"user": "string", "attr_age_group": "string", "attr_region": "string"}
    first = expected.interactions.iloc[0]
    row = raw.interactions.filter(
        (F.col("user") == str(int(first["user"]))) & (F.col("item") == str(int(first["item"])))
    ).first()
    assert row is not None and row.timestamp == first["timestamp"] and row.rating == first["rating"]


# ------------------------------------------------------------------------------------------------ movielens
def test_movielens_latest_small(spark, ml_latest_small: Path):
    assert movielens_layout(ml_latest_small) == "csv"
    raw = read_movielens(spark, ml_latest_small)
    assert _schema(raw.interactions) == RAW_TYPES
    stats = raw.interactions.agg(
        F.count(F.lit(1)).alias("rows"),
        F.countDistinct("user").alias("users"),
        F.countDistinct("item").alias("items"),
        F.sum(F.col("timestamp").isNull().cast("int")).alias("null_ts"),
        F.min("rating").alias("r_min"),
        F.max("rating").alias("r_max"),
    ).first()
    assert (stats.rows, stats.users) == (100_836, 610)
    assert stats.items == 9_724  # movies with at least one rating
    assert stats.null_ts == 0
    assert (stats.r_min, stats.r_max) == (0.5, 5.0)
    assert raw.users is None

    items = raw.items
    assert items.count() == 9_742  # every line of movies.csv, quoted titles with commas included
    genres = {r.item: list(r.categories) for r in items.filter(F.col("item").isin("1", "11", "114335")).collect()}
    assert genres["1"] == ["Adventure", "Animation", "Children", "Comedy", "Fantasy"]
    assert genres["11"] == ["Comedy", "Drama", "Romance"]  # title "American President, The (1995)"
    assert genres["114335"] == []  # "(no genres listed)"


def test_movielens_pyspark_sample_file(spark, pyspark_sample_ratings: Path):
    assert movielens_layout(pyspark_sample_ratings) == "dat-file"
    raw = read_movielens(spark, pyspark_sample_ratings)
    assert _schema(raw.interactions) == RAW_TYPES
    rows = raw.interactions.collect()
    assert len(rows) == 1501
    assert len({r.user for r in rows}) == 30 and len({r.item for r in rows}) == 100
    assert all(r.timestamp == 1424380312 for r in rows)
    assert ("0", "2", 3.0) in {(r.user, r.item, r.rating) for r in rows}  # first line: 0::2::3::1424380312
    assert raw.items is None and raw.users is None


def _write_ml100k(root: Path) -> Path:
    root.mkdir()
    (root / "u.data").write_text("1\t10\t4\t881250949\n1\t20\t3\t881250950\n2\t10\t5\t881250951\n3\t30\t1\t881250952\n")
    flags = lambda *on: "|".join("1" if g in on else "0" for g in ML100K_GENRES)  # noqa: E731
    (root / "u.item").write_bytes(
        (
            f"10|Toy Story (1995)|01-Jan-1995||http://x|{flags('Animation', 'Comedy')}\n"
            f"20|Café Lumière (2003)|01-Jan-2003||http://y|{flags('Drama')}\n"
            f"30|Nothing (1999)|01-Jan-1999||http://z|{flags()}\n"
        ).encode("latin-1")
    )
    (root / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n3|37|M|writer|32067\n")
    return root


def test_movielens_100k_layout(spark, tmp_path: Path):
    path = _write_ml100k(tmp_path / "ml-100k")
    assert movielens_layout(path) == "u.data"
    raw = read_movielens(spark, path)
    assert _schema(raw.interactions) == RAW_TYPES
    got = sorted(tuple(r) for r in raw.interactions.collect())
    assert got == [
        ("1", "10", 881250949, 4.0),
        ("1", "20", 881250950, 3.0),
        ("2", "10", 881250951, 5.0),
        ("3", "30", 881250952, 1.0),
    ]
    cats = {r.item: list(r.categories) for r in raw.items.collect()}
    assert cats == {"10": ["Animation", "Comedy"], "20": ["Drama"], "30": []}
    users = {r.user: (r.attr_age_decade, r.attr_gender, r.attr_occupation) for r in raw.users.collect()}
    assert users == {"1": ("20", "M", "technician"), "2": ("50", "F", "other"), "3": ("30", "M", "writer")}


def _write_ml1m(root: Path) -> Path:
    root.mkdir()
    (root / "ratings.dat").write_text("1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n")
    (root / "movies.dat").write_bytes(
        (
            "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
            "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n"
            "3::Légende, La (1999)::Comedy\n"
        ).encode("latin-1")
    )
    (root / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n")
    return root


def test_movielens_1m_layout(spark, tmp_path: Path):
    path = _write_ml1m(tmp_path / "ml-1m")
    assert movielens_layout(path) == "dat"
    raw = read_movielens(spark, path)
    assert _schema(raw.interactions) == RAW_TYPES
    got = sorted(tuple(r) for r in raw.interactions.collect())
    assert got == [("1", "1193", 978300760, 5.0), ("1", "661", 978302109, 3.0), ("2", "1193", 978298413, 4.0)]
    cats = {r.item: list(r.categories) for r in raw.items.collect()}
    assert cats == {"1193": ["Drama"], "661": ["Animation", "Children's", "Musical"], "3": ["Comedy"]}
    users = {tuple(r) for r in raw.users.collect()}
    assert users == {("1", "F", "1", "10"), ("2", "M", "56", "16")}
    assert raw.users.columns == ["user", "attr_gender", "attr_age", "attr_occupation"]


# ------------------------------------------------------------------------------------------------ table
def test_table_reader_parquet_with_column_mapping(spark, tmp_path: Path):
    df = pd.DataFrame(
        {
            "customer": pd.array([5, 5, 6], dtype="int64"),
            "product": ["p1", "p2", "p1"],
            "when": pd.to_datetime(["2021-01-01 00:00:00", "2021-01-01 00:00:10", "2021-01-02 00:00:00"]),
            "score": [1.5, 2.0, 3.0],
            "tags": [["a", "b"], ["b"], ["a", "b"]],
            "country": ["de", "de", "fr"],
            "ignored": [0, 0, 0],
        }
    )
    path = tmp_path / "events.parquet"
    df.to_parquet(path, coerce_timestamps="us")  # Spark cannot read nanosecond Parquet timestamps
    mapping = ColumnMapping(
        user="customer",
        item="product",
        timestamp="when",
        rating="score",
        item_categories="tags",
        user_features=("country",),
    )
    raw = read_table(spark, str(path), mapping)
    assert _schema(raw.interactions) == RAW_TYPES
    got = sorted(tuple(r) for r in raw.interactions.collect())
    assert got == [("5", "p1", 1609459200, 1.5), ("5", "p2", 1609459210, 2.0), ("6", "p1", 1609545600, 3.0)]
    assert {r.item: list(r.categories) for r in raw.items.collect()} == {"p1": ["a", "b"], "p2": ["b"]}
    assert {tuple(r) for r in raw.users.collect()} == {("5", "de"), ("6", "fr")}
    assert "parquet" in raw.description


def test_table_reader_csv_with_column_mapping(spark, tmp_path: Path):
    path = tmp_path / "events.csv"
    path.write_text("uid,iid,ts,genres,stars\nu1,10,1000,Action|Drama,4\nu1,11,1001,,5\nu2,10,1002,Action|Drama,\n")
    mapping = ColumnMapping(user="uid", item="iid", timestamp="ts", item_categories="genres")
    raw = read_table(spark, str(path), mapping)
    assert "csv" in raw.description
    got = sorted(tuple(r) for r in raw.interactions.collect())
    # no rating column mapped: ratings are null (implicit feedback)
    assert got == [("u1", "10", 1000, None), ("u1", "11", 1001, None), ("u2", "10", 1002, None)]
    cats = {r.item: (list(r.categories) if r.categories is not None else None) for r in raw.items.collect()}
    assert cats["10"] == ["Action", "Drama"]
    assert not cats["11"]  # empty cell: no categories
    assert raw.users is None

    rated = read_table(spark, str(path), ColumnMapping(user="uid", item="iid", timestamp="ts", rating="stars"))
    assert sorted((r.item, r.rating) for r in rated.interactions.collect() if r.user == "u1") == [
        ("10", 4.0),
        ("11", 5.0),
    ]


# ------------------------------------------------------------------------------------------------ any delimited file
def test_a_file_with_a_byte_order_mark_loads(spark, tmp_path: Path):
    """Spreadsheet programs save UTF-8 CSV with a byte-order mark: it is not part of the first column's name."""
    path = tmp_path / "excel.csv"
    path.write_bytes("user,item,ts\r\nu1,10,1000\r\nu2,11,1001\r\n".encode("utf-8-sig"))
    raw = read_table(spark, str(path), ColumnMapping(timestamp="ts"))
    assert sorted(tuple(r) for r in raw.interactions.collect()) == [("u1", "10", 1000, None), ("u2", "11", 1001, None)]


def test_a_headerless_space_separated_file_loads_with_named_columns(spark, tmp_path: Path):
    """SASRec- / RecBole-style `user item` lines: no header; fields split on runs of spaces or tabs (a BOM too)."""
    path = tmp_path / "ml-1m.txt"
    path.write_bytes("\ufeff1 10\n1  11\n2\t10 \n\n3 12\n".encode())
    mapping = ColumnMapping(timestamp=None, order="row", header=False, columns=("user", "item"), separator="whitespace")
    raw = read_table(spark, str(path), mapping)
    rows = raw.interactions.orderBy("user", "timestamp").collect()  # "row" order: positions within each user
    assert [(r.user, r.item) for r in rows] == [("1", "10"), ("1", "11"), ("2", "10"), ("3", "12")]
    # without a separator, a headerless line with spaces is read as whitespace-separated
    guessed = ColumnMapping(timestamp=None, order="row", header=False, columns=("user", "item"))
    assert read_table(spark, str(path), guessed).interactions.count() == 4
    # a header line is then data: a file read with header false does not lose its first line
    with pytest.raises(DataValidationError, match="columns must be named"):
        read_table(spark, str(path), ColumnMapping(timestamp=None, order="row", header=False))


def test_rfc_4180_quotes_and_doubled_quotes_are_unescaped(spark, tmp_path: Path):
    path = tmp_path / "titles.csv"
    path.write_text(
        'user,item,ts,"the title"\nu1,10,1000,"A ""quoted"" name"\nu1,11,1001,"comma, inside"\nu2,12,1002,plain\n'
    )
    raw = read_table(spark, str(path), ColumnMapping(timestamp="ts", item_name="the title"))
    titles = {r.item: r.title for r in raw.items.collect()}
    assert titles == {"10": 'A "quoted" name', "11": "comma, inside", "12": "plain"}


# ------------------------------------------------------------------------------------------------ no time
PLAYS = "userID\tartistID\tweight\r\n" + "".join(f"{u}\t{a}\t{10 * u + a}\r\n" for u in (1, 2) for a in range(1, 9))


def _plays(tmp_path: Path) -> Path:
    path = tmp_path / "user_artists.dat"
    path.write_text(PLAYS)
    (tmp_path / "artists.dat").write_text(
        "id\tname\turl\n" + "".join(f"{a}\tArtist {a}\thttp://x/{a}\n" for a in range(1, 9))
    )
    (tmp_path / "tagged.dat").write_text("userID\tartistID\ttagID\n1\t1\t7\n2\t1\t8\n1\t2\t7\n")
    return path


def _by_user(raw) -> dict[str, list[str]]:
    rows = raw.interactions.orderBy("user", "timestamp").collect()
    out: dict[str, list[str]] = {}
    for r in rows:
        out.setdefault(r.user, []).append(r.item)
    return out


def test_table_without_time_in_row_order(spark, tmp_path: Path):
    """A tab-separated file with CRLF line ends, no timestamp: each user's rows keep the file's order, and the
    timestamp is the position 0..n-1 in it."""
    mapping = ColumnMapping(user="userID", item="artistID", timestamp=None, order="row", rating="weight")
    raw = read_table(spark, str(_plays(tmp_path)), mapping)
    assert raw.order == "row" and "no time" in raw.description
    assert _by_user(raw) == {u: [str(a) for a in range(1, 9)] for u in ("1", "2")}
    assert sorted(r.timestamp for r in raw.interactions.collect() if r.user == "1") == list(range(8))
    assert {r.rating for r in raw.interactions.collect() if r.user == "2"} == {20.0 + a for a in range(1, 9)}


def test_table_without_time_in_a_seeded_random_order(spark, tmp_path: Path):
    """A seeded shuffle per user: the same seed gives the same order, another seed another one; all rows kept."""
    path = str(_plays(tmp_path))

    def order(seed: int) -> dict[str, list[str]]:
        m = ColumnMapping(user="userID", item="artistID", timestamp=None, order="random", order_seed=seed)
        return _by_user(read_table(spark, path, m))

    first, again, other = order(0), order(0), order(1)
    assert first == again
    assert first != other
    assert all(sorted(v, key=int) == [str(a) for a in range(1, 9)] for v in first.values())
    assert any(v != sorted(v, key=int) for v in first.values())  # not the file order


def test_table_without_time_splits_leave_last_out_in_its_order(spark, tmp_path: Path):
    """Through cleaning, indexing and the split: test = the last row in the user's order, validation the one
    before; the dataset's meta.json says the split is not temporal."""
    from recsys_assets.data import schema as S
    from recsys_assets.data import stages

    for order in ("row", "random"):
        raw_dir, clean_dir, split_dir = (tmp_path / order / n for n in ("raw", "clean", "split"))
        for d in (raw_dir, clean_dir, split_dir):
            d.mkdir(parents=True)
        mapping = ColumnMapping(user="userID", item="artistID", timestamp=None, order=order)
        raw = read_table(spark, str(_plays(tmp_path)), mapping)
        expected = {u: items for u, items in _by_user(raw).items()}
        stages.write_raw(spark, raw, raw_dir)
        stages.clean_and_index(spark, raw_dir, clean_dir, null_keys="fail", require_rating=False)
        stages.split(spark, clean_dir, split_dir, history_length=4)
        assert S.read_order(split_dir) == order
        splits = spark.read.parquet(str(split_dir / "splits")).toPandas()
        users = spark.read.parquet(str(clean_dir / "user_index")).toPandas().set_index("user")["raw_user"]
        items = spark.read.parquet(str(clean_dir / "item_index")).toPandas().set_index("item")["raw_item"]
        for u, g in splits.groupby("user"):
            seq = expected[users[u]]
            held = {s: items[int(g.loc[g.split == s, "item"].iloc[0])] for s in ("test", "validation")}
            assert held == {"test": seq[-1], "validation": seq[-2]}, order


def test_table_side_tables_give_item_names_and_tags(spark, tmp_path: Path):
    """Last.fm's shape: names from one side table, tags (one (artist, tag) pair per row) from another."""
    from recsys_assets.data.sources import ItemTable

    mapping = ColumnMapping(
        user="userID",
        item="artistID",
        timestamp=None,
        order="random",
        integer_ids=True,
        item_tables=(
            ItemTable(str(tmp_path / "artists.dat"), "id", name="name"),
            ItemTable(str(tmp_path / "tagged.dat"), "artistID", category="tagID"),
        ),
    )
    raw = read_table(spark, str(_plays(tmp_path)), mapping)
    items = {r.item: (r.title, list(r.categories)) for r in raw.items.collect()}
    assert items["1"] == ("Artist 1", ["7", "8"])
    assert items["2"] == ("Artist 2", ["7"])
    assert items["3"] == ("Artist 3", [])


def test_lastfm_loads_through_the_table_source(spark, lastfm: Path):
    """The HetRec Last.fm files through a column mapping only: 92,834 plays, artist names and tags."""
    from recsys_assets.data.sources import ItemTable

    mapping = ColumnMapping(
        user="userID",
        item="artistID",
        timestamp=None,
        order="random",
        rating="weight",
        integer_ids=True,
        item_tables=(
            ItemTable(str(lastfm / "artists.dat"), "id", name="name"),
            ItemTable(str(lastfm / "user_taggedartists.dat"), "artistID", category="tagID"),
        ),
    )
    raw = read_table(spark, str(lastfm / "user_artists.dat"), mapping)
    counts = raw.interactions.agg(F.count("*"), F.countDistinct("user"), F.countDistinct("item")).first()
    assert tuple(counts) == (92834, 1892, 17632)
    assert raw.bad_lines == 0
    titles = {r.item: r.title for r in raw.items.filter(F.col("item").isin("1", "89")).collect()}
    assert titles["1"] == "MALICE MIZER"
