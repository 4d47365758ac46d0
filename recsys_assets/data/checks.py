"""Quality checks of the published data folders (the data assets' blocking checks): each returns a
CheckOutcome, whose description says what is wrong when it fails."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from recsys_assets.data import schema as S

EXPECTED_TYPES = {S.USER: "int", S.ITEM: "int", S.TIMESTAMP: "bigint", S.RATING: "float"}
KEY_COLUMNS = (S.USER, S.ITEM, S.TIMESTAMP)


@dataclasses.dataclass(frozen=True)
class CheckOutcome:
    passed: bool
    description: str | None  # None when passed
    metadata: dict[str, Any]

    @classmethod
    def of(cls, problems: list[str], metadata: dict[str, Any]) -> CheckOutcome:
        return cls(not problems, "; ".join(problems) or None, metadata)


def interactions_schema_and_keys(session, interactions_root: str | Path) -> CheckOutcome:
    """Required columns with the right types; no null keys."""
    from pyspark.sql import functions as F

    df = session.read.parquet(str(Path(interactions_root) / "interactions"))
    actual = {f.name: f.dataType.simpleString() for f in df.schema.fields}
    wrong = {c: (actual.get(c), t) for c, t in EXPECTED_TYPES.items() if actual.get(c) != t}
    nulls = df.agg(*[F.sum(F.col(c).isNull().cast("long")).alias(c) for c in KEY_COLUMNS]).first()
    null_counts = {c: int(nulls[c] or 0) for c in KEY_COLUMNS}
    problems = (
        []
        if not wrong and not any(null_counts.values())
        else [f"wrong/missing columns (actual, expected): {wrong}; null keys: {null_counts}"]
    )
    return CheckOutcome.of(problems, {"columns": actual, "null_keys": null_counts})


def splits_are_temporal_and_complete(session, splits_root: str | Path) -> CheckOutcome:
    """Every split non-empty; held-out users have train rows; no held-out row earlier than the same user's
    train rows."""
    from pyspark.sql import functions as F

    df = session.read.parquet(str(Path(splits_root) / "splits"))
    counts = {r[S.SPLIT]: int(r["count"]) for r in df.groupBy(S.SPLIT).count().collect()}
    empty = [s for s in S.SPLITS if counts.get(s, 0) == 0]
    train = df.filter(F.col(S.SPLIT) == "train")
    held = df.filter(F.col(S.SPLIT) != "train")
    orphan_users = held.select(S.USER).distinct().join(train.select(S.USER).distinct(), S.USER, "left_anti").count()
    last_train = train.groupBy(S.USER).agg(F.max(S.TIMESTAMP).alias("_last_train"))
    leaks = held.join(last_train, S.USER).filter(F.col(S.TIMESTAMP) < F.col("_last_train")).count()
    problems = []
    if empty:
        problems.append(f"empty split(s): {empty}")
    if orphan_users:
        problems.append(f"{orphan_users} validation/test users have no train rows")
    if leaks:
        problems.append(f"{leaks} validation/test rows are earlier than the same user's train rows")
    return CheckOutcome.of(
        problems,
        {
            **{f"rows_{s}": counts.get(s, 0) for s in S.SPLITS},
            "heldout_users_without_train": orphan_users,
            "heldout_rows_before_train": leaks,
        },
    )


def mds_matches_splits(session, dataset_root: str | Path) -> CheckOutcome:
    """Each MDS folder has the rows of its split (ranker_fit: the train rows before the ranker window) and the
    contract's columns; meta.json agrees."""
    from recsys_assets.data.mds import split_layout, summarize_mds
    from recsys_assets.data.phases import MDS_FOLDER_ROWS, PHASES

    paths = S.DatasetPaths(Path(dataset_root))
    meta = S.DatasetMeta.load(paths.meta)
    splits = session.read.parquet(str(paths.splits))
    expected = {r[S.SPLIT]: int(r["count"]) for r in splits.groupBy(S.SPLIT).count().collect()}
    window = splits.filter(PHASES["ranker"].queries.column()).count()
    folders = {name: rows for name, rows in MDS_FOLDER_ROWS.items() if name != S.RANKER_FIT or window}
    problems = []
    for name, rows in folders.items():
        summary = summarize_mds(paths.mds(name))
        want = splits.filter(rows.column()).count()
        if summary["rows"] != want:
            problems.append(f"{name}: {summary['rows']} MDS rows vs {want} split rows")
        expected_columns = split_layout(meta.history_length).mds_columns()
        if summary["columns"] not in ({}, expected_columns):  # {}: an empty split has no shard
            problems.append(f"{name}: columns {summary['columns']} != {expected_columns}")
    if meta.rows != {s: expected.get(s, 0) for s in S.SPLITS}:
        problems.append(f"meta.json rows {meta.rows} != {expected}")
    if meta.ranker_queries != window:
        problems.append(f"meta.json ranker_queries {meta.ranker_queries} != {window} ranker-window rows")
    return CheckOutcome.of(problems, {"expected_rows": expected, "ranker_queries": window})
