"""The Criteo display-advertising layout (Kaggle DAC / Terabyte click logs) → DLRM training data.

Input: text files of tab-separated lines, 40 fields each, no header:
``label \\t int_0 … int_12 \\t cat_0 … cat_25`` — label 0/1, 13 integer counts (may be negative, e.g. -1),
26 categorical values hashed to 8 hex characters. Any field except the label may be empty (missing).

Steps (Spark only, no torch):

- `read_criteo` parses and validates the lines → ``label`` (float), ``int_0..int_12`` (bigint, missing → null),
  ``cat_0..cat_25`` (string, missing → null) and ``row_index`` (bigint, 0-based position in the input: files
  in the order given, lines in file order; the Kaggle file is ordered by time).
  A malformed line (not 40 tab-separated fields, a label other than ``0``/``1``, an integer field that is not
  an integer) is **refused by default** (``bad_lines="fail"``): `DataValidationError` naming the file, how many
  lines are bad out of how many, and the first ones with their line numbers. ``bad_lines="drop"`` drops them
  and reports the count in `CriteoRead` (and in ``meta.json``).
- `criteo_features`: the standard DLRM preprocessing — ``dense`` = 13 × ``log(1 + max(x, 0))`` with missing → 0
  (float32), and ``cat_i`` = ``1 + pmod(xxhash64(value), n_i - 1)`` (Spark's xxhash64, seed 42: stable across
  runs, machines and partitionings), so ids fall in ``[1, n_i)``; **id 0 is reserved for a missing value**.
- `split_criteo`: by row order (default: the first 80 % train, next 10 % validation, last 10 % test — a
  forward-in-time split) or random (seeded).
- `write_criteo_dataset`: train as MDS (``label`` float32, ``dense`` ndarray:float32, ``cat_*`` int32), validation
  and test as Parquet (``dense`` as list<float>), and ``meta.json`` with the layout that `DLRMTrainConfig` takes
  (one table per categorical feature), row counts and the dense feature count; published atomically (written
  into a hidden folder beside ``out_dir``, then renamed).

CLI: ``python -m recsys_assets.data.criteo --input train.txt --out DIR [--num-embeddings 100000]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from recsys_assets.data import schema as S
from recsys_assets.data.blocks import BlockLayout, read_layout
from recsys_assets.data.errors import DataValidationError
from recsys_assets.data.lines import INT_RE, ROW_INDEX, check_policy, input_files, read_numbered_lines

NUM_INT = 13
NUM_CAT = 26
NUM_FIELDS = 1 + NUM_INT + NUM_CAT
INT_COLUMNS = [f"int_{i}" for i in range(NUM_INT)]
CAT_COLUMNS = [f"cat_{i}" for i in range(NUM_CAT)]
LABEL, DENSE = S.LABEL, S.DENSE  # the DLRM's pair columns
MISSING_ID = 0  # the embedding row of a missing categorical value
DEFAULT_NUM_EMBEDDINGS = 100_000
SPLITS = ("train", "validation", "test")
# The train split's MDS block layout (data/blocks.py).
BLOCK_LAYOUT = BlockLayout.of(
    {LABEL: ("float32", 0), DENSE: ("float32", NUM_INT), **{c: ("int32", 0) for c in CAT_COLUMNS}}
)


@dataclasses.dataclass
class CriteoRead:
    df: DataFrame  # label, int_*, cat_*, row_index
    rows: int  # good rows (the ones in df)
    lines: int  # lines read
    bad_lines: int  # malformed lines (dropped; with bad_lines="fail" this is 0 or read_criteo raised)
    bad_examples: list[str]  # "file:line: problem" for the first few malformed lines
    files: list[str]


# ------------------------------------------------------------------------------------------------- reading
def _problem(value: F.Column) -> F.Column:
    """Null for a good line, else a short description of what is wrong with it."""
    fields = F.split(value, "\t", -1)
    n = F.size(fields)
    label = fields.getItem(0)
    bad_int = F.filter(F.slice(fields, 2, NUM_INT), lambda v: (v != F.lit("")) & ~v.rlike(INT_RE))
    return (
        F.when(n != NUM_FIELDS, F.format_string(f"%d tab-separated fields, expected {NUM_FIELDS}", n))
        .when(~label.isin("0", "1"), F.format_string("label %s is not 0 or 1", F.substring(label, 1, 20)))
        .when(
            F.size(bad_int) > 0,
            F.format_string("integer field %s is not an integer", F.substring(bad_int.getItem(0), 1, 20)),
        )
    )


def read_criteo_report(
    spark: SparkSession, path: str | Path | Sequence[str | Path], *, bad_lines: str = "fail"
) -> CriteoRead:
    """Parses Criteo lines (see the module docstring), each numbered in its file and validated."""
    check_policy(bad_lines, "criteo source")
    files = input_files(path, "criteo source")
    lines = read_numbered_lines(spark, files, _problem, what="criteo source")
    good, examples = lines.good(
        bad_lines,
        "criteo source",
        f"{NUM_FIELDS} tab-separated fields: label 0/1, {NUM_INT} integers, {NUM_CAT} categorical values",
    )
    parts = F.split(F.col("value"), "\t", -1)
    empty_to_null = lambda c: F.when(c != F.lit(""), c)  # noqa: E731
    df = good.select(
        parts.getItem(0).cast("float").alias(LABEL),
        *[empty_to_null(parts.getItem(1 + i)).cast("bigint").alias(c) for i, c in enumerate(INT_COLUMNS)],
        *[empty_to_null(parts.getItem(1 + NUM_INT + i)).alias(c) for i, c in enumerate(CAT_COLUMNS)],
        F.col(ROW_INDEX),
    )
    return CriteoRead(
        df=df,
        rows=lines.lines - lines.bad_lines,
        lines=lines.lines,
        bad_lines=lines.bad_lines,
        bad_examples=examples,
        files=files,
    )


def read_criteo(spark: SparkSession, path: str | Path | Sequence[str | Path], *, bad_lines: str = "fail") -> DataFrame:
    """The parsed rows (label, int_0..int_12, cat_0..cat_25, row_index); see `read_criteo_report`."""
    return read_criteo_report(spark, path, bad_lines=bad_lines).df


# ------------------------------------------------------------------------------------------------ features
def _table_sizes(num_embeddings_per_feature: int | Sequence[int]) -> list[int]:
    if isinstance(num_embeddings_per_feature, int):
        sizes = [num_embeddings_per_feature] * NUM_CAT
    else:
        sizes = [int(x) for x in num_embeddings_per_feature]
    if len(sizes) != NUM_CAT:
        raise DataValidationError(f"criteo: need {NUM_CAT} table sizes, got {len(sizes)}")
    if any(s < 2 for s in sizes):
        raise DataValidationError(
            f"criteo: every table needs >= 2 rows (row {MISSING_ID} is for missing values), got {sizes}"
        )
    return sizes


def criteo_features(
    df: DataFrame, *, num_embeddings_per_feature: int | Sequence[int] = DEFAULT_NUM_EMBEDDINGS
) -> DataFrame:
    """label (float), dense (array<float>[13] = log1p(max(x, 0)), missing → 0), cat_i (int in [0, n_i):
    1 + pmod(xxhash64(value), n_i - 1), missing → 0), plus row_index when `df` has it."""
    sizes = _table_sizes(num_embeddings_per_feature)
    dense = F.array(
        *[
            F.log1p(F.greatest(F.coalesce(F.col(c), F.lit(0)), F.lit(0)).cast("double")).cast("float")
            for c in INT_COLUMNS
        ]
    )
    cats = [
        F.when(F.col(c).isNull(), F.lit(MISSING_ID))
        .otherwise(F.pmod(F.xxhash64(F.col(c)), F.lit(n - 1).cast("bigint")) + 1)
        .cast("int")
        .alias(c)
        for c, n in zip(CAT_COLUMNS, sizes)
    ]
    extra = [F.col(ROW_INDEX)] if ROW_INDEX in df.columns else []
    return df.select(F.col(LABEL).cast("float").alias(LABEL), dense.alias(DENSE), *cats, *extra)


def split_criteo(
    df: DataFrame,
    total_rows: int,
    *,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    method: str = "row_order",
    seed: int = 0,
) -> dict[str, DataFrame]:
    """{train, validation, test}. ``row_order``: contiguous parts in input order (needs row_index; the Kaggle
    file is time-ordered, so this validates forward in time); ``random``: each row independently (seeded)."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise DataValidationError(
            f"criteo: split fractions must be 3 non-negative numbers summing to 1, got {fractions}"
        )
    if method == "row_order":
        if ROW_INDEX not in df.columns:
            raise DataValidationError("criteo: a row_order split needs the row_index column")
        # Boundaries in input positions (over all lines read: dropped lines do not shift them).
        b1 = int(round(total_rows * fractions[0]))
        b2 = int(round(total_rows * (fractions[0] + fractions[1])))
        key = F.col(ROW_INDEX)
    elif method == "random":
        b1, b2 = fractions[0], fractions[0] + fractions[1]
        key = F.rand(seed)
    else:
        raise DataValidationError(f"criteo: split method must be 'row_order' or 'random', got {method!r}")
    return {
        "train": df.filter(key < b1),
        "validation": df.filter((key >= b1) & (key < b2)),
        "test": df.filter(key >= b2),
    }


def sparse_layout(num_embeddings_per_feature: int | Sequence[int] = DEFAULT_NUM_EMBEDDINGS) -> list[dict]:
    """The DLRM layout (``models.dlrm.SparseFeature`` fields): one table per categorical feature."""
    return [
        {"name": c, "table": c, "num_embeddings": n, "multi_valued": False, "pooling": "sum"}
        for c, n in zip(CAT_COLUMNS, _table_sizes(num_embeddings_per_feature))
    ]


# --------------------------------------------------------------------------------------------------- write
def write_criteo_dataset(
    spark: SparkSession,
    path: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    *,
    num_embeddings_per_feature: int | Sequence[int] = DEFAULT_NUM_EMBEDDINGS,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    split: str = "row_order",
    seed: int = 0,
    bad_lines: str = "fail",
    partitions: int = 2,
    compression: str | None = "zstd",
    size_limit: str = "64mb",
) -> dict:
    """Writes ``out_dir/{train (MDS blocks), validation.parquet, test.parquet, meta.json}`` atomically; returns
    meta."""
    from recsys_assets.data.mds import write_blocks_with_spark
    from recsys_assets.data.publish import publish_folder

    read = read_criteo_report(spark, path, bad_lines=bad_lines)
    sizes = _table_sizes(num_embeddings_per_feature)
    features = criteo_features(read.df, num_embeddings_per_feature=sizes)
    parts = split_criteo(features, read.lines, fractions=fractions, method=split, seed=seed)
    out_dir = Path(out_dir)
    columns = [LABEL, DENSE, *CAT_COLUMNS]
    with publish_folder(out_dir, keep_versions=0, point_latest=False) as tmp:
        train_summary = write_blocks_with_spark(
            parts["train"],
            BLOCK_LAYOUT,
            tmp / "train",
            rows=parts["train"].count(),
            partitions=partitions,
            compression=compression,
            size_limit=size_limit,
            seed=seed,
        )
        stats = {"train": {"rows": train_summary["rows"]}}
        for name in ("validation", "test"):
            parts[name].select(*columns).coalesce(partitions).write.parquet(str(tmp / f"{name}.parquet"))
        for name in SPLITS:
            p = spark.read.parquet(str(tmp / f"{name}.parquet")) if name != "train" else parts["train"]
            row = p.agg(F.count(F.lit(1)).alias("n"), F.avg(LABEL).alias("pos")).first()
            stats[name] = {
                "rows": int(row["n"]),
                "positive_rate": float(row["pos"]) if row["pos"] is not None else None,
            }
        if stats["train"]["rows"] != train_summary["rows"]:
            raise RuntimeError(
                f"criteo: MDS train has {train_summary['rows']} rows, the split {stats['train']['rows']}"
            )
        if min(s["rows"] for s in stats.values()) == 0:
            raise DataValidationError(
                f"criteo: an empty split ({ {k: v['rows'] for k, v in stats.items()} }): "
                "more input rows or other fractions are needed"
            )
        meta = {
            "format": "criteo",
            "source": read.files,
            "lines": read.lines,
            "rows": read.rows,
            "bad_lines_dropped": read.bad_lines,
            "bad_line_examples": read.bad_examples,
            "splits": stats,
            "split": {"method": split, "fractions": list(fractions), "seed": seed},
            "train_mds": "train",
            "eval_sets": {"validation": "validation.parquet", "test": "test.parquet"},
            "dense_in_features": NUM_INT,
            "dense_columns": INT_COLUMNS,
            "dense_transform": "log(1 + max(x, 0)), missing -> 0",
            "layout": sparse_layout(sizes),
            "categorical_hashing": f"1 + pmod(xxhash64(value), num_embeddings - 1) (Spark xxhash64, seed 42); "
            f"missing -> {MISSING_ID}",
            "missing_id": MISSING_ID,
            "mds_layout": read_layout(tmp / "train").to_dict(),
            "mds_bytes": train_summary["bytes"],
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


# ----------------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Criteo (Kaggle DAC layout) text → MDS train + Parquet validation/test")
    ap.add_argument("--input", required=True, nargs="+", help="Criteo text file(s) or folder(s), in time order")
    ap.add_argument("--out", required=True, help="output folder (replaced atomically)")
    ap.add_argument("--num-embeddings", type=int, default=DEFAULT_NUM_EMBEDDINGS, help="rows of each of the 26 tables")
    ap.add_argument("--split", choices=["row_order", "random"], default="row_order")
    ap.add_argument("--fractions", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bad-lines", choices=["fail", "drop"], default="fail")
    ap.add_argument("--partitions", type=int, default=2)
    ap.add_argument("--master", default="local[*]")
    ap.add_argument("--driver-memory", default="4g")
    args = ap.parse_args(argv)
    spark = (
        SparkSession.builder.master(args.master)
        .appName("criteo_to_mds")
        .config("spark.ui.enabled", "false")
        .config("spark.driver.memory", args.driver_memory)
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    try:
        meta = write_criteo_dataset(
            spark,
            args.input,
            args.out,
            num_embeddings_per_feature=args.num_embeddings,
            fractions=args.fractions,
            split=args.split,
            seed=args.seed,
            bad_lines=args.bad_lines,
            partitions=args.partitions,
        )
    except DataValidationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        spark.stop()
    print(
        json.dumps(
            {k: meta[k] for k in ("lines", "rows", "bad_lines_dropped", "splits", "dense_in_features")}, indent=2
        )
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
