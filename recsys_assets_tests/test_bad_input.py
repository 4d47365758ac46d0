"""Bad input is refused early with a `DataValidationError` (or Dagster's config error) that names the problem,
and a failed run publishes nothing downstream."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from recsys_assets.data.errors import DataValidationError
from recsys_assets.data.sources import RAW_INTERACTION_SCHEMA, ColumnMapping, read_movielens, read_table
from recsys_assets.data.transforms import clean, require_holdout_users
from recsys_assets.defs.data_assets import (
    RawInteractionsConfig,
    SyntheticSourceConfig,
    _read_source,
    data_assets,
    raw_interactions,
)
from recsys_assets.defs.data_checks import data_checks


def _parquet(tmp_path: Path, df: pd.DataFrame, name: str = "t.parquet") -> str:
    path = tmp_path / name
    df.to_parquet(path)
    return str(path)


GOOD = {"user": ["a", "b"], "item": ["x", "y"], "timestamp": [1, 2], "rating": [1.0, 2.0]}


def _empty() -> pd.DataFrame:
    """Zero rows with the right column types (an all-empty object column would be written as Parquet null)."""
    return pd.DataFrame(GOOD).iloc[:0].astype({"user": "string", "item": "string"})


# ------------------------------------------------------------------------------------------------ paths
def test_movielens_missing_path(spark, tmp_path: Path):
    missing = tmp_path / "no-such-movielens"
    with pytest.raises(DataValidationError, match="does not exist") as e:
        read_movielens(spark, missing)
    assert str(missing) in str(e.value)


def test_movielens_folder_without_a_ratings_file(spark, tmp_path: Path):
    (tmp_path / "ml").mkdir()
    (tmp_path / "ml" / "movies.csv").write_text("movieId,title,genres\n")
    with pytest.raises(DataValidationError, match=r"none of ratings\.csv, ratings\.dat, u\.data") as e:
        read_movielens(spark, tmp_path / "ml")
    assert "movies.csv" in str(e.value)  # says what it found instead


def test_movielens_source_without_a_path_in_config(spark):
    with pytest.raises(DataValidationError, match="movielens_path"):
        _read_source(spark, RawInteractionsConfig(source="movielens"))


def test_table_source_without_a_table_block(spark):
    with pytest.raises(DataValidationError, match="'table' config block"):
        _read_source(spark, RawInteractionsConfig(source="table"))


def test_table_missing_path(spark, tmp_path: Path):
    missing = str(tmp_path / "nope.parquet")
    with pytest.raises(DataValidationError, match="does not exist") as e:
        read_table(spark, missing, ColumnMapping())
    assert missing in str(e.value)


def test_table_unknown_format(spark, tmp_path: Path):
    path = _parquet(tmp_path, pd.DataFrame(GOOD))
    with pytest.raises(DataValidationError, match="format must be .*'json'"):
        read_table(spark, path, ColumnMapping(), fmt="json")


# ------------------------------------------------------------------------------------------------ schema
def test_missing_column(spark, tmp_path: Path):
    df = pd.DataFrame({"user_id": ["a"], "item": ["x"], "timestamp": [1]})
    path = _parquet(tmp_path, df)
    with pytest.raises(DataValidationError, match=r"missing column\(s\) \['user'\]") as e:
        read_table(spark, path, ColumnMapping())
    assert "user_id" in str(e.value)  # lists the columns the table does have


def test_misnamed_column_in_the_mapping(spark, tmp_path: Path):
    path = _parquet(tmp_path, pd.DataFrame(GOOD))
    with pytest.raises(DataValidationError, match=r"missing column\(s\) \['stars', 'genre'\]"):
        read_table(spark, path, ColumnMapping(rating="stars", item_categories="genre"))


def test_user_id_as_double(spark, tmp_path: Path):
    path = _parquet(tmp_path, pd.DataFrame({**GOOD, "user": [1.0, 2.0]}))
    with pytest.raises(DataValidationError, match="user id column 'user' has type double"):
        read_table(spark, path, ColumnMapping())


def test_item_id_as_boolean(spark, tmp_path: Path):
    path = _parquet(tmp_path, pd.DataFrame({**GOOD, "sku": [True, False]}))
    with pytest.raises(DataValidationError, match="item id column 'sku' has type boolean"):
        read_table(spark, path, ColumnMapping(item="sku"))


def test_timestamp_as_boolean(spark, tmp_path: Path):
    path = _parquet(tmp_path, pd.DataFrame({**GOOD, "timestamp": [True, False]}))
    with pytest.raises(DataValidationError, match="timestamp column 'timestamp' has type boolean"):
        read_table(spark, path, ColumnMapping())


def test_rating_as_boolean(spark, tmp_path: Path):
    path = _parquet(tmp_path, pd.DataFrame({**GOOD, "liked": [True, False]}))
    with pytest.raises(DataValidationError, match="rating column 'liked' has type boolean"):
        read_table(spark, path, ColumnMapping(rating="liked"))


def test_item_categories_of_the_wrong_type(spark, tmp_path: Path):
    path = _parquet(tmp_path, pd.DataFrame({**GOOD, "genre": [3, 4]}))
    with pytest.raises(DataValidationError, match="item category column 'genre' has type bigint"):
        read_table(spark, path, ColumnMapping(item_categories="genre"))


# ------------------------------------------------------------------------------------------------ values
def _raw(spark, rows):
    return spark.createDataFrame(rows, RAW_INTERACTION_SCHEMA)


def test_null_ids_fail_or_drop(spark):
    rows = [("a", "x", 1, 1.0), (None, "y", 2, 1.0), ("b", None, 3, 1.0), (None, "z", 4, 1.0), ("c", "x", 5, 2.0)]
    with pytest.raises(DataValidationError, match=r"null values in key column\(s\) \{'user': 2, 'item': 1\}") as e:
        clean(_raw(spark, rows), null_keys="fail")
    assert "null_keys='drop'" in str(e.value)  # says how to proceed

    cleaned, report = clean(_raw(spark, rows), null_keys="drop")
    assert report.null_key_rows == 3
    assert report.null_keys_by_column == {"user": 2, "item": 1, "timestamp": 0}
    assert report.rows_out == cleaned.count() == 2
    assert {r.user for r in cleaned.collect()} == {"a", "c"}


@pytest.mark.parametrize("bad_rating, what", [(float("nan"), "null or NaN"), (None, "null or NaN"), (-1.0, "negative")])
def test_bad_ratings_with_require_rating(spark, bad_rating, what):
    rows = [("a", "x", 1, 4.0), ("a", "y", 2, bad_rating), ("b", "x", 3, 5.0)]
    with pytest.raises(DataValidationError, match=rf"column 'rating' has 1 {what} value") as e:
        clean(_raw(spark, rows), require_rating=True)
    assert "require_rating=True" in str(e.value)
    # Without the requirement (implicit feedback) the same rows are accepted.
    _, report = clean(_raw(spark, rows), require_rating=False)
    assert report.rows_out == 3


def test_empty_table(spark, tmp_path: Path):
    path = _parquet(tmp_path, _empty())
    raw = read_table(spark, path, ColumnMapping(rating="rating"))
    with pytest.raises(DataValidationError, match=r"empty \(0 rows\)"):
        clean(raw.interactions)


def test_every_row_has_a_null_key(spark):
    with pytest.raises(DataValidationError, match="no rows left after dropping 2 row"):
        clean(_raw(spark, [(None, "x", 1, 1.0), ("a", "x", None, 1.0)]), null_keys="drop")


def test_every_user_has_fewer_than_three_interactions(spark):
    df = spark.createDataFrame(
        [(0, 0, 1, 1.0), (0, 1, 2, 1.0), (1, 0, 1, 1.0)], "user int, item int, timestamp bigint, rating float"
    )
    with pytest.raises(DataValidationError, match="every user has fewer than 3 interactions"):
        require_holdout_users(df)


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    "config, named",
    [
        ({"sorce": "synthetic"}, 'unexpected config entry "sorce"'),  # unknown key
        ({"source": "csv"}, "got csv"),  # unknown source kind
        ({"synthetic": {"size": "tiny", "users": 10}}, 'unexpected config entry "users"'),  # nested unknown key
        ({"table": {"user_column": "u"}}, 'Missing required config entry "path"'),  # required field missing
    ],
)
def test_bad_run_config_is_rejected_by_dagster(data_resources, config, named):
    with pytest.raises(dg.DagsterInvalidConfigError) as e:
        dg.materialize(
            [raw_interactions],
            run_config={"ops": {"raw_interactions": {"config": config}}},
            resources=data_resources,
        )
    assert named in str(e.value)


def test_unknown_synthetic_size(spark):
    """Refused by the typed config itself (before any data is generated), naming the value and the choices."""
    with pytest.raises(ValueError, match="(?s)size.*'tiny', 'small'.*input_value='huge'"):
        _read_source(spark, RawInteractionsConfig(synthetic=SyntheticSourceConfig(size="huge")))


# ------------------------------------------------------------------------------------------------ nothing published
def _failure_text(result: dg.ExecuteInProcessResult) -> str:
    texts = []
    for event in result.all_events:
        if event.event_type == dg.DagsterEventType.STEP_FAILURE:
            err = event.step_failure_data.error
            while err is not None:
                texts.append(err.message)
                err = err.cause
    return "\n".join(texts)


def _published(state_root: Path, asset: str) -> list[str]:
    folder = state_root / "assets" / asset
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _run_table(tmp_path: Path, data_resources: dict, df: pd.DataFrame, interactions_config: dict | None = None):
    path = _parquet(tmp_path, df, "input.parquet")
    run_config = {"ops": {"raw_interactions": {"config": {"source": "table", "table": {"path": path}}}}}
    if interactions_config:
        run_config["ops"]["interactions"] = {"config": interactions_config}
    return dg.materialize(
        [*data_assets, *data_checks], run_config=run_config, resources=data_resources, raise_on_error=False
    )


def _assert_not_materialized(result, state_root: Path, assets: list[str]) -> None:
    for asset in assets:
        assert result.asset_materializations_for_node(asset) == [], asset
        names = _published(state_root, asset)
        assert names == [], f"{asset}: something was published: {names}"


def test_failed_interactions_publishes_nothing_downstream(spark, tmp_path: Path, data_resources: dict):
    df = pd.DataFrame(
        {"user": ["a", "a", "a", None, "b"], "item": ["x", "y", "z", "x", "x"], "timestamp": [1, 2, 3, 4, 5]}
    )
    result = _run_table(tmp_path, data_resources, df, {"null_keys": "fail"})
    assert not result.success
    assert "null values in key column(s) {'user': 1}" in _failure_text(result)
    state_root = Path(data_resources["state"].root)
    # raw_interactions succeeded and published exactly one version (plus the `latest` link)...
    assert len(result.asset_materializations_for_node("raw_interactions")) == 1
    raw_versions = _published(state_root, "raw_interactions")
    assert len(raw_versions) == 2 and "latest" in raw_versions
    # ...and nothing from interactions on.
    _assert_not_materialized(result, state_root, ["interactions", "interaction_splits", "mds_splits"])
    leftovers = [p for p in (state_root / "assets").rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    assert leftovers == []


def test_failure_inside_publish_leaves_no_version_and_no_temp_folder(spark, tmp_path: Path, data_resources: dict):
    # An empty table passes the schema checks; raw_interactions refuses it after writing into its temp folder.
    result = _run_table(tmp_path, data_resources, _empty())
    assert not result.success
    assert "empty (0 rows)" in _failure_text(result)
    state_root = Path(data_resources["state"].root)
    _assert_not_materialized(
        result, state_root, ["raw_interactions", "interactions", "interaction_splits", "mds_splits"]
    )
    assert not any(".tmp-" in p.name for p in state_root.rglob("*"))


# ------------------------------------------------------------------------------------------------ malformed lines
def _u_data(tmp_path: Path, *bad: str) -> Path:
    root = tmp_path / "ml-100k"
    root.mkdir()
    lines = ["1\t10\t4\t881250949", "1\t20\t3\t881250950", *bad, "2\t10\t5\t881250951"]
    (root / "u.data").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize(
    "line, problem",
    [
        ("garbage line here", "no value for column 'item'"),
        ("196\tx\t3\t881250949", "column 'item': x is not an integer"),
        ("196\t10\tgood\t881250949", "column 'rating': good is not a number"),
        ("196\t10\t3\t881250949\textra", "more than 4 fields"),
    ],
)
def test_movielens_malformed_line_is_named_by_file_and_line(spark, tmp_path: Path, line: str, problem: str):
    """u.data line 3 is malformed: the read fails naming u.data:3 and what is wrong; with bad_lines='drop'
    the line is dropped and counted."""
    root = _u_data(tmp_path, line)
    with pytest.raises(DataValidationError, match="1 of 4 lines are malformed") as e:
        read_movielens(spark, root)
    assert f"u.data:3: {problem}" in str(e.value)
    assert "bad_lines='drop'" in str(e.value)

    raw = read_movielens(spark, root, bad_lines="drop")
    assert raw.bad_lines == 1 and raw.bad_examples[0].startswith("u.data:3:")
    assert sorted((r.user, r.item) for r in raw.interactions.collect()) == [("1", "10"), ("1", "20"), ("2", "10")]


def test_table_text_malformed_lines(spark, tmp_path: Path):
    """A CSV table: a bad timestamp and, with integer ids, a non-integer id are named with their line."""
    path = tmp_path / "events.csv"
    path.write_text("uid,iid,ts\n1,10,1000\n1,abc,1001\n2,10,yesterday\n2,11,2021-01-01\n")
    with pytest.raises(DataValidationError, match="events.csv:4: column 'ts': yesterday is neither") as e:
        read_table(spark, str(path), ColumnMapping(user="uid", item="iid", timestamp="ts"))
    assert "1 of 4 lines" in str(e.value)  # string ids: "abc" is a valid id
    with pytest.raises(DataValidationError, match="2 of 4 lines") as e:
        read_table(spark, str(path), ColumnMapping(user="uid", item="iid", timestamp="ts", integer_ids=True))
    assert "events.csv:3: column 'iid': abc is not an integer" in str(e.value)
    raw = read_table(spark, str(path), ColumnMapping(user="uid", item="iid", timestamp="ts"), bad_lines="drop")
    assert sorted(tuple(r)[:3] for r in raw.interactions.collect()) == [
        ("1", "10", 1000),
        ("1", "abc", 1001),
        ("2", "11", 1609459200),
    ]


def test_table_without_time_needs_an_order(spark, tmp_path: Path):
    path = _parquet(tmp_path, pd.DataFrame(GOOD))
    with pytest.raises(DataValidationError, match="no timestamp column; set order to 'random'"):
        read_table(spark, path, ColumnMapping(timestamp=None))
    with pytest.raises(DataValidationError, match="order 'random' is for a table without time"):
        read_table(spark, path, ColumnMapping(order="random"))
