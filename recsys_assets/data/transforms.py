"""Spark transforms: cleaning, contiguous id indexing, temporal leave-last-out splits with history."""

from __future__ import annotations

import dataclasses
from typing import Literal

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from recsys_assets.data import schema as S
from recsys_assets.data.errors import DataValidationError
from recsys_assets.data.sources import RawTables

MIN_INTERACTIONS_FOR_HOLDOUT = 3


# ------------------------------------------------------------------------------------------------ cleaning
@dataclasses.dataclass(frozen=True)
class CleanReport:
    rows_in: int
    null_key_rows: int  # rows dropped for a null user, item or timestamp
    duplicate_rows: int  # exact duplicates dropped
    rows_out: int
    users: int
    items: int
    null_keys_by_column: dict[str, int]


def clean(
    raw: DataFrame,
    *,
    null_keys: Literal["drop", "fail"] = "drop",
    require_rating: bool = False,
) -> tuple[DataFrame, CleanReport]:
    """Drops rows with null keys (or refuses them) and exact duplicates; validates ratings if required.

    One aggregate pass computes every count, so the checks cost a single scan."""
    key_cols = [S.USER, S.ITEM, S.TIMESTAMP]
    aggs = [F.count(F.lit(1)).alias("rows")]
    aggs += [F.sum(F.col(c).isNull().cast("long")).alias(f"null_{c}") for c in key_cols]
    # rows with any null key (what dropna drops), in this pass instead of a count() of its own
    any_null = F.greatest(*[F.col(c).isNull().cast("long") for c in key_cols])
    aggs.append(F.sum(any_null).alias("null_rows"))
    aggs += [
        F.sum((F.col(S.RATING).isNull() | F.isnan(S.RATING)).cast("long")).alias("bad_rating_null"),
        F.sum((F.col(S.RATING) < 0).cast("long")).alias("bad_rating_negative"),
    ]
    stats = raw.agg(*aggs).first().asDict()
    rows_in = stats["rows"]
    if rows_in == 0:
        raise DataValidationError("interactions: the source table is empty (0 rows)")
    nulls = {c: int(stats[f"null_{c}"] or 0) for c in key_cols}
    if null_keys == "fail" and any(nulls.values()):
        bad = {c: n for c, n in nulls.items() if n}
        example = raw.filter(" OR ".join(f"`{c}` IS NULL" for c in bad)).first()
        raise DataValidationError(
            f"interactions: null values in key column(s) {bad} (of {rows_in} rows); first such row: "
            f"{example.asDict() if example else None}. Set null_keys='drop' to drop them instead."
        )
    if require_rating:
        for key, what in (("bad_rating_null", "null or NaN"), ("bad_rating_negative", "negative")):
            if stats[key]:
                cond = (F.col(S.RATING).isNull() | F.isnan(S.RATING)) if key.endswith("null") else F.col(S.RATING) < 0
                example = raw.filter(cond).first()
                raise DataValidationError(
                    f"interactions: column 'rating' has {stats[key]} {what} value(s) but ratings are required "
                    f"(require_rating=True); first such row: {example.asDict() if example else None}"
                )
    cleaned = raw.dropna(subset=key_cols).dropDuplicates()
    counts = cleaned.agg(
        F.count(F.lit(1)).alias("rows"),
        F.countDistinct(S.USER).alias("users"),
        F.countDistinct(S.ITEM).alias("items"),
    ).first()
    null_rows = int(stats["null_rows"] or 0)
    if counts["rows"] == 0:
        raise DataValidationError(
            f"interactions: no rows left after dropping {null_rows} row(s) with null keys {nulls}"
        )
    report = CleanReport(
        rows_in=rows_in,
        null_key_rows=null_rows,
        duplicate_rows=rows_in - null_rows - counts["rows"],
        rows_out=counts["rows"],
        users=counts["users"],
        items=counts["items"],
        null_keys_by_column=nulls,
    )
    return cleaned, report


# ------------------------------------------------------------------------------------------------ indexing
@dataclasses.dataclass
class IndexedTables:
    interactions: DataFrame  # user int, item int, timestamp bigint, rating float
    item_features: DataFrame  # item int, categories array<int>
    user_features: DataFrame  # user int, attr_* int (0 = unknown)
    user_index: DataFrame  # raw_user string, user int
    item_index: DataFrame  # raw_item string, item int, title string (null where the source has no title)
    category_index: DataFrame  # category string, category int
    user_attribute_cardinalities: dict[str, int]


def _contiguous_index(values: DataFrame, raw_col: str, idx_col: str) -> DataFrame:
    """0-based contiguous ids in the order of the raw id — numeric order for integer-like ids (so "10" follows
    "9", and the protocol's (timestamp, item) tie-break matches the raw ids), string order for the rest;
    zipWithIndex avoids a one-partition window."""
    distinct = (
        values.select(F.col(raw_col))
        .distinct()
        .orderBy(F.expr(f"try_cast(`{raw_col}` AS BIGINT)").asc_nulls_last(), F.col(raw_col))
    )
    spark = values.sparkSession
    rdd = distinct.rdd.zipWithIndex().map(lambda row_i: (row_i[0][0], int(row_i[1])))
    return spark.createDataFrame(
        rdd, T.StructType([T.StructField(raw_col, T.StringType()), T.StructField(idx_col, T.IntegerType())])
    )


def index(cleaned: DataFrame, raw: RawTables) -> IndexedTables:
    user_index = _contiguous_index(cleaned, S.USER, "_u").withColumnRenamed(S.USER, "raw_user").cache()
    item_index = _contiguous_index(cleaned, S.ITEM, "_i").withColumnRenamed(S.ITEM, "raw_item").cache()
    interactions = (
        cleaned.join(F.broadcast(user_index), cleaned[S.USER] == user_index["raw_user"])
        .join(F.broadcast(item_index), cleaned[S.ITEM] == item_index["raw_item"])
        .select(
            F.col("_u").alias(S.USER),
            F.col("_i").alias(S.ITEM),
            F.col(S.TIMESTAMP).cast("bigint"),
            F.col(S.RATING).cast("float"),
        )
    )

    # Items: categories indexed 0..C-1 (an item with no known category has an empty list).
    titles = None
    if raw.items is not None:
        items_raw = raw.items.dropDuplicates(["item"])
        if S.TITLE in items_raw.columns:
            titles = items_raw.select(F.col("item").alias("_t_item"), F.col(S.TITLE).cast("string").alias(S.TITLE))
        exploded = items_raw.select(F.col("item"), F.explode_outer("categories").alias("category"))
        category_index = _contiguous_index(exploded.filter(F.col("category").isNotNull()), "category", "category_id")
        per_item = (
            exploded.join(F.broadcast(category_index), "category", "left")
            .groupBy("item")
            .agg(F.array_sort(F.collect_set("category_id")).alias(S.CATEGORIES))
        )
    else:
        spark = cleaned.sparkSession
        category_index = spark.createDataFrame([], "category string, category_id int")
        per_item = spark.createDataFrame([], "item string, categories array<int>")
    item_features = item_index.join(per_item, item_index["raw_item"] == per_item["item"], "left").select(
        F.col("_i").alias(S.ITEM),
        F.coalesce(F.col(S.CATEGORIES), F.array().cast("array<int>")).alias(S.CATEGORIES),
    )

    # Users: each attribute indexed 1..k; 0 means unknown (user missing from the attribute table, or null).
    cardinalities: dict[str, int] = {}
    user_features = user_index.select(F.col("_u").alias(S.USER), F.col("raw_user"))
    if raw.users is not None:
        attrs = [c for c in raw.users.columns if c.startswith("attr_")]
        users_raw = raw.users.dropDuplicates(["user"])
        user_features = user_features.join(users_raw, user_features["raw_user"] == users_raw["user"], "left").drop(
            users_raw["user"]
        )
        for a in attrs:
            values = [r[0] for r in users_raw.select(F.col(a).cast("string")).distinct().dropna().orderBy(a).collect()]
            cardinalities[a] = len(values) + 1
            mapping = F.create_map(*[x for i, v in enumerate(values) for x in (F.lit(v), F.lit(i + 1))])
            expr = F.coalesce(mapping[F.col(a).cast("string")], F.lit(0)) if values else F.lit(0)
            user_features = user_features.withColumn(a, expr.cast("int"))
    user_features = user_features.drop("raw_user")
    return IndexedTables(
        interactions=interactions,
        item_features=item_features,
        user_features=user_features,
        user_index=user_index.select("raw_user", F.col("_u").alias(S.USER)),
        item_index=_with_titles(item_index, titles).select("raw_item", F.col("_i").alias(S.ITEM), S.TITLE),
        category_index=category_index,
        user_attribute_cardinalities=cardinalities,
    )


def _with_titles(item_index: DataFrame, titles: DataFrame | None) -> DataFrame:
    if titles is None:
        return item_index.withColumn(S.TITLE, F.lit(None).cast("string"))
    return item_index.join(titles, item_index["raw_item"] == titles["_t_item"], "left").drop("_t_item")


# ------------------------------------------------------------------------------------------------ splitting
def temporal_split(interactions: DataFrame, history_length: int, ranker_window: int = 0) -> DataFrame:
    """Leave-last-out per user, ordered by (timestamp, item): last → test, second to last → validation, rest →
    train; users with fewer than 3 interactions stay entirely in train.

    Every row carries the user's history *before* it: the last `history_length` items, most recent first,
    padded with PAD_ID, so no row can see its own or any later interaction; its `position` (1-based) in the
    user's order; and `ranker_window`: true for the user's last min(ranker_window, train rows - 1) train rows,
    the ranker's queries (data/phases.py: each has an earlier row, and a train row is left to fit on)."""
    if history_length < 1:
        raise DataValidationError(f"history_length must be >= 1, got {history_length}")
    if ranker_window < 0:
        raise DataValidationError(f"ranker_window must be >= 0, got {ranker_window}")
    order = Window.partitionBy(S.USER).orderBy(S.TIMESTAMP, S.ITEM)
    before = order.rowsBetween(-history_length, -1)
    by_user = Window.partitionBy(S.USER)
    history = F.reverse(F.collect_list(S.ITEM).over(before))
    df = (
        interactions.withColumn("_pos", F.row_number().over(order))
        .withColumn("_n", F.count(F.lit(1)).over(by_user))
        .withColumn("_hist", history)
    )
    held_out = F.when(F.col("_n") < MIN_INTERACTIONS_FOR_HOLDOUT, F.lit(0)).otherwise(F.lit(2))
    n_train = F.col("_n") - held_out
    split = (
        F.when(F.col("_pos") > n_train + 1, F.lit("test"))
        .when(F.col("_pos") > n_train, F.lit("validation"))
        .otherwise(F.lit("train"))
    )
    window_size = F.least(F.lit(ranker_window), F.greatest(n_train - 1, F.lit(0)))
    in_window = (F.col("_pos") <= n_train) & (F.col("_pos") > n_train - window_size)
    pad = F.array_repeat(F.lit(S.PAD_ID), F.lit(history_length) - F.size("_hist"))
    return df.select(
        F.col(S.USER).cast("int"),
        F.col(S.ITEM).cast("int"),
        F.col(S.TIMESTAMP).cast("bigint"),
        F.col(S.RATING).cast("float"),
        F.concat(F.col("_hist"), pad).cast("array<int>").alias(S.HISTORY),
        F.size("_hist").cast("int").alias(S.HISTORY_LEN),
        F.col("_pos").cast("int").alias(S.POSITION),
        in_window.alias(S.RANKER_WINDOW),
        split.alias(S.SPLIT),
    )


def require_holdout_users(interactions: DataFrame) -> int:
    """Number of users with at least 3 interactions; refuses a table where there are none."""
    n = interactions.groupBy(S.USER).count().filter(F.col("count") >= MIN_INTERACTIONS_FOR_HOLDOUT).count()
    if n == 0:
        raise DataValidationError(
            f"interactions: every user has fewer than {MIN_INTERACTIONS_FOR_HOLDOUT} interactions, so no "
            "validation or test split can be built (leave-last-out needs >= 3 per user)"
        )
    return n
