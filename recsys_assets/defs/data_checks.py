"""Blocking quality gates on the data assets: a failed check stops everything downstream."""

from pathlib import Path

import dagster as dg
from pyspark.sql import functions as F

from recsys_assets.data import schema as S
from recsys_assets.data.mds import summarize_mds
from recsys_assets.defs.data_assets import interaction_splits, interactions, mds_splits
from recsys_assets.defs.types import PublishedFolder
from recsys_assets.defs.resources import SparkResource

_EXPECTED_TYPES = {S.USER: "int", S.ITEM: "int", S.TIMESTAMP: "bigint", S.RATING: "float"}


@dg.asset_check(asset=interactions, blocking=True, description="Required columns with the right types; no null keys.")
def interactions_schema_and_keys(interactions: PublishedFolder, spark: SparkResource) -> dg.AssetCheckResult:
    df = spark.spark_session.read.parquet(str(Path(interactions.path) / "interactions"))
    actual = {f.name: f.dataType.simpleString() for f in df.schema.fields}
    wrong = {c: (actual.get(c), t) for c, t in _EXPECTED_TYPES.items() if actual.get(c) != t}
    nulls = df.agg(*[F.sum(F.col(c).isNull().cast("long")).alias(c) for c in (S.USER, S.ITEM, S.TIMESTAMP)]).first()
    null_counts = {c: int(nulls[c] or 0) for c in (S.USER, S.ITEM, S.TIMESTAMP)}
    ok = not wrong and not any(null_counts.values())
    return dg.AssetCheckResult(
        passed=ok,
        description=None if ok else f"wrong/missing columns (actual, expected): {wrong}; null keys: {null_counts}",
        metadata={"columns": dg.MetadataValue.json(actual), "null_keys": dg.MetadataValue.json(null_counts)},
    )


@dg.asset_check(
    asset=interaction_splits,
    blocking=True,
    description="Every split non-empty; validation/test users ⊆ train users; no held-out row earlier than the "
    "same user's train rows; histories contain only earlier interactions.",
)
def splits_are_temporal_and_complete(
    interaction_splits: PublishedFolder, spark: SparkResource
) -> dg.AssetCheckResult:
    df = spark.spark_session.read.parquet(str(Path(interaction_splits.path) / "splits"))
    counts = {r[S.SPLIT]: int(r["count"]) for r in df.groupBy(S.SPLIT).count().collect()}
    empty = [s for s in S.SPLITS if counts.get(s, 0) == 0]
    train = df.filter(F.col(S.SPLIT) == "train")
    held = df.filter(F.col(S.SPLIT) != "train")
    train_users = train.select(S.USER).distinct()
    orphan_users = held.select(S.USER).distinct().join(train_users, S.USER, "left_anti").count()
    last_train = train.groupBy(S.USER).agg(F.max(S.TIMESTAMP).alias("_last_train"))
    leaks = held.join(last_train, S.USER).filter(F.col(S.TIMESTAMP) < F.col("_last_train")).count()
    ok = not empty and orphan_users == 0 and leaks == 0
    problems = []
    if empty:
        problems.append(f"empty split(s): {empty}")
    if orphan_users:
        problems.append(f"{orphan_users} validation/test users have no train rows")
    if leaks:
        problems.append(f"{leaks} validation/test rows are earlier than the same user's train rows")
    return dg.AssetCheckResult(
        passed=ok,
        description="; ".join(problems) or None,
        metadata={
            **{f"rows_{s}": counts.get(s, 0) for s in S.SPLITS},
            "heldout_users_without_train": orphan_users,
            "heldout_rows_before_train": leaks,
        },
    )


@dg.asset_check(asset=mds_splits, blocking=True, description="Each MDS split has the rows of its split and the contract's columns.")
def mds_matches_splits(mds_splits: PublishedFolder, spark: SparkResource) -> dg.AssetCheckResult:
    paths = S.DatasetPaths(Path(mds_splits.path))
    meta = S.DatasetMeta.load(paths.meta)
    splits = spark.spark_session.read.parquet(str(paths.splits))
    expected = {r[S.SPLIT]: int(r["count"]) for r in splits.groupBy(S.SPLIT).count().collect()}
    problems = []
    for split in S.SPLITS:
        summary = summarize_mds(paths.mds(split))
        if summary["rows"] != expected.get(split, 0):
            problems.append(f"{split}: {summary['rows']} MDS rows vs {expected.get(split, 0)} split rows")
        if summary["columns"] != S.MDS_COLUMNS:
            problems.append(f"{split}: columns {summary['columns']} != {S.MDS_COLUMNS}")
    if meta.rows != {s: expected.get(s, 0) for s in S.SPLITS}:
        problems.append(f"meta.json rows {meta.rows} != {expected}")
    return dg.AssetCheckResult(passed=not problems, description="; ".join(problems) or None,
                               metadata={"expected_rows": dg.MetadataValue.json(expected)})


data_checks = [interactions_schema_and_keys, splits_are_temporal_and_complete, mds_matches_splits]
