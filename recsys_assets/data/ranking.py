"""The ranker's data, in Spark: retrieval candidates + query states → labelled pairs with DLRM features.

Everything about a phase is computed from that phase's fit rows only (validation: train; test: train +
validation), and the query state is the user's history *before* the held-out row. The ranker trains on the
validation phase (candidates from the train-only Two Tower; label = the validation item), so no test-period
row reaches its training data; the test phase is only scored.

Dense features (``DENSE_FEATURES``, in this order; standardized with the training pairs' mean/std):
  retrieval_score_gap   the Two Tower score of (query, item) minus the query's best candidate score
  log_retrieval_rank    log1p(the item's rank in the query's full Two Tower ranking)
  (both comparable across the validation and test phases, whose scores come from two different fits; the
  raw score is kept as a column, not a feature)
  log_item_count        log1p(fit interactions of the item)
  log_item_recent_count log1p(fit interactions of the item in the latest `recent_fraction` of fit time)
  log_user_count        log1p(fit interactions of the user)
  last_item_transition  log1p(#fit rows whose previous item is the query's last item and whose item is this one)
  last_item_transition_share  that count / #fit rows whose previous item is the query's last item
  recent_cooccurrence   sum over the query's last `window` items h of log1p(#fit rows with item = this one and h
                        among their last `window` items)
  log_item_age_days     log1p(days from the item's first fit interaction to the query time)
  log_item_idle_days    log1p(days from the item's last fit interaction to the query time)
  log_user_idle_days    log1p(days from the user's last fit interaction to the query time)
  category_overlap      share of the item's categories found among the query history's categories
  item_item_score_gap   the EASE score of (query user, item) minus the user's best EASE score among candidates
  log_item_item_rank    log1p(the item's rank in the user's full EASE ranking)
  (the collaborative source of serving.item_item; both 0 when it is off)
Sequence order carries much of the signal in interaction logs: the transition / co-occurrence features are
the recency-aware history features; the history bag itself is a sparse DLRM feature.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recsys_assets.data import schema as S
from recsys_assets.data.blocks import DEFAULT_BLOCK_ROWS, BlockLayout, read_layout
from recsys_assets.data.errors import DataValidationError
from recsys_assets.data.mds import write_blocks_with_spark

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

DENSE_FEATURES = (
    "retrieval_score_gap",
    "log_retrieval_rank",
    "log_item_count",
    "log_item_recent_count",
    "log_user_count",
    "last_item_transition",
    "last_item_transition_share",
    "recent_cooccurrence",
    "log_item_age_days",
    "log_item_idle_days",
    "log_user_idle_days",
    "category_overlap",
    "item_item_score_gap",
    "log_item_item_rank",
)
LABEL, DENSE, QUERY_ID = S.LABEL, S.DENSE, S.QUERY_ID
RETRIEVAL_SCORE = "retrieval_score"
RETRIEVAL_RANK = "retrieval_rank"
ITEM_ITEM_SCORE = "item_item_score"
ITEM_ITEM_RANK = "item_item_rank"
POOL_RANK = "pool_rank"  # the candidate's position in the retrieval order (the merged pool); k beyond it
SOURCE = "source"  # retrieved | target | random
PHASE = "phase"
QUERY_TIMESTAMP = "query_timestamp"

QUERY_COLUMNS = {PHASE: "string", S.USER: "int", "target": "int", S.TIMESTAMP: "bigint", S.HISTORY: "array<int>"}
PAIR_COLUMNS = {
    PHASE: "string",
    S.USER: "int",
    S.ITEM: "int",
    RETRIEVAL_SCORE: "float",
    RETRIEVAL_RANK: "int",
    ITEM_ITEM_SCORE: "float",
    ITEM_ITEM_RANK: "int",
    POOL_RANK: "int",
    SOURCE: "string",
}
SECONDS_PER_DAY = 86400.0
# Holdout users are drawn by hashing the user id into this many buckets (holdout_fraction of them).
HOLDOUT_HASH_BUCKETS = 10_000
# The pair tables of a ranking dataset folder: train (→ mds/train), holdout and test (Parquet, for scoring).
PAIR_TABLES = ("train", "holdout", "test")


def _require(df: DataFrame, columns: dict[str, str], what: str) -> None:
    have = dict(df.dtypes)
    missing = [c for c in columns if c not in have]
    if missing:
        raise DataValidationError(f"{what} lacks columns {missing} (has {sorted(have)})")


def phase_features(
    splits: DataFrame,
    queries: DataFrame,
    pairs: DataFrame,
    item_features: DataFrame,
    phase: str,
    *,
    window: int = 5,
    recent_fraction: float = 0.1,
) -> DataFrame:
    """Labelled pairs of one phase with every raw (unstandardized) dense feature as its own column.

    splits: the splits table; queries: QUERY_COLUMNS (one row per (phase, user)); pairs: PAIR_COLUMNS;
    item_features: item, categories. Output columns: phase, user, item, label, query_timestamp, source,
    retrieval_rank, pool_rank, categories, history + DENSE_FEATURES.
    """
    from pyspark.sql import functions as F

    if phase not in S.FIT_SPLITS_OF_PHASE:
        raise ValueError(f"unknown phase {phase!r}")
    _require(queries, QUERY_COLUMNS, "queries")
    _require(pairs, PAIR_COLUMNS, "candidate pairs")
    fit = splits.filter(F.col(S.SPLIT).isin(list(S.FIT_SPLITS_OF_PHASE[phase])))

    item_stats = fit.groupBy(S.ITEM).agg(
        F.count(F.lit(1)).alias("_n_item"), F.min(S.TIMESTAMP).alias("_first_ts"), F.max(S.TIMESTAMP).alias("_last_ts")
    )
    cutoff = fit.approxQuantile(S.TIMESTAMP, [1.0 - recent_fraction], 0.001)
    cutoff_ts = cutoff[0] if cutoff else 0
    recent = (
        fit.filter(F.col(S.TIMESTAMP) >= F.lit(cutoff_ts)).groupBy(S.ITEM).agg(F.count(F.lit(1)).alias("_n_recent"))
    )
    user_stats = fit.groupBy(S.USER).agg(F.count(F.lit(1)).alias("_n_user"), F.max(S.TIMESTAMP).alias("_user_last_ts"))
    prev = fit.select(F.col(S.HISTORY).getItem(0).alias("_prev"), F.col(S.ITEM)).filter(F.col("_prev") >= 0)
    transitions = prev.groupBy("_prev", S.ITEM).agg(F.count(F.lit(1)).alias("_n_trans"))
    prev_totals = prev.groupBy("_prev").agg(F.count(F.lit(1)).alias("_n_prev"))
    follow = (
        fit.select(F.explode(F.slice(S.HISTORY, 1, window)).alias("_h"), F.col(S.ITEM))
        .filter(F.col("_h") >= 0)
        .groupBy("_h", S.ITEM)
        .agg(F.count(F.lit(1)).alias("_n_follow"))
    )

    q = queries.filter(F.col(PHASE) == phase).select(
        S.USER, "target", F.col(S.TIMESTAMP).alias(QUERY_TIMESTAMP), S.HISTORY
    )
    p = (
        pairs.filter(F.col(PHASE) == phase)
        .select(S.USER, S.ITEM, RETRIEVAL_SCORE, RETRIEVAL_RANK, ITEM_ITEM_SCORE, ITEM_ITEM_RANK, POOL_RANK, SOURCE)
        .join(q, S.USER, "inner")
        .withColumn("_prev", F.col(S.HISTORY).getItem(0))
    )
    # recent co-occurrence: explode the query's last `window` items against each candidate
    cooc = (
        p.select(S.USER, S.ITEM, F.explode(F.slice(S.HISTORY, 1, window)).alias("_h"))
        .filter(F.col("_h") >= 0)
        .join(follow, ["_h", S.ITEM], "inner")
        .groupBy(S.USER, S.ITEM)
        .agg(F.sum(F.log1p("_n_follow")).alias("recent_cooccurrence"))
    )
    cats = item_features.select(S.ITEM, F.coalesce(S.CATEGORIES, F.array().cast("array<int>")).alias("_cats"))
    hist_cats = (
        q.select(S.USER, F.explode(S.HISTORY).alias(S.ITEM))
        .filter(F.col(S.ITEM) >= 0)
        .join(cats, S.ITEM)
        .select(S.USER, F.explode("_cats").alias("_c"))
        .groupBy(S.USER)
        .agg(F.collect_set("_c").alias("_hist_cats"))
    )
    best = (
        p.filter(F.col(SOURCE) == "retrieved")
        .groupBy(S.USER)
        .agg(F.max(RETRIEVAL_SCORE).alias("_best_score"), F.max(ITEM_ITEM_SCORE).alias("_best_ii"))
    )
    days = lambda a, b: F.log1p(F.greatest(F.col(a) - F.col(b), F.lit(0)).cast("double") / SECONDS_PER_DAY)  # noqa: E731
    out = (
        p.join(item_stats, S.ITEM, "left")
        .join(recent, S.ITEM, "left")
        .join(user_stats, S.USER, "left")
        .join(transitions, ["_prev", S.ITEM], "left")
        .join(prev_totals, "_prev", "left")
        .join(cooc, [S.USER, S.ITEM], "left")
        .join(cats, S.ITEM, "left")
        .join(hist_cats, S.USER, "left")
        .join(best, S.USER, "left")
        .select(
            F.lit(phase).alias(PHASE),
            F.col(S.USER).cast("int"),
            F.col(S.ITEM).cast("int"),
            (F.col(S.ITEM) == F.col("target")).cast("float").alias(LABEL),
            F.col(QUERY_TIMESTAMP),
            F.col(SOURCE),
            F.col(RETRIEVAL_RANK).cast("int"),
            F.col(POOL_RANK).cast("int"),
            F.coalesce("_cats", F.array().cast("array<int>")).alias(S.CATEGORIES),
            F.col(S.HISTORY),
            F.col(RETRIEVAL_SCORE).cast("double").alias(RETRIEVAL_SCORE),
            (F.col(RETRIEVAL_SCORE) - F.coalesce("_best_score", F.col(RETRIEVAL_SCORE)))
            .cast("double")
            .alias("retrieval_score_gap"),
            F.log1p(F.greatest(F.col(RETRIEVAL_RANK), F.lit(0)).cast("double")).alias("log_retrieval_rank"),
            F.log1p(F.coalesce("_n_item", F.lit(0))).alias("log_item_count"),
            F.log1p(F.coalesce("_n_recent", F.lit(0))).alias("log_item_recent_count"),
            F.log1p(F.coalesce("_n_user", F.lit(0))).alias("log_user_count"),
            F.log1p(F.coalesce("_n_trans", F.lit(0))).alias("last_item_transition"),
            (F.coalesce("_n_trans", F.lit(0)) / F.greatest(F.coalesce("_n_prev", F.lit(0)), F.lit(1))).alias(
                "last_item_transition_share"
            ),
            F.coalesce("recent_cooccurrence", F.lit(0.0)).alias("recent_cooccurrence"),
            F.coalesce(days(QUERY_TIMESTAMP, "_first_ts"), F.lit(0.0)).alias("log_item_age_days"),
            F.coalesce(days(QUERY_TIMESTAMP, "_last_ts"), F.lit(0.0)).alias("log_item_idle_days"),
            F.coalesce(days(QUERY_TIMESTAMP, "_user_last_ts"), F.lit(0.0)).alias("log_user_idle_days"),
            F.coalesce(
                F.size(F.array_intersect("_cats", F.coalesce("_hist_cats", F.array().cast("array<int>"))))
                / F.greatest(F.size(F.coalesce("_cats", F.array().cast("array<int>"))), F.lit(1)),
                F.lit(0.0),
            )
            .cast("double")
            .alias("category_overlap"),
            (F.col(ITEM_ITEM_SCORE) - F.coalesce("_best_ii", F.col(ITEM_ITEM_SCORE)))
            .cast("double")
            .alias("item_item_score_gap"),
            F.log1p(F.greatest(F.col(ITEM_ITEM_RANK), F.lit(0)).cast("double")).alias("log_item_item_rank"),
        )
    )
    return out


def feature_stats(pairs: DataFrame) -> dict[str, tuple[float, float]]:
    """(mean, std) of each dense feature over `pairs` (std 1 where it is 0 or undefined)."""
    from pyspark.sql import functions as F

    row = pairs.agg(
        *[F.mean(c).alias(f"m_{c}") for c in DENSE_FEATURES], *[F.stddev_pop(c).alias(f"s_{c}") for c in DENSE_FEATURES]
    ).collect()[0]
    stats = {}
    for c in DENSE_FEATURES:
        m, s = row[f"m_{c}"], row[f"s_{c}"]
        stats[c] = (float(m or 0.0), float(s) if s and s > 1e-12 else 1.0)
    return stats


def model_columns(
    pairs: DataFrame,
    stats: dict[str, tuple[float, float]],
    *,
    user_features: DataFrame | None,
    attribute_columns: Sequence[str],
    history_length: int,
    max_categories: int,
) -> DataFrame:
    """The columns the DLRM reads: label, dense (standardized, array<float>), user, item, history (fixed
    length, -1 padded), categories (fixed `max_categories`, -1 padded), attr_* (0 = unknown), query_id, plus
    the bookkeeping columns (phase, source, retrieval_rank, pool_rank, raw retrieval_score, query_timestamp)."""
    from pyspark.sql import functions as F

    def pad(col: str, n: int):
        c = F.slice(F.coalesce(F.col(col), F.array().cast("array<int>")), 1, n)
        return F.concat(c, F.array_repeat(F.lit(S.PAD_ID), F.lit(n) - F.size(c))).cast("array<int>")

    dense = F.array(*[((F.col(c) - F.lit(stats[c][0])) / F.lit(stats[c][1])).cast("float") for c in DENSE_FEATURES])
    df = pairs
    if attribute_columns:
        df = df.join(user_features.select(S.USER, *attribute_columns), S.USER, "left")
    return df.select(
        F.col(LABEL).cast("float"),
        dense.alias(DENSE),
        F.col(S.USER).cast("int"),
        F.col(S.ITEM).cast("int"),
        pad(S.HISTORY, history_length).alias(S.HISTORY),
        pad(S.CATEGORIES, max(1, max_categories)).alias(S.CATEGORIES),
        *[F.coalesce(F.col(a), F.lit(0)).cast("int").alias(a) for a in attribute_columns],
        F.col(S.USER).cast("long").alias(QUERY_ID),
        F.col(PHASE),
        F.col(SOURCE),
        F.col(RETRIEVAL_RANK).cast("int"),
        F.col(POOL_RANK).cast("int"),
        F.col(RETRIEVAL_SCORE).cast("float").alias(RETRIEVAL_SCORE),
        F.col(QUERY_TIMESTAMP).cast("long"),
    )


def pairs_layout(
    attribute_columns: Sequence[str], *, history_length: int, max_categories: int, block_rows: int = DEFAULT_BLOCK_ROWS
) -> BlockLayout:
    """The MDS block layout of the ranker's training pairs (`model_columns`' model columns)."""
    spec = {
        LABEL: ("float32", 0),
        DENSE: ("float32", len(DENSE_FEATURES)),
        S.USER: ("int32", 0),
        S.ITEM: ("int32", 0),
        S.HISTORY: ("int32", history_length),
        S.CATEGORIES: ("int32", max(1, max_categories)),
        **{a: ("int32", 0) for a in attribute_columns},
        QUERY_ID: ("int64", 0),
    }
    return BlockLayout.of(spec, block_rows)


def sample_training_pairs(pairs: DataFrame, num_hard_negatives: int, seed: int) -> DataFrame:
    """Keep every positive and every random negative, and `num_hard_negatives` of each query's retrieved
    non-positive candidates (uniformly, seeded): hard negatives = what retrieval proposed and the user did not
    pick."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    hard_negative = (F.col(SOURCE) == "retrieved") & (F.col(LABEL) < 0.5)
    w = Window.partitionBy(S.USER, "_hard").orderBy(F.rand(seed))
    ranked = pairs.withColumn("_hard", hard_negative).withColumn("_r", F.row_number().over(w))
    return ranked.filter(~F.col("_hard") | (F.col("_r") <= num_hard_negatives)).drop("_r", "_hard")


@dataclasses.dataclass(frozen=True)
class RankingDataSettings:
    """How `build_ranking_dataset` samples and splits the ranker's pairs (defaults and descriptions: the
    ranking_dataset asset's config)."""

    num_hard_negatives: int
    holdout_fraction: float
    cooccurrence_window: int
    recent_fraction: float
    seed: int
    mds_partitions: int


def build_ranking_dataset(
    session,
    dataset_root: str | Path,
    candidates_root: str | Path,
    out_dir: Path,
    settings: RankingDataSettings,
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ranker's labelled pairs from a dataset folder and a candidates folder (queries, candidates,
    training_pool Parquet) into `out_dir`: train.parquet + mds/train (validation phase, holdout users left out,
    hard negatives sampled), holdout.parquet (the holdout users' retrieved lists), test.parquet (test-phase
    candidates, features from train + validation) and meta.json (returned; `provenance` is added to it)."""
    from pyspark.sql import functions as F

    paths = S.DatasetPaths(Path(dataset_root))
    meta = S.DatasetMeta.load(paths.meta)
    attributes = S.attribute_columns(meta.user_attribute_cardinalities)
    attribute_keys = [col for col, _ in attributes]
    cand_dir = Path(candidates_root)
    splits = session.read.parquet(str(paths.splits))
    queries = session.read.parquet(str(cand_dir / "queries.parquet"))
    pairs = session.read.parquet(str(cand_dir / "candidates.parquet")).unionByName(
        session.read.parquet(str(cand_dir / "training_pool.parquet"))
    )
    item_features = session.read.parquet(str(paths.item_features))
    max_categories = int(item_features.select(F.max(F.size(S.CATEGORIES))).collect()[0][0] or 0)
    kw = dict(window=settings.cooccurrence_window, recent_fraction=settings.recent_fraction)
    validation = phase_features(splits, queries, pairs, item_features, "validation", **kw)
    test = phase_features(splits, queries, pairs, item_features, "test", **kw).filter(F.col(SOURCE) == "retrieved")
    bucket = F.abs(F.xxhash64(F.col(S.USER), F.lit(settings.seed))) % HOLDOUT_HASH_BUCKETS
    holdout = bucket < int(settings.holdout_fraction * HOLDOUT_HASH_BUCKETS)
    raw = out_dir / "_raw"
    # materialize the sampled training pairs once: the seeded shuffle must not be recomputed per read
    sample_training_pairs(validation.filter(~holdout), settings.num_hard_negatives, settings.seed).write.parquet(
        str(raw / "train")
    )
    validation.filter(holdout & (F.col(SOURCE) == "retrieved")).write.parquet(str(raw / "holdout"))
    test.write.parquet(str(raw / "test"))
    train_raw = session.read.parquet(str(raw / "train"))
    if train_raw.filter(F.col(LABEL) > 0.5).count() == 0:
        raise DataValidationError(
            "ranking_dataset: no positive training pairs (no validation rows outside the holdout?)"
        )
    stats = feature_stats(train_raw)
    counts, positives = _write_model_tables(
        session,
        raw,
        out_dir,
        stats,
        user_features=session.read.parquet(str(paths.user_features)),
        attribute_columns=attribute_keys,
        history_length=meta.history_length,
        max_categories=max_categories,
    )
    layout = pairs_layout(attribute_keys, history_length=meta.history_length, max_categories=max_categories)
    write_blocks_with_spark(
        session.read.parquet(str(out_dir / "train.parquet")),
        layout,
        out_dir / "mds" / "train",
        rows=counts["train"],
        partitions=settings.mds_partitions,
        seed=settings.seed,
    )
    shutil.rmtree(raw)
    info = {
        "dense_features": list(DENSE_FEATURES),
        "feature_stats": stats,
        "attribute_columns": attribute_keys,
        "attribute_cardinalities": dict(attributes),
        "num_users": meta.num_users,
        "num_items": meta.num_items,
        "num_categories": meta.num_categories,
        "history_length": meta.history_length,
        "max_categories": max(1, max_categories),
        "mds_layout": read_layout(out_dir / "mds" / "train").to_dict(),
        "rows": counts,
        "positives": positives,
        **(provenance or {}),
        "config": dataclasses.asdict(settings),
    }
    (out_dir / "meta.json").write_text(json.dumps(info, indent=2))
    return info


def _write_model_tables(session, raw: Path, out_dir: Path, stats, **columns) -> tuple[dict[str, int], dict[str, int]]:
    """`<name>.parquet` (model_columns) of each raw pair table; (rows, positives) per table."""
    from pyspark.sql import functions as F

    counts, positives = {}, {}
    for name in PAIR_TABLES:
        model_columns(session.read.parquet(str(raw / name)), stats, **columns).write.parquet(
            str(out_dir / f"{name}.parquet")
        )
        row = session.read.parquet(str(out_dir / f"{name}.parquet")).agg(F.count(F.lit(1)), F.sum(LABEL)).first()
        counts[name], positives[name] = int(row[0]), int(float(row[1] or 0.0))
    return counts, positives


def sparse_layout(
    info: dict[str, Any],
    *,
    use_user_id: bool,
    use_item_id: bool,
    use_history: bool,
    use_categories: bool,
    use_user_attributes: bool,
) -> list[dict]:
    """The DLRM's sparse features over a ranking dataset's columns (`info`: its meta.json; item and history
    share the item table)."""
    layout = []
    if use_user_id:
        layout.append(dict(name=S.USER, table="user", num_embeddings=int(info["num_users"])))
    if use_item_id:
        layout.append(dict(name=S.ITEM, table="item", num_embeddings=int(info["num_items"])))
    if use_history:
        layout.append(dict(name=S.HISTORY, table="item", num_embeddings=int(info["num_items"]), multi_valued=True))
    if use_categories and int(info["num_categories"]) > 0:
        layout.append(
            dict(name=S.CATEGORIES, table="category", num_embeddings=int(info["num_categories"]), multi_valued=True)
        )
    if use_user_attributes:
        for col in info["attribute_columns"]:
            layout.append(dict(name=col, table=col, num_embeddings=int(info["attribute_cardinalities"][col])))
    if not layout:
        # a DLRM needs one sparse feature: the item id is the one every dataset has
        layout.append(dict(name=S.ITEM, table="item", num_embeddings=int(info["num_items"])))
    return layout
