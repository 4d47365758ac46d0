"""Blocking quality gates on the data assets (recsys_assets.data.checks): a failed check stops everything
downstream."""

import dagster as dg

from recsys_assets.data import checks
from recsys_assets.defs.helpers import check_result
from recsys_assets.defs.resources import SparkResource
from recsys_assets.defs.types import PublishedFolder


@dg.asset_check(asset="interactions", blocking=True, description="Required columns with the right types; no null keys.")
def interactions_schema_and_keys(interactions: PublishedFolder, spark: SparkResource) -> dg.AssetCheckResult:
    return check_result(checks.interactions_schema_and_keys(spark.spark_session, interactions.path))


@dg.asset_check(
    asset="interaction_splits",
    blocking=True,
    description="Every split non-empty; validation/test users ⊆ train users; no held-out row earlier than the "
    "same user's train rows; histories contain only earlier interactions.",
)
def splits_are_temporal_and_complete(interaction_splits: PublishedFolder, spark: SparkResource) -> dg.AssetCheckResult:
    return check_result(checks.splits_are_temporal_and_complete(spark.spark_session, interaction_splits.path))


@dg.asset_check(
    asset="mds_splits",
    blocking=True,
    description="Each MDS split has the rows of its split and the contract's columns.",
)
def mds_matches_splits(mds_splits: PublishedFolder, spark: SparkResource) -> dg.AssetCheckResult:
    return check_result(checks.mds_matches_splits(spark.spark_session, mds_splits.path))


data_checks = [interactions_schema_and_keys, splits_are_temporal_and_complete, mds_matches_splits]
