"""The data asset graph end to end (tiny synthetic source), and the code location's definitions."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest

from recsys_assets.data import schema as S
from recsys_assets.data.mds import split_layout
from recsys_assets.defs.data_assets import data_assets
from recsys_assets.defs.data_checks import data_checks

DATA_ASSETS = {"raw_interactions", "interactions", "interaction_splits", "mds_splits"}
DATA_CHECKS = {
    ("interactions", "interactions_schema_and_keys"),
    ("interaction_splits", "splits_are_temporal_and_complete"),
    ("mds_splits", "mds_matches_splits"),
}
TINY_USERS, TINY_ITEMS = 200, 120  # synthetic.SIZES["tiny"]


def _metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    (mat,) = result.asset_materializations_for_node(asset)
    return {k: getattr(v, "value", v) for k, v in mat.metadata.items()}


@pytest.fixture(scope="module")
def tiny_run(spark, tmp_path_factory):
    from recsys_assets.defs.resources import SparkResource, StateResource
    from recsys_assets.defs.storage import AssetFolderIOManager

    root = tmp_path_factory.mktemp("state")
    state, instance = StateResource(root=str(root)), dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        [*data_assets, *data_checks],
        run_config={"ops": {"raw_interactions": {"config": {"synthetic": {"size": "tiny"}}}}},
        resources={
            "spark": SparkResource(master="local[2]", shuffle_partitions=4),
            "state": state,
            "io_manager": AssetFolderIOManager(state=state),
        },
        instance=instance,
    )
    return result, root, _handed_downstream(instance, AssetFolderIOManager(state=state), result.run_id)


def _handed_downstream(instance, manager, run_id: str):
    """What a downstream step of this run receives for an asset: the I/O manager's load_input."""

    def load(asset: str):
        key = dg.AssetKey(asset)
        upstream = dg.build_output_context(asset_key=key, run_id=run_id)
        return manager.load_input(dg.build_input_context(asset_key=key, instance=instance, upstream_output=upstream))

    return load


def test_materialize_tiny_synthetic_succeeds_and_checks_pass(tiny_run):
    result, _, _ = tiny_run
    assert result.success
    materialized = {
        e.asset_key.to_user_string()
        for e in result.all_events
        if e.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION
    }
    assert materialized == DATA_ASSETS
    evaluations = result.get_asset_check_evaluations()
    assert {(e.asset_key.to_user_string(), e.check_name) for e in evaluations} == DATA_CHECKS
    failed = [(e.check_name, e.description) for e in evaluations if not e.passed]
    assert failed == []


def test_metadata_row_counts_are_consistent(tiny_run):
    result, _, handed_downstream = tiny_run
    raw = _metadata(result, "raw_interactions")
    inter = _metadata(result, "interactions")
    splits = _metadata(result, "interaction_splits")
    mds = _metadata(result, "mds_splits")

    assert raw["dagster/row_count"] > 0 and raw["distinct_users"] == TINY_USERS
    assert raw["has_item_features"] and raw["has_user_features"]
    # The generator has no duplicates or null keys: nothing is dropped.
    assert inter["rows_in"] == inter["dagster/row_count"] == raw["dagster/row_count"]
    assert inter["dropped_null_key_rows"] == 0 and inter["dropped_duplicate_rows"] == 0
    assert inter["num_users"] == TINY_USERS and 0 < inter["num_items"] <= TINY_ITEMS
    assert inter["users_with_holdout"] == TINY_USERS  # every synthetic user has >= 3 interactions
    assert inter["user_attribute_cardinalities"] == {"attr_age_group": 6, "attr_region": 5}
    assert 0 < inter["num_categories"] <= 12

    n = inter["dagster/row_count"]
    assert splits["dagster/row_count"] == n
    assert splits["rows_test"] == splits["rows_validation"] == TINY_USERS
    assert splits["rows_train"] == n - 2 * TINY_USERS
    assert splits["history_length"] == 20
    assert {s: mds[f"{s}_rows"] for s in S.SPLITS} == {s: splits[f"rows_{s}"] for s in S.SPLITS}
    assert sum(mds[f"{s}_rows"] for s in S.SPLITS) == n
    assert all(mds[f"{s}_shards"] >= 1 and mds[f"{s}_bytes"] > 0 for s in S.SPLITS)
    assert mds["columns"] == split_layout(20).mds_columns()
    # Each asset records the folder it published (the value handed downstream), one per run.
    for asset in DATA_ASSETS:
        published = Path(_metadata(result, asset)["path"])
        assert str(published) == handed_downstream(asset).path
        assert published.is_dir() and published.name == result.run_id


def test_published_dataset_layout_and_meta(tiny_run, spark):
    result, root, handed_downstream = tiny_run
    inter = _metadata(result, "interactions")
    mds_path = Path(_metadata(result, "mds_splits")["path"])
    assert mds_path == Path(handed_downstream("mds_splits").path)
    assert mds_path.parent == root / "assets" / "mds_splits"
    assert (root / "assets" / "mds_splits" / "latest").resolve() == mds_path.resolve()
    assert not [p for p in root.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]

    paths = S.DatasetPaths(mds_path)
    meta = S.DatasetMeta.load(paths.meta)
    assert meta.num_users == inter["num_users"] and meta.num_items == inter["num_items"]
    assert meta.num_categories == inter["num_categories"]
    assert meta.user_attribute_cardinalities == {"attr_age_group": 6, "attr_region": 5}
    assert meta.history_length == 20
    assert sum(meta.rows.values()) == inter["dagster/row_count"]
    assert meta == S.DatasetMeta.from_json(json.dumps(json.loads(paths.meta.read_text())))

    item_features = spark.read.parquet(str(paths.item_features))
    assert item_features.count() == meta.num_items
    ids = sorted(r.item for r in item_features.select("item").collect())
    assert ids == list(range(meta.num_items))
    max_cat = item_features.selectExpr("max(array_max(categories)) AS m").first().m
    assert max_cat < meta.num_categories
    # train-only popularity sums to the train rows
    assert item_features.selectExpr("sum(popularity) AS s").first().s == meta.rows["train"]
    user_features = spark.read.parquet(str(paths.user_features))
    assert user_features.count() == meta.num_users
    splits = spark.read.parquet(str(paths.splits))
    assert splits.count() == sum(meta.rows.values())
    for split in S.SPLITS:
        assert (paths.mds(split) / "index.json").is_file()


def test_definitions_load_with_every_data_asset_and_check():
    from recsys_assets.definitions import defs

    dg.Definitions.validate_loadable(defs)
    repo = defs.get_repository_def()
    keys = {k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()}
    assert DATA_ASSETS <= keys
    checks = {(k.asset_key.to_user_string(), k.name) for k in repo.asset_graph.asset_check_keys}
    assert DATA_CHECKS <= checks
    graph = repo.asset_graph
    parents = lambda name: {p.to_user_string() for p in graph.get(dg.AssetKey(name)).parent_keys}  # noqa: E731
    assert parents("interactions") == {"raw_interactions"}
    assert parents("interaction_splits") == {"interactions"}
    assert parents("mds_splits") == {"interactions", "interaction_splits"}
    assert {"spark", "state"} <= set(repo.get_top_level_resources())
