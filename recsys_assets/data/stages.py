"""The data stages in Spark, one function per data asset: each reads the previous stage's folder and writes its
own (raw tables → cleaned + indexed → temporal splits → the MDS training dataset), and returns a summary."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from recsys_assets.data import blocks as B
from recsys_assets.data import mds as M
from recsys_assets.data import schema as S
from recsys_assets.data import sources, transforms
from recsys_assets.data.blocks import DEFAULT_BLOCK_ROWS
from recsys_assets.data.errors import DataValidationError
from recsys_assets.data.phases import MDS_FOLDER_ROWS
from recsys_assets.data.publish import hardlink_tree

# rows shown in a table's sample
SAMPLE_ROWS = 5
# in a splits folder: the settings it was written with
SPLIT_SETTINGS_FILE = "split_settings.json"


@dataclasses.dataclass(frozen=True)
class Preview:
    """A written table's columns (name, Spark type) and a markdown sample of its rows."""

    columns: list[tuple[str, str]]
    sample: str

    @classmethod
    def of(cls, df: DataFrame, n: int = SAMPLE_ROWS) -> Preview:
        return cls(
            [(f.name, f.dataType.simpleString()) for f in df.schema.fields],
            df.limit(n).toPandas().to_markdown(index=False),
        )


def write_raw(session, raw: sources.RawTables, out_dir: Path) -> tuple[dict[str, Any], Preview]:
    """The source's tables as Parquet (interactions, and items / users where the source has them);
    (rows, users, items, t_min, t_max) of the interactions. An empty source is refused."""
    raw.interactions.write.parquet(str(out_dir / "interactions"))
    S.write_order(out_dir, raw.order)
    if raw.items is not None:
        raw.items.write.parquet(str(out_dir / "items"))
    if raw.users is not None:
        raw.users.write.parquet(str(out_dir / "users"))
    written = session.read.parquet(str(out_dir / "interactions"))
    stats = (
        written.agg(
            F.count(F.lit(1)).alias("rows"),
            F.countDistinct("user").alias("users"),
            F.countDistinct("item").alias("items"),
            F.min("timestamp").alias("t_min"),
            F.max("timestamp").alias("t_max"),
        )
        .first()
        .asDict()
    )
    if stats["rows"] == 0:
        raise DataValidationError(f"raw_interactions: the source table is empty (0 rows): {raw.description}")
    return stats, Preview.of(written)


def read_raw(session, raw_root: str | Path) -> sources.RawTables:
    src = Path(raw_root)
    return sources.RawTables(
        interactions=session.read.parquet(str(src / "interactions")),
        items=session.read.parquet(str(src / "items")) if (src / "items").exists() else None,
        users=session.read.parquet(str(src / "users")) if (src / "users").exists() else None,
    )


@dataclasses.dataclass(frozen=True)
class CleanSummary:
    report: transforms.CleanReport
    num_categories: int
    users_with_holdout: int
    user_attribute_cardinalities: dict[str, int]


def clean_and_index(
    session, raw_root: str | Path, out_dir: Path, *, null_keys: str, require_rating: bool
) -> tuple[CleanSummary, Preview]:
    """Cleaned interactions with contiguous 0-based ids, the feature tables, the id indexes and
    cardinalities.json. Refuses data without users that can be held out."""
    raw = read_raw(session, raw_root)
    cleaned, report = transforms.clean(raw.interactions, null_keys=null_keys, require_rating=require_rating)
    holdout_users = transforms.require_holdout_users(cleaned)
    indexed = transforms.index(cleaned, raw)
    for name in ("interactions", "item_features", "user_features", "user_index", "item_index", "category_index"):
        getattr(indexed, name).write.parquet(str(out_dir / name))
    S.write_order(out_dir, S.read_order(raw_root))
    num_categories = session.read.parquet(str(out_dir / "category_index")).count()
    (out_dir / "cardinalities.json").write_text(
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
    summary = CleanSummary(report, num_categories, holdout_users, indexed.user_attribute_cardinalities)
    return summary, Preview.of(session.read.parquet(str(out_dir / "interactions")))


def split(
    session, interactions_root: str | Path, out_dir: Path, history_length: int, ranker_window: int = 0
) -> tuple[dict[str, int], Preview]:
    """Leave-last-out splits in each user's order (by timestamp, or the order a table without time was given:
    schema.ORDER_FILE), partitioned by split, with each row's history, position and ranker-window flag (data/
    phases.py); rows per split (+ "ranker_window": the window's rows) and a sample of test rows."""
    indexed = session.read.parquet(str(Path(interactions_root) / "interactions"))
    splits = transforms.temporal_split(indexed, history_length, ranker_window)
    splits.write.partitionBy(S.SPLIT).parquet(str(out_dir / "splits"))
    written = session.read.parquet(str(out_dir / "splits"))
    counts = {r[S.SPLIT]: int(r["count"]) for r in written.groupBy(S.SPLIT).count().collect()}
    counts[S.RANKER_WINDOW] = written.filter(F.col(S.RANKER_WINDOW)).count()
    (out_dir / SPLIT_SETTINGS_FILE).write_text(
        json.dumps({"history_length": history_length, "ranker_window": ranker_window})
    )
    S.write_order(out_dir, S.read_order(interactions_root))
    return counts, Preview.of(written.filter(F.col(S.SPLIT) == "test"))


def split_settings(splits_root: str | Path) -> dict[str, int]:
    """The history_length and ranker_window the splits were written with."""
    return json.loads((Path(splits_root) / SPLIT_SETTINGS_FILE).read_text())


def build_mds_dataset(
    session,
    interactions_root: str | Path,
    splits_root: str | Path,
    out_dir: Path,
    *,
    partitions: int,
    compression: str | None,
    shard_size_limit: str,
    mds_remote: str | None,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    log=print,
) -> tuple[S.DatasetMeta, dict[str, dict]]:
    """The training dataset (schema.DatasetPaths): each split as MDS (also uploaded under `mds_remote`), item
    features with train popularity, user features, the splits table and meta.json. Returns the meta and each
    split's MDS summary (rows, shards, bytes, columns)."""
    splits_path = Path(splits_root) / "splits"
    splits = session.read.parquet(str(splits_path))
    cards = json.loads((Path(interactions_root) / "cardinalities.json").read_text())
    settings = split_settings(splits_root)
    history_length = int(settings["history_length"])
    ranker_queries = splits.filter(F.col(S.RANKER_WINDOW)).count()
    paths = S.DatasetPaths(out_dir)
    summaries: dict[str, dict] = {}
    split_rows = {r[S.SPLIT]: int(r["count"]) for r in splits.groupBy(S.SPLIT).count().collect()}
    # each split, and the ranker phase's fit rows (train before the window) when there is a window
    folders = {name: split_rows.get(name, 0) for name in S.SPLITS}
    if ranker_queries:
        folders[S.RANKER_FIT] = split_rows.get("train", 0) - ranker_queries
    for name, count in folders.items():
        summaries[name] = M.write_rows_to_mds(
            splits.filter(MDS_FOLDER_ROWS[name].column()),
            paths.mds(name),
            history_length=history_length,
            rows=count,
            block_rows=block_rows,
            partitions=partitions,
            compression=compression,
            size_limit=shard_size_limit,
            remote=M.join_remote(mds_remote, name) if mds_remote else None,
        )
        log(
            f"mds {name}: {summaries[name]['rows']} rows in {summaries[name]['blocks']} blocks, "
            f"{summaries[name]['shards']} shards"
        )
    # Popularity for log-Q correction and features comes from train rows only: no test-period leak.
    popularity = splits.filter(F.col(S.SPLIT) == "train").groupBy(S.ITEM).agg(F.count(F.lit(1)).alias("popularity"))
    item_features = session.read.parquet(str(Path(interactions_root) / "item_features"))
    (
        item_features.join(popularity, S.ITEM, "left")
        .select(S.ITEM, S.CATEGORIES, F.coalesce("popularity", F.lit(0)).cast("bigint").alias("popularity"))
        .coalesce(1)
        .write.parquet(str(paths.item_features))
    )
    hardlink_tree(Path(interactions_root) / "user_features", paths.user_features)
    hardlink_tree(splits_path, paths.splits)
    id_types = write_id_tables(session, interactions_root, paths)
    meta = S.DatasetMeta(
        num_users=int(cards["num_users"]),
        num_items=int(cards["num_items"]),
        num_categories=int(cards["num_categories"]),
        user_attribute_cardinalities={k: int(v) for k, v in cards["user_attribute_cardinalities"].items()},
        history_length=history_length,
        rows={s: summaries[s]["rows"] for s in S.SPLITS},
        mds_remote=mds_remote,
        mds_layout=B.read_layout(paths.mds("train")).to_dict(),
        order=S.read_order(splits_root),
        ranker_window=int(settings["ranker_window"]),
        ranker_queries=int(ranker_queries),
        **id_types,
    )
    paths.meta.write_text(meta.to_json())
    return meta, summaries


def write_id_tables(session, interactions_root: str | Path, paths: S.DatasetPaths) -> dict[str, str]:
    """The dataset's map back to the source (schema.DatasetPaths.user_index / item_index: the raw id, and the
    item's title and category names); returns user_id_type / item_id_type: "int64" when every raw id of that
    column is the decimal form of an integer (it round-trips through int64), else "string"."""
    root = Path(interactions_root)
    user_index = session.read.parquet(str(root / "user_index"))
    item_index = session.read.parquet(str(root / "item_index"))
    if S.TITLE not in item_index.columns:  # an interactions folder written before titles were kept
        item_index = item_index.withColumn(S.TITLE, F.lit(None).cast("string"))
    category_index = session.read.parquet(str(root / "category_index"))
    item_features = session.read.parquet(str(root / "item_features"))
    names = (
        item_features.select(S.ITEM, F.explode_outer(S.CATEGORIES).alias("category_id"))
        .join(F.broadcast(category_index), "category_id", "left")
        .groupBy(S.ITEM)
        .agg(F.array_sort(F.collect_list("category")).alias(S.CATEGORIES))
    )
    (
        item_index.join(names, S.ITEM, "left")
        .select(
            F.col(S.ITEM).cast("int"),
            "raw_item",
            S.TITLE,
            F.coalesce(S.CATEGORIES, F.array().cast("array<string>")).alias(S.CATEGORIES),
        )
        .orderBy(S.ITEM)
        .coalesce(1)
        .write.parquet(str(paths.item_index))
    )
    user_index.select(F.col(S.USER).cast("int"), "raw_user").orderBy(S.USER).coalesce(1).write.parquet(
        str(paths.user_index)
    )
    return {"user_id_type": _id_type(user_index, "raw_user"), "item_id_type": _id_type(item_index, "raw_item")}


def _id_type(index: DataFrame, raw_col: str) -> str:
    as_int = F.expr(f"try_cast(`{raw_col}` AS BIGINT)")
    not_int = index.filter(as_int.isNull() | (as_int.cast("string") != F.col(raw_col))).limit(1).count()
    return "string" if not_int else "int64"
