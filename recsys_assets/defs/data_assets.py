"""The data half of the graph: raw_interactions → interactions → interaction_splits → mds_splits (the stages
are in recsys_assets.data.stages). Each asset publishes a versioned folder; the next reads exactly that one."""

import dataclasses
import json
from typing import Literal

import dagster as dg
from pydantic import Field

from recsys_assets.data import mds as M
from recsys_assets.data import schema as S
from recsys_assets.data import sources, stages
from recsys_assets.data.blocks import DEFAULT_BLOCK_ROWS
from recsys_assets.data.errors import DataValidationError
from recsys_assets.data.phases import RANKER_WINDOW_DEFAULT
from recsys_assets.data.synthetic import SyntheticSpec
from recsys_assets.defs.constants import DATA_GROUP
from recsys_assets.defs.helpers import table_metadata
from recsys_assets.defs.resources import SparkResource, StateResource
from recsys_assets.defs.types import PublishedFolder


# ------------------------------------------------------------------------------------------------ config
class SyntheticSourceConfig(dg.Config):
    size: Literal["tiny", "small", "100k", "1m", "4m"] = Field(
        "small", description="Preset size; num_users/num_items/mean_interactions_per_user override it."
    )
    seed: int = 0
    num_users: int | None = None
    num_items: int | None = None
    mean_interactions_per_user: int | None = None


class ItemTableConfig(dg.Config):
    """A side table of item features joined by item id (e.g. names, or one (item, tag) pair per row)."""

    path: str = Field(description="A Parquet file/folder, or a delimited text file with a header.")
    item_column: str
    category_column: str | None = Field(None, description="One category per row, or a delimited string.")
    category_separator: str | None = Field(None, description="Set when category_column holds several.")
    name_column: str | None = None
    max_categories: int = Field(20, ge=1, description="The item's most frequent categories kept.")


class TableSourceConfig(dg.Config):
    path: str = Field(
        description="A Parquet file or folder, or a delimited text file (.csv/.tsv/.dat/.txt/.inter; a header "
        "line, or header: false and columns)."
    )
    format: Literal["auto", "csv", "parquet"] = Field("auto", description="'csv' stands for any delimited text.")
    separator: str | None = Field(
        None,
        description="Text files: None = a tab when the first line has one, else ',' (or, without a header, "
        "'whitespace' when it has spaces); 'whitespace' = runs of spaces / tabs; any other string splits exactly.",
    )
    header: bool = Field(True, description="Text files: the first line names the columns. False: `columns` does.")
    columns: list[str] = Field(
        [], description="Text files without a header line (header: false): the column names, in the file's order."
    )
    user_column: str = "user"
    item_column: str = "item"
    timestamp_column: str | None = Field(
        "timestamp", description="None for a table without time: then `order` says how a user's rows are ordered."
    )
    order: Literal["timestamp", "random", "row"] = Field(
        "timestamp",
        description="Without a timestamp column: 'random' (a seeded random order per user) or 'row' (the file's "
        "row order). The split is then leave-last-out in that order, not temporal.",
    )
    order_seed: int = 0
    integer_ids: bool = Field(False, description="Ids must be integers: a line whose id is not is malformed.")
    rating_column: str | None = None
    item_categories_column: str | None = None
    category_separator: str = "|"
    user_feature_columns: list[str] = []
    item_name_column: str | None = Field(None, description="The item's title / name, shown with its source id.")
    item_tables: list[ItemTableConfig] = Field(
        [], description="Side tables of item features (categories, names), joined by item id."
    )


class RawInteractionsConfig(dg.Config):
    """Which source to read. Unknown keys and unknown kinds are refused by Dagster's config validation."""

    source: Literal["synthetic", "movielens", "table"] = "synthetic"
    synthetic: SyntheticSourceConfig = SyntheticSourceConfig()
    movielens_path: str | None = Field(None, description="A MovieLens folder (any public layout) or a '::' file.")
    table: TableSourceConfig | None = None
    bad_lines: Literal["fail", "drop"] = Field(
        "fail",
        description="Text sources: a malformed line (fields, ids, timestamp, rating) fails the read, naming its "
        "file and line, or is dropped and counted.",
    )


class InteractionsConfig(dg.Config):
    null_keys: Literal["drop", "fail"] = Field("drop", description="Rows with a null user/item/timestamp.")
    require_rating: bool = Field(False, description="Refuse null, NaN or negative ratings (explicit feedback).")


class SplitsConfig(dg.Config):
    history_length: int = Field(20, ge=1, le=512, description="Items of recent history carried by each row.")
    ranker_window: int = Field(
        RANKER_WINDOW_DEFAULT,
        ge=0,
        description="Each user's last N train rows are the ranker's queries (recsys_assets.data.phases): the Two "
        "Tower and EASE behind their candidates, and their features, are fitted on the train rows before them, so "
        "the ranker learns from up to N lists per user. 0: one list per user (its validation row).",
    )


class MdsConfig(dg.Config):
    partitions: int = Field(2, ge=1, description="Spark partitions (= MDS writer tasks) per split.")
    compression: str | None = "zstd"
    shard_size_limit: str = "64mb"
    block_rows: int = Field(
        default=DEFAULT_BLOCK_ROWS, ge=1, description="Rows per MDS sample (a block of rows stored column by column)."
    )
    remote_root: str | None = Field(
        None,
        description="Also upload the MDS splits to object storage under this URI (s3://, gs://, dbfs:/, file://), "
        "at <remote_root>/mds_splits/<run id>/<split>/, through Streaming's uploader; meta.json records it as "
        "mds_remote and trainers can stream from it into a local cache. The local copy is kept.",
    )


# ------------------------------------------------------------------------------------------------ helpers
def _read_source(spark, config: RawInteractionsConfig) -> sources.RawTables:
    if config.source == "synthetic":
        c = config.synthetic
        spec = SyntheticSpec.of_size(c.size, seed=c.seed)
        overrides = {
            k: v
            for k, v in (
                ("num_users", c.num_users),
                ("num_items", c.num_items),
                ("mean_interactions_per_user", c.mean_interactions_per_user),
            )
            if v is not None
        }
        return sources.read_synthetic(spark, dataclasses.replace(spec, **overrides))
    if config.source == "movielens":
        if not config.movielens_path:
            raise DataValidationError("raw_interactions: source 'movielens' needs config 'movielens_path'")
        return sources.read_movielens(spark, config.movielens_path, bad_lines=config.bad_lines)
    if config.table is None:
        raise DataValidationError("raw_interactions: source 'table' needs the 'table' config block (path, columns)")
    t = config.table
    mapping = sources.ColumnMapping(
        user=t.user_column,
        item=t.item_column,
        timestamp=t.timestamp_column,
        rating=t.rating_column,
        item_categories=t.item_categories_column,
        category_separator=t.category_separator,
        user_features=tuple(t.user_feature_columns),
        item_name=t.item_name_column,
        order=t.order,
        order_seed=t.order_seed,
        integer_ids=t.integer_ids,
        separator=t.separator,
        header=t.header,
        columns=tuple(t.columns),
        item_tables=tuple(
            sources.ItemTable(
                x.path, x.item_column, x.category_column, x.category_separator, x.name_column, x.max_categories
            )
            for x in t.item_tables
        ),
    )
    return sources.read_table(spark, t.path, mapping, t.format, bad_lines=config.bad_lines)


# ------------------------------------------------------------------------------------------------ assets
@dg.asset(
    group_name=DATA_GROUP,
    kinds={"spark", "parquet"},
    tags={"stage": "ingest"},
    deps=["interaction_source"],  # the observable source (defs/source_data.py): lineage shows the files read
    description="The source interaction table (synthetic, MovieLens or any table), in one raw schema.",
)
def raw_interactions(
    context: dg.AssetExecutionContext, config: RawInteractionsConfig, spark: SparkResource, state: StateResource
) -> dg.Output[PublishedFolder]:
    raw = _read_source(spark.spark_session, config)  # schema checks happen here, before any pass over the data
    with state.build_folder(context) as build:
        stats, preview = stages.write_raw(spark.spark_session, raw, build)
    context.log.info(f"read {stats['rows']} interactions from {raw.description}")
    return dg.Output(
        PublishedFolder(str(build), table="interactions"),
        metadata={
            "source": raw.description,
            "dagster/row_count": int(stats["rows"]),
            "distinct_users": int(stats["users"]),
            "distinct_items": int(stats["items"]),
            "order": raw.order,
            "time_range": f"{stats['t_min']} .. {stats['t_max']} "
            + ("(epoch s)" if raw.order == "timestamp" else "(positions in each user's order: no time)"),
            "malformed_lines_dropped": int(raw.bad_lines),
            **(
                {"malformed_examples": dg.MetadataValue.md("\n".join(f"- {e}" for e in raw.bad_examples))}
                if raw.bad_examples
                else {}
            ),
            "has_item_features": raw.items is not None,
            "has_user_features": raw.users is not None,
            **table_metadata(preview),
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
    with state.build_folder(context) as build:
        summary, preview = stages.clean_and_index(
            spark.spark_session,
            raw_interactions.path,
            build,
            null_keys=config.null_keys,
            require_rating=config.require_rating,
        )
    report = summary.report
    context.log.info(
        f"cleaned: {report.rows_in} in, {report.null_key_rows} null-key rows and {report.duplicate_rows} duplicates "
        f"dropped, {report.rows_out} out"
    )
    return dg.Output(
        PublishedFolder(str(build), table="interactions"),
        metadata={
            "dagster/row_count": report.rows_out,
            "rows_in": report.rows_in,
            "dropped_null_key_rows": report.null_key_rows,
            "null_keys_by_column": dg.MetadataValue.json(report.null_keys_by_column),
            "dropped_duplicate_rows": report.duplicate_rows,
            "num_users": report.users,
            "num_items": report.items,
            "num_categories": summary.num_categories,
            "users_with_holdout": summary.users_with_holdout,
            "user_attribute_cardinalities": dg.MetadataValue.json(summary.user_attribute_cardinalities),
            **table_metadata(preview),
        },
    )


@dg.asset(
    group_name=DATA_GROUP,
    kinds={"spark", "parquet"},
    tags={"stage": "split"},
    description="Leave-last-out splits in each user's order (temporal by timestamp; a table without time in its "
    "seeded random or row order: not temporal); every row carries the user's history before it.",
)
def interaction_splits(
    context: dg.AssetExecutionContext,
    config: SplitsConfig,
    interactions: PublishedFolder,
    spark: SparkResource,
    state: StateResource,
) -> dg.Output[PublishedFolder]:
    with state.build_folder(context) as build:
        counts, preview = stages.split(
            spark.spark_session, interactions.path, build, config.history_length, config.ranker_window
        )
    return dg.Output(
        PublishedFolder(str(build), table="splits"),
        metadata={
            "history_length": config.history_length,
            "ranker_window": config.ranker_window,
            "rows_ranker_window": counts.get(S.RANKER_WINDOW, 0),
            "split": S.SPLIT_DESCRIPTIONS[S.read_order(interactions.path)],
            **{f"rows_{s}": counts.get(s, 0) for s in S.SPLITS},
            "dagster/row_count": sum(counts.get(s, 0) for s in S.SPLITS),
            **table_metadata(preview),
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
    mds_remote = M.join_remote(config.remote_root, "mds_splits", context.run_id) if config.remote_root else None
    if mds_remote:
        M.streaming_remote(mds_remote)  # refuses an unsupported scheme before any Spark work
    with state.build_folder(context) as build:
        meta, summaries = stages.build_mds_dataset(
            spark.spark_session,
            interactions.path,
            interaction_splits.path,
            build,
            partitions=config.partitions,
            compression=config.compression,
            shard_size_limit=config.shard_size_limit,
            mds_remote=mds_remote,
            block_rows=config.block_rows,
            log=context.log.info,
        )
    metadata: dict = {"meta": dg.MetadataValue.json(json.loads(meta.to_json()))}
    for split, summary in summaries.items():
        metadata.update(
            {
                f"{split}_rows": summary["rows"],
                f"{split}_blocks": summary["blocks"],
                f"{split}_shards": summary["shards"],
                f"{split}_bytes": summary["bytes"],
            }
        )
    metadata["columns"] = dg.MetadataValue.json(summaries["train"]["columns"])
    return dg.Output(PublishedFolder(str(build), table="splits"), metadata=metadata)


data_assets = [raw_interactions, interactions, interaction_splits, mds_splits]
