"""The data half of the graph: raw_interactions → interactions → interaction_splits → mds_splits.

Each asset publishes a versioned folder (atomically) and returns its path; the next asset takes that path as
its input, so a downstream materialization always reads exactly the version it was given."""

import dataclasses
import json
from pathlib import Path
from typing import Literal, Optional

import dagster as dg
from pydantic import Field
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from recsys_assets.data import mds as M
from recsys_assets.data import schema as S
from recsys_assets.data import sources, transforms
from recsys_assets.data.errors import DataValidationError
from recsys_assets.data.publish import hardlink_tree, publish_folder
from recsys_assets.data.synthetic import SyntheticSpec
from recsys_assets.defs.constants import DATA_GROUP
from recsys_assets.defs.resources import SparkResource, StateResource
from recsys_assets.defs.types import PublishedFolder

# ------------------------------------------------------------------------------------------------ config
class SyntheticSourceConfig(dg.Config):
    size: Literal["tiny", "small", "100k", "1m", "4m"] = Field(
        "small", description="Preset size; num_users/num_items/mean_interactions_per_user override it."
    )
    seed: int = 0
    num_users: Optional[int] = None
    num_items: Optional[int] = None
    mean_interactions_per_user: Optional[int] = None


class TableSourceConfig(dg.Config):
    path: str = Field(description="A Parquet or CSV file or folder (local path or URI Spark can read).")
    format: Literal["auto", "csv", "parquet"] = "auto"
    user_column: str = "user"
    item_column: str = "item"
    timestamp_column: str = "timestamp"
    rating_column: Optional[str] = None
    item_categories_column: Optional[str] = None
    category_separator: str = "|"
    user_feature_columns: list[str] = []


class RawInteractionsConfig(dg.Config):
    """Which source to read. Unknown keys and unknown kinds are refused by Dagster's config validation."""

    source: Literal["synthetic", "movielens", "table"] = "synthetic"
    synthetic: SyntheticSourceConfig = SyntheticSourceConfig()
    movielens_path: Optional[str] = Field(None, description="A MovieLens folder (any public layout) or a '::' file.")
    table: Optional[TableSourceConfig] = None


class InteractionsConfig(dg.Config):
    null_keys: Literal["drop", "fail"] = Field("drop", description="Rows with a null user/item/timestamp.")
    require_rating: bool = Field(False, description="Refuse null, NaN or negative ratings (explicit feedback).")


class SplitsConfig(dg.Config):
    history_length: int = Field(20, ge=1, le=512, description="Items of recent history carried by each row.")


class MdsConfig(dg.Config):
    partitions: int = Field(2, ge=1, description="Spark partitions (= MDS writer tasks) per split.")
    compression: Optional[str] = "zstd"
    shard_size_limit: str = "64mb"
    remote_root: Optional[str] = Field(
        None,
        description="Also upload the MDS splits to object storage under this URI (s3://, gs://, dbfs:/, file://), "
        "at <remote_root>/mds_splits/<run id>/<split>/, through Streaming's uploader; meta.json records it as "
        "mds_remote and trainers can stream from it into a local cache. The local copy is kept.",
    )


# ------------------------------------------------------------------------------------------------ helpers
def _table_schema(df: DataFrame) -> dg.TableSchema:
    return dg.TableSchema(
        columns=[dg.TableColumn(name=f.name, type=f.dataType.simpleString()) for f in df.schema.fields]
    )


def _sample_markdown(df: DataFrame, n: int = 5) -> str:
    return df.limit(n).toPandas().to_markdown(index=False)


def _read_source(spark, config: RawInteractionsConfig) -> sources.RawTables:
    if config.source == "synthetic":
        c = config.synthetic
        spec = SyntheticSpec.of_size(c.size, seed=c.seed)
        overrides = {
            k: v
            for k, v in (("num_users", c.num_users), ("num_items", c.num_items),
                         ("mean_interactions_per_user", c.mean_interactions_per_user))
            if v is not None
        }
        return sources.read_synthetic(spark, dataclasses.replace(spec, **overrides))
    if config.source == "movielens":
        if not config.movielens_path:
            raise DataValidationError("raw_interactions: source 'movielens' needs config 'movielens_path'")
        return sources.read_movielens(spark, config.movielens_path)
    if config.table is None:
        raise DataValidationError("raw_interactions: source 'table' needs the 'table' config block (path, columns)")
    t = config.table
    mapping = sources.ColumnMapping(
        user=t.user_column, item=t.item_column, timestamp=t.timestamp_column, rating=t.rating_column,
        item_categories=t.item_categories_column, category_separator=t.category_separator,
        user_features=tuple(t.user_feature_columns),
    )
    return sources.read_table(spark, t.path, mapping, t.format)


# ------------------------------------------------------------------------------------------------ assets
@dg.asset(
    group_name=DATA_GROUP,
    kinds={"spark", "parquet"},
    tags={"stage": "ingest"},
    description="The source interaction table (synthetic, MovieLens or any table), in one raw schema.",
)
def raw_interactions(
    context: dg.AssetExecutionContext, config: RawInteractionsConfig, spark: SparkResource, state: StateResource
) -> dg.Output[PublishedFolder]:
    session = spark.spark_session
    raw = _read_source(session, config)  # schema checks happen here, before any pass over the data
    dest = state.asset_dir("raw_interactions", context.run_id)
    with publish_folder(dest) as tmp:
        raw.interactions.write.parquet(str(tmp / "interactions"))
        if raw.items is not None:
            raw.items.write.parquet(str(tmp / "items"))
        if raw.users is not None:
            raw.users.write.parquet(str(tmp / "users"))
        written = session.read.parquet(str(tmp / "interactions"))
        stats = written.agg(
            F.count(F.lit(1)).alias("rows"),
            F.countDistinct("user").alias("users"),
            F.countDistinct("item").alias("items"),
            F.min("timestamp").alias("t_min"),
            F.max("timestamp").alias("t_max"),
        ).first()
        if stats["rows"] == 0:
            raise DataValidationError(f"raw_interactions: the source table is empty (0 rows): {raw.description}")
        sample = _sample_markdown(written)
        schema = _table_schema(written)
    context.log.info(f"read {stats['rows']} interactions from {raw.description}")
    return dg.Output(
        PublishedFolder(str(dest)),
        metadata={
            # Not "path": the IO manager adds its own "path" (the pickled output) and it would replace this one.
            "published_path": dg.MetadataValue.path(str(dest)),
            "source": raw.description,
            "dagster/row_count": int(stats["rows"]),
            "distinct_users": int(stats["users"]),
            "distinct_items": int(stats["items"]),
            "time_range": f"{stats['t_min']} .. {stats['t_max']} (epoch s)",
            "has_item_features": raw.items is not None,
            "has_user_features": raw.users is not None,
            "dagster/column_schema": schema,
            "sample": dg.MetadataValue.md(sample),
        },
    )


@dg.asset(
    group_name=DATA_GROUP,
    kinds={"spark", "parquet"},
    tags={"stage": "clean"},
    description="Cleaned interactions with contiguous 0-based user/item ids, plus item and user feature tables.",
)
def interactions(
    context: dg.AssetExecutionContext,
    config: InteractionsConfig,
    raw_interactions: PublishedFolder,
    spark: SparkResource,
    state: StateResource,
) -> dg.Output[PublishedFolder]:
    session = spark.spark_session
    src = Path(raw_interactions.path)
    raw = sources.RawTables(
        interactions=session.read.parquet(str(src / "interactions")),
        items=session.read.parquet(str(src / "items")) if (src / "items").exists() else None,
        users=session.read.parquet(str(src / "users")) if (src / "users").exists() else None,
    )
    cleaned, report = transforms.clean(raw.interactions, null_keys=config.null_keys, require_rating=config.require_rating)
    holdout_users = transforms.require_holdout_users(cleaned)
    indexed = transforms.index(cleaned, raw)
    dest = state.asset_dir("interactions", context.run_id)
    with publish_folder(dest) as tmp:
        indexed.interactions.write.parquet(str(tmp / "interactions"))
        indexed.item_features.write.parquet(str(tmp / "item_features"))
        indexed.user_features.write.parquet(str(tmp / "user_features"))
        indexed.user_index.write.parquet(str(tmp / "user_index"))
        indexed.item_index.write.parquet(str(tmp / "item_index"))
        indexed.category_index.write.parquet(str(tmp / "category_index"))
        num_categories = session.read.parquet(str(tmp / "category_index")).count()
        (tmp / "cardinalities.json").write_text(
            json.dumps(
                {
                    "num_users": report.users,
                    "num_items": report.items,
                    "num_categories": num_categories,
                    "user_attribute_cardinalities": indexed.user_attribute_cardinalities,
                },
                indent=2,
            )
        )
        written = session.read.parquet(str(tmp / "interactions"))
        schema = _table_schema(written)
        sample = _sample_markdown(written)
    context.log.info(
        f"cleaned: {report.rows_in} in, {report.null_key_rows} null-key rows and {report.duplicate_rows} duplicates "
        f"dropped, {report.rows_out} out"
    )
    return dg.Output(
        PublishedFolder(str(dest)),
        metadata={
            "published_path": dg.MetadataValue.path(str(dest)),
            "dagster/row_count": report.rows_out,
            "rows_in": report.rows_in,
            "dropped_null_key_rows": report.null_key_rows,
            "null_keys_by_column": dg.MetadataValue.json(report.null_keys_by_column),
            "dropped_duplicate_rows": report.duplicate_rows,
            "num_users": report.users,
            "num_items": report.items,
            "num_categories": num_categories,
            "users_with_holdout": holdout_users,
            "user_attribute_cardinalities": dg.MetadataValue.json(indexed.user_attribute_cardinalities),
            "dagster/column_schema": schema,
            "sample": dg.MetadataValue.md(sample),
        },
    )


@dg.asset(
    group_name=DATA_GROUP,
    kinds={"spark", "parquet"},
    tags={"stage": "split"},
    description="Temporal leave-last-out splits; every row carries the user's history before it.",
)
def interaction_splits(
    context: dg.AssetExecutionContext,
    config: SplitsConfig,
    interactions: PublishedFolder,
    spark: SparkResource,
    state: StateResource,
) -> dg.Output[PublishedFolder]:
    session = spark.spark_session
    indexed = session.read.parquet(str(Path(interactions.path) / "interactions"))
    splits = transforms.temporal_split(indexed, config.history_length)
    dest = state.asset_dir("interaction_splits", context.run_id)
    with publish_folder(dest) as tmp:
        splits.write.partitionBy(S.SPLIT).parquet(str(tmp / "splits"))
        written = session.read.parquet(str(tmp / "splits"))
        counts = {r[S.SPLIT]: int(r["count"]) for r in written.groupBy(S.SPLIT).count().collect()}
        (tmp / "history_length.txt").write_text(str(config.history_length))
        schema = _table_schema(written)
        sample = _sample_markdown(written.filter(F.col(S.SPLIT) == "test"))
    return dg.Output(
        PublishedFolder(str(dest)),
        metadata={
            "published_path": dg.MetadataValue.path(str(dest)),
            "history_length": config.history_length,
            **{f"rows_{s}": counts.get(s, 0) for s in S.SPLITS},
            "dagster/row_count": sum(counts.values()),
            "dagster/column_schema": schema,
            "sample": dg.MetadataValue.md(sample),
        },
    )


@dg.asset(
    group_name=DATA_GROUP,
    kinds={"spark", "mosaicml"},
    tags={"stage": "dataset"},
    description="The training dataset: train/validation/test as Mosaic Streaming MDS, feature tables, meta.json.",
)
def mds_splits(
    context: dg.AssetExecutionContext,
    config: MdsConfig,
    interactions: PublishedFolder,
    interaction_splits: PublishedFolder,
    spark: SparkResource,
    state: StateResource,
) -> dg.Output[PublishedFolder]:
    session = spark.spark_session
    splits_path = Path(interaction_splits.path) / "splits"
    splits = session.read.parquet(str(splits_path))
    cards = json.loads((Path(interactions.path) / "cardinalities.json").read_text())
    history_length = int((Path(interaction_splits.path) / "history_length.txt").read_text())
    dest = state.asset_dir("mds_splits", context.run_id)
    summaries: dict[str, dict] = {}
    mds_remote = M.join_remote(config.remote_root, "mds_splits", context.run_id) if config.remote_root else None
    if mds_remote:
        M.streaming_remote(mds_remote)  # refuses an unsupported scheme before any Spark work
    with publish_folder(dest) as tmp:
        paths = S.DatasetPaths(tmp)
        for split in S.SPLITS:
            summaries[split] = M.write_split_to_mds(
                splits, split, paths.mds(split), partitions=config.partitions,
                compression=config.compression, size_limit=config.shard_size_limit,
                remote=M.join_remote(mds_remote, split) if mds_remote else None,
            )
            context.log.info(f"mds {split}: {summaries[split]['rows']} rows in {summaries[split]['shards']} shards")
        # Popularity for log-Q correction and features comes from train rows only: no test-period leak.
        popularity = splits.filter(F.col(S.SPLIT) == "train").groupBy(S.ITEM).agg(F.count(F.lit(1)).alias("popularity"))
        item_features = session.read.parquet(str(Path(interactions.path) / "item_features"))
        (
            item_features.join(popularity, S.ITEM, "left")
            .select(S.ITEM, S.CATEGORIES, F.coalesce("popularity", F.lit(0)).cast("bigint").alias("popularity"))
            .coalesce(1)
            .write.parquet(str(paths.item_features))
        )
        hardlink_tree(Path(interactions.path) / "user_features", paths.user_features)
        hardlink_tree(splits_path, paths.splits)
        meta = S.DatasetMeta(
            num_users=int(cards["num_users"]),
            num_items=int(cards["num_items"]),
            num_categories=int(cards["num_categories"]),
            user_attribute_cardinalities={k: int(v) for k, v in cards["user_attribute_cardinalities"].items()},
            history_length=history_length,
            rows={s: summaries[s]["rows"] for s in S.SPLITS},
            mds_remote=mds_remote,
        )
        paths.meta.write_text(meta.to_json())
    metadata: dict = {"published_path": dg.MetadataValue.path(str(dest)), "meta": dg.MetadataValue.json(json.loads(meta.to_json()))}
    for split, summary in summaries.items():
        metadata[f"{split}_rows"] = summary["rows"]
        metadata[f"{split}_shards"] = summary["shards"]
        metadata[f"{split}_bytes"] = summary["bytes"]
    metadata["columns"] = dg.MetadataValue.json(summaries["train"]["columns"])
    return dg.Output(PublishedFolder(str(dest)), metadata=metadata)


data_assets = [raw_interactions, interactions, interaction_splits, mds_splits]
