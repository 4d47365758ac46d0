"""The ranker's data, in Spark: retrieval candidates + query states → labelled pairs with DLRM features.

Every phase (data/phases.py) is built the same way, from its own fit rows only: a `FeatureState` of the fit
rows (`feature_state`), then each candidate pair's features from it (`spark_features`: the registry of
data/ranker_features.py, run by Spark on whole queries per task). A query's history holds only the rows before
it. The ranker trains on the ranker window's lists (many per user; candidates from the Two Tower and EASE fitted
on the train rows before the window), its epochs and gate are chosen on every user's validation lists, and the
test lists are served. Without a window (`ranker_window` 0) it trains on the validation lists of all users but a
hashed `holdout_fraction`, whose lists choose instead. No test-period row reaches its training or holdout pairs.

The feature states are kept in the dataset folder (features/<phase>.npz): an online scorer computes the same
features from them (`ranker_features.compute_features`), and the leakage check reads each user's last fitted
position from them.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from recsys_assets.data import schema as S
from recsys_assets.data.blocks import DEFAULT_BLOCK_ROWS, BlockLayout, read_layout
from recsys_assets.data.errors import DataValidationError
from recsys_assets.data.mds import write_blocks_with_spark
from recsys_assets.data.phases import PHASES
from recsys_assets.data.ranker_features import (
    ALS_RANK,
    ALS_SCORE,
    BEST_SCORE_COLUMNS,
    DENSE_FEATURES,
    ITEM_ITEM_RANK,
    ITEM_ITEM_SCORE,
    PAIR_INPUTS,
    QUERY_TIMESTAMP,
    RETRIEVAL_RANK,
    RETRIEVAL_SCORE,
    RETRIEVED,
    SOURCE,
    FeatureState,
    SparseCounts,
    compute_features,
)

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

LABEL, DENSE, QUERY_ID = S.LABEL, S.DENSE, S.QUERY_ID
POOL_RANK = "pool_rank"  # the candidate's position in the retrieval order (the merged pool); k beyond it
PHASE = "phase"
QUERY_POSITION = "query_position"  # a pair's query row: its place in the user's order

QUERY_COLUMNS = {
    PHASE: "string",
    QUERY_ID: "bigint",
    S.USER: "int",
    "target": "int",
    S.TIMESTAMP: "bigint",
    S.HISTORY: "array<int>",
    S.POSITION: "int",
}
PAIR_COLUMNS = {
    PHASE: "string",
    QUERY_ID: "bigint",
    S.USER: "int",
    S.ITEM: "int",
    RETRIEVAL_SCORE: "float",
    RETRIEVAL_RANK: "int",
    ITEM_ITEM_SCORE: "float",
    ITEM_ITEM_RANK: "int",
    ALS_SCORE: "float",
    ALS_RANK: "int",
    POOL_RANK: "int",
    SOURCE: "string",
}
# Without a ranker window, holdout users are drawn by hashing the user id into this many buckets.
HOLDOUT_HASH_BUCKETS = 10_000
# The pair tables of a ranking dataset folder: train (→ mds/train), holdout and test (Parquet, for scoring).
PAIR_TABLES = ("train", "holdout", "test")
# in a ranking dataset folder: features/<phase>.npz, each phase's FeatureState
FEATURES_FOLDER = "features"
# rows of candidate pairs per Spark task of the feature computation (whole queries per task)
PAIRS_PER_TASK = 50_000


def _require(df: DataFrame, columns: dict[str, str], what: str) -> None:
    have = dict(df.dtypes)
    missing = [c for c in columns if c not in have]
    if missing:
        raise DataValidationError(f"{what} lacks columns {missing} (has {sorted(have)})")


def feature_state(
    splits: DataFrame,
    item_features: DataFrame,
    phase: str,
    *,
    num_users: int,
    num_items: int,
    window: int = 5,
    recent_fraction: float = 0.1,
) -> FeatureState:
    """What the features know of `phase`'s fit rows (data/phases.py), aggregated in Spark, as numpy arrays."""
    from pyspark.sql import functions as F

    fit = splits.filter(PHASES[phase].fit.column())
    one = F.count(F.lit(1))
    items = fit.groupBy(S.ITEM).agg(one.alias("n"), F.min(S.TIMESTAMP).alias("first"), F.max(S.TIMESTAMP).alias("last"))
    cutoff = fit.approxQuantile(S.TIMESTAMP, [1.0 - recent_fraction], 0.001)
    cutoff_ts = int(cutoff[0]) if cutoff else 0
    recent = fit.filter(F.col(S.TIMESTAMP) >= F.lit(cutoff_ts)).groupBy(S.ITEM).agg(one.alias("n"))
    users = fit.groupBy(S.USER).agg(
        one.alias("n"), F.max(S.TIMESTAMP).alias("last"), F.max(S.POSITION).alias("position")
    )
    prev = fit.select(F.col(S.HISTORY).getItem(0).alias("a"), F.col(S.ITEM).alias("b")).filter(F.col("a") >= 0)
    follow = fit.select(F.explode(F.slice(S.HISTORY, 1, window)).alias("a"), F.col(S.ITEM).alias("b"))
    pairs = lambda df: df.filter(F.col("a") >= 0).groupBy("a", "b").agg(one.alias("n")).toPandas()  # noqa: E731
    it, rc, us = items.toPandas(), recent.toPandas(), users.toPandas()
    totals = prev.groupBy("a").agg(one.alias("n")).toPandas()
    cats = item_features.select(S.ITEM, S.CATEGORIES).toPandas()
    indptr, indices = _categories_csr(cats, num_items)
    by_item = lambda frame, col, fill=0: _dense(frame, S.ITEM, col, num_items, fill)  # noqa: E731
    by_user = lambda frame, col: _dense(frame, S.USER, col, num_users, 0)  # noqa: E731
    counts = lambda frame: SparseCounts.of(frame["a"], frame["b"], frame["n"], num_items)  # noqa: E731
    return FeatureState(
        phase=phase,
        item_count=by_item(it, "n"),
        item_recent_count=by_item(rc, "n"),
        item_first_ts=by_item(it, "first"),
        item_last_ts=by_item(it, "last"),
        user_count=by_user(us, "n"),
        user_last_ts=by_user(us, "last"),
        user_last_position=by_user(us, "position"),
        transitions=counts(pairs(prev)),
        previous_totals=_dense(totals, "a", "n", num_items, 0),
        follows=counts(pairs(follow)),
        category_indptr=indptr,
        category_indices=indices,
        window=window,
        recent_cutoff=cutoff_ts,
    )


def _dense(frame, key: str, column: str, size: int, fill: int) -> np.ndarray:
    out = np.full(size, fill, dtype=np.int64)
    out[frame[key].to_numpy(np.int64)] = frame[column].to_numpy(np.int64)
    return out


def _categories_csr(cats, num_items: int) -> tuple[np.ndarray, np.ndarray]:
    lists = [np.zeros(0, np.int64)] * num_items
    for item, c in zip(cats[S.ITEM].to_numpy(np.int64), cats[S.CATEGORIES]):
        lists[item] = np.asarray(c if c is not None else [], np.int64)
    indptr = np.zeros(num_items + 1, dtype=np.int64)
    np.cumsum([len(c) for c in lists], out=indptr[1:])
    return indptr, np.concatenate(lists) if lists else np.zeros(0, np.int64)


def spark_features(session, pairs: DataFrame, state: FeatureState) -> DataFrame:
    """`pairs` (PAIR_INPUTS and other columns) with one double column per DENSE_FEATURES, computed by
    `compute_features` on whole queries: Spark groups the pairs by a hash of their query id into tasks of about
    PAIRS_PER_TASK rows, and each task runs the registry's numpy code over its queries."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    missing = [c for c in PAIR_INPUTS if c not in pairs.columns]
    if missing:
        raise DataValidationError(f"feature inputs lack columns {missing} (have {sorted(pairs.columns)})")
    broadcast = session.sparkContext.broadcast(state)
    tasks = max(1, -(-pairs.count() // PAIRS_PER_TASK))
    schema = T.StructType([*pairs.schema.fields, *[T.StructField(f, T.DoubleType()) for f in DENSE_FEATURES]])
    names = schema.fieldNames()

    def features(frame):
        return compute_features(broadcast.value, frame)[names]

    task = F.abs(F.xxhash64(F.col(QUERY_ID))) % F.lit(tasks)
    return pairs.groupBy(task).applyInPandas(features, schema)


def phase_labelled_pairs(
    splits: DataFrame,
    queries: DataFrame,
    pairs: DataFrame,
    item_features: DataFrame,
    phase: str,
    **state_settings: Any,
) -> tuple[DataFrame, FeatureState]:
    """One phase's labelled pairs before their features (PAIR_COLUMNS, the query's target, time, history and
    position, LABEL) with each query's best retrieved score under every source over its whole pool
    (ranker_features.BEST_SCORE_COLUMNS): the features of any subset of a query's pairs, a sample of its
    negatives, are then those the whole list gives. And the phase's FeatureState (`state_settings`:
    `feature_state`'s keywords). queries: QUERY_COLUMNS; pairs: PAIR_COLUMNS; item_features: item, categories."""
    from pyspark.sql import functions as F

    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}")
    _require(queries, QUERY_COLUMNS, "queries")
    _require(pairs, PAIR_COLUMNS, "candidate pairs")
    state = feature_state(splits, item_features, phase, **state_settings)
    q = queries.filter(F.col(PHASE) == phase).select(
        QUERY_ID,
        "target",
        F.col(S.TIMESTAMP).alias(QUERY_TIMESTAMP),
        S.HISTORY,
        F.col(S.POSITION).alias(QUERY_POSITION),
    )
    p = pairs.filter(F.col(PHASE) == phase).select(*PAIR_COLUMNS).join(q, QUERY_ID, "inner")
    retrieved = F.col(SOURCE) == RETRIEVED
    # NaN is no score (pandas' max skips it, Spark's would return it)
    best = p.groupBy(QUERY_ID).agg(
        *[F.max(F.when(retrieved & ~F.isnan(c), F.col(c))).alias(b) for c, b in BEST_SCORE_COLUMNS.items()]
    )
    labelled = p.join(best, QUERY_ID, "left").withColumn(LABEL, (F.col(S.ITEM) == F.col("target")).cast("float"))
    return labelled, state


def with_features(session, candidates: DataFrame, state: FeatureState, item_features: DataFrame, phase: str):
    """`phase_labelled_pairs`' pairs (or a subset of them) with every raw (unstandardized) dense feature as its own
    column. Columns: phase, query_id, user, item, label, query_timestamp, query_position, source, retrieval_rank,
    pool_rank, categories, history, retrieval_score + DENSE_FEATURES."""
    from pyspark.sql import functions as F

    cats = item_features.select(S.ITEM, F.coalesce(S.CATEGORIES, F.array().cast("array<int>")).alias(S.CATEGORIES))
    return (
        spark_features(session, candidates, state)
        .join(cats, S.ITEM, "left")
        .select(
            F.lit(phase).alias(PHASE),
            F.col(QUERY_ID).cast("long"),
            F.col(S.USER).cast("int"),
            F.col(S.ITEM).cast("int"),
            F.col(LABEL).cast("float"),
            F.col(QUERY_TIMESTAMP),
            F.col(QUERY_POSITION).cast("int"),
            F.col(SOURCE),
            F.col(RETRIEVAL_RANK).cast("int"),
            F.col(POOL_RANK).cast("int"),
            F.coalesce(S.CATEGORIES, F.array().cast("array<int>")).alias(S.CATEGORIES),
            F.col(S.HISTORY),
            F.col(RETRIEVAL_SCORE).cast("double").alias(RETRIEVAL_SCORE),
            *[F.col(f) for f in DENSE_FEATURES],
        )
    )


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
    the bookkeeping columns (phase, source, retrieval_rank, pool_rank, raw retrieval_score, query_timestamp,
    query_position)."""
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
        F.col(QUERY_ID).cast("long"),
        F.col(PHASE),
        F.col(SOURCE),
        F.col(RETRIEVAL_RANK).cast("int"),
        F.col(POOL_RANK).cast("int"),
        F.col(RETRIEVAL_SCORE).cast("float").alias(RETRIEVAL_SCORE),
        F.col(QUERY_TIMESTAMP).cast("long"),
        F.col(QUERY_POSITION).cast("int"),
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
    non-positive candidates (uniformly, seeded by a hash of the pair: the same sample whatever the partitioning):
    hard negatives = what retrieval proposed and the user did not pick."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    hard_negative = (F.col(SOURCE) == "retrieved") & (F.col(LABEL) < 0.5)
    w = Window.partitionBy(QUERY_ID, "_hard").orderBy(F.xxhash64(QUERY_ID, S.ITEM, F.lit(seed)), S.ITEM)
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
    drop_later_train_items: bool = True
    window_lists_with_a_hit: bool = True


def build_ranking_dataset(
    session,
    dataset_root: str | Path,
    candidates_root: str | Path,
    out_dir: Path,
    settings: RankingDataSettings,
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ranker's labelled pairs from a dataset folder and a candidates folder (queries, candidates,
    training_pool Parquet) into `out_dir`: train.parquet + mds/train (the training lists, hard negatives
    sampled), holdout.parquet (the lists that choose epochs, stage and gate), test.parquet (the test lists),
    features/<phase>.npz and meta.json (returned; `provenance` is added to it). See the module docstring for
    which phase each table comes from."""
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
    present = {r[PHASE] for r in queries.select(PHASE).distinct().collect()}
    kw = dict(
        num_users=meta.num_users,
        num_items=meta.num_items,
        window=settings.cooccurrence_window,
        recent_fraction=settings.recent_fraction,
    )
    (out_dir / FEATURES_FOLDER).mkdir(parents=True, exist_ok=True)
    raw = out_dir / "_raw"
    phase_tables, states = {}, {}
    for phase in [p for p in PHASES if p in present]:
        phase_tables[phase], states[phase] = phase_labelled_pairs(splits, queries, pairs, item_features, phase, **kw)
        states[phase].save(out_dir / FEATURES_FOLDER / f"{phase}.npz")
    lists = ranker_lists(phase_tables, settings, splits)
    # The training sample is drawn before the features, so the Python feature UDF runs on the pairs kept (a quarter
    # of the window's candidates), not on every one; written once, as the UDF reads its input twice (count, rows).
    sample = sample_training_pairs(lists["train"], settings.num_hard_negatives, settings.seed)
    sample.write.parquet(str(raw / "train_candidates"))
    lists["train"] = session.read.parquet(str(raw / "train_candidates"))
    for name, phase in zip(PAIR_TABLES, _table_phases(present)):
        with_features(session, lists[name], states[phase], item_features, phase).write.parquet(str(raw / name))
    train_raw = session.read.parquet(str(raw / "train"))
    if train_raw.filter(F.col(LABEL) > 0.5).count() == 0:
        raise DataValidationError("ranking_dataset: no positive training pairs (no ranker queries with a target?)")
    stats = feature_stats(train_raw)
    counts = _write_model_tables(
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
        rows=counts["rows"]["train"],
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
        "phases": {name: phase for name, phase in zip(PAIR_TABLES, _table_phases(present))},
        **counts,
        **(provenance or {}),
        "config": dataclasses.asdict(settings),
    }
    (out_dir / "meta.json").write_text(json.dumps(info, indent=2))
    return info


def _table_phases(present: set[str]) -> tuple[str, str, str]:
    """The phase of the train, holdout and test tables: the ranker window trains when there is one."""
    return ("ranker" if "ranker" in present else "validation", "validation", "test")


def hashed_holdout_users(fraction: float, seed: int):
    """A Spark column: whether the row's user is among the hashed `fraction` of users held out without a window."""
    from pyspark.sql import functions as F

    bucket = F.abs(F.xxhash64(F.col(S.USER), F.lit(seed))) % HOLDOUT_HASH_BUCKETS
    return bucket < int(fraction * HOLDOUT_HASH_BUCKETS)


def ranker_lists(
    phase_tables: dict[str, DataFrame], settings: RankingDataSettings, splits: DataFrame
) -> dict[str, DataFrame]:
    """The pairs of the train / holdout / test tables. With a ranker window: the window's pairs train, every
    user's validation lists are the holdout. Without: the validation pairs of all users but a hashed
    `holdout_fraction` train, and those users' validation lists are the holdout. Holdout and test keep the
    retrieved pool only (the lists as served). With `drop_later_train_items`, a training list loses the
    negatives that are the user's own later train rows (`without_later_train_items`); with a window and
    `window_lists_with_a_hit`, only the lists whose positive retrieval found train
    (`lists_with_a_retrieved_positive`)."""
    from pyspark.sql import functions as F

    train_phase, holdout_phase, test_phase = _table_phases(set(phase_tables))
    retrieved = F.col(SOURCE) == "retrieved"
    holdout_users = F.lit(True)
    if train_phase == holdout_phase:  # one list per user: a hashed share of users is held out
        holdout_users = hashed_holdout_users(settings.holdout_fraction, settings.seed)
    train = phase_tables[train_phase]
    if settings.drop_later_train_items:
        train = without_later_train_items(train, splits)
    if train_phase != holdout_phase and settings.window_lists_with_a_hit:
        train = lists_with_a_retrieved_positive(train)
    return {
        "train": train.filter(~holdout_users) if train_phase == holdout_phase else train,
        "holdout": phase_tables[holdout_phase].filter(holdout_users & retrieved),
        "test": phase_tables[test_phase].filter(retrieved),
    }


def lists_with_a_retrieved_positive(pairs: DataFrame) -> DataFrame:
    """The lists whose positive retrieval found, without the pairs that retrieval did not propose as targets:
    the ranker only ever reorders the pool. A positive appended where retrieval missed it has the poor ranks of
    a missed item, which teaches "poor retrieval rank → positive" (measured on Last.fm: in the window's lists
    positives had worse EASE ranks than negatives, in the holdout lists better)."""
    from pyspark.sql import functions as F

    hit = pairs.filter((F.col(SOURCE) == "retrieved") & (F.col(LABEL) > 0.5)).select(QUERY_ID).distinct()
    return pairs.filter(F.col(SOURCE) != "target").join(hit, QUERY_ID, "left_semi")


def without_later_train_items(pairs: DataFrame, splits: DataFrame) -> DataFrame:
    """`pairs` less the negatives whose item the user interacts with in a later train row (a ranker-window
    query's own future window rows): labelling them 'not picked' is false, and where the order is random (a
    table without time) they are as good as the positive. Only labels are cleaned: no feature or candidate
    changes, and no validation or test row is read. Without a window there is no later train row."""
    from pyspark.sql import functions as F

    later = splits.filter(F.col(S.SPLIT) == "train").select(S.USER, S.ITEM, F.col(S.POSITION).alias("_later_position"))
    false_negatives = (
        pairs.filter(F.col(LABEL) < 0.5)
        .select(QUERY_ID, S.USER, S.ITEM, QUERY_POSITION)
        .join(later, [S.USER, S.ITEM])
        .filter(F.col("_later_position") > F.col(QUERY_POSITION))
        .select(QUERY_ID, S.ITEM)
        .distinct()
    )
    return pairs.join(false_negatives, [QUERY_ID, S.ITEM], "left_anti")


def _write_model_tables(session, raw: Path, out_dir: Path, stats, **columns) -> dict[str, dict[str, int]]:
    """`<name>.parquet` (model_columns) of each raw pair table; rows, positives and lists (queries) per table."""
    from pyspark.sql import functions as F

    counts: dict[str, dict[str, int]] = {"rows": {}, "positives": {}, "lists": {}}
    for name in PAIR_TABLES:
        model_columns(session.read.parquet(str(raw / name)), stats, **columns).write.parquet(
            str(out_dir / f"{name}.parquet")
        )
        row = (
            session.read.parquet(str(out_dir / f"{name}.parquet"))
            .agg(F.count(F.lit(1)), F.sum(LABEL), F.countDistinct(QUERY_ID))
            .first()
        )
        counts["rows"][name], counts["positives"][name] = int(row[0]), int(float(row[1] or 0.0))
        counts["lists"][name] = int(row[2])
    return counts


def sparse_layout(info: dict[str, Any], switches: dict[str, bool]) -> list[dict]:
    """The DLRM's sparse features over a ranking dataset's columns (`info`: its meta.json; item and history
    share the item table), for the `switches` of ranker_features.SPARSE_SWITCHES (every one given)."""
    from recsys_assets.data.ranker_features import SPARSE_SWITCHES

    if set(switches) != set(SPARSE_SWITCHES):
        raise ValueError(f"sparse_layout needs exactly the switches {sorted(SPARSE_SWITCHES)}, got {sorted(switches)}")
    use_user_id, use_item_id, use_history, use_categories, use_user_attributes = (
        bool(switches[name]) for name in SPARSE_SWITCHES
    )
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
