"""Data pipeline benchmark: raw → MDS wall time at several sizes (reading it back: benchmarks/data_loader.py).

Reproduce (prints the tables below):
    make env && PYSPARK_PYTHON=$(bash scripts/bootstrap.sh)/bin/python \
        $(bash scripts/bootstrap.sh)/bin/python benchmarks/data_pipeline.py [--sizes 100k,1m,4m]

Measured side by side in one run, for each synthetic size: generation (numpy) and the Spark pipeline (clean →
index → temporal split with history → Parquet → MDS blocks for the three splits), wall seconds and rows/s, and
the growth ratio of the Spark time between consecutive sizes against the growth of the row count (≈1 means
linear scaling).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def spark_session():
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    spark = (
        SparkSession.builder.master("local[2]")
        .config("spark.ui.enabled", "false")
        .config("spark.driver.memory", "6g")
        .config("spark.sql.shuffle.partitions", "8")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def run_pipeline(spark, size: str, root: Path, history_length: int) -> dict:
    from pyspark.sql import functions as F

    from recsys_assets.data import mds as M
    from recsys_assets.data import schema as S
    from recsys_assets.data import sources, transforms
    from recsys_assets.data.synthetic import SyntheticSpec, generate

    t0 = time.perf_counter()
    data = generate(SyntheticSpec.of_size(size))
    t_gen = time.perf_counter() - t0
    rows = len(data.interactions)

    t1 = time.perf_counter()
    raw = sources.RawTables(
        interactions=spark.createDataFrame(data.interactions).selectExpr(
            "cast(user as string) user", "cast(item as string) item", "timestamp", "rating"
        ),
        items=spark.createDataFrame(data.items).selectExpr("cast(item as string) item", "categories"),
        users=None,
    )
    raw.interactions.write.parquet(str(root / "raw"))
    raw.interactions = spark.read.parquet(str(root / "raw"))
    cleaned, _ = transforms.clean(raw.interactions)
    indexed = transforms.index(cleaned, raw)
    indexed.interactions.write.parquet(str(root / "interactions"))
    splits = transforms.temporal_split(spark.read.parquet(str(root / "interactions")), history_length)
    splits.write.partitionBy(S.SPLIT).parquet(str(root / "splits"))
    splits = spark.read.parquet(str(root / "splits"))
    counts = {r[S.SPLIT]: int(r["count"]) for r in splits.groupBy(S.SPLIT).count().collect()}
    for split in S.SPLITS:
        M.write_rows_to_mds(
            splits.filter(F.col(S.SPLIT) == split),
            root / "mds" / split,
            history_length=history_length,
            rows=counts[split],
            partitions=2,
        )
    t_spark = time.perf_counter() - t1
    return {"size": size, "rows": rows, "gen_s": t_gen, "spark_s": t_spark}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100k,1m,4m")
    ap.add_argument("--history-length", type=int, default=20)
    args = ap.parse_args()
    spark = spark_session()
    work = Path(tempfile.mkdtemp(prefix="recsys-bench-"))
    results = []
    try:
        for size in args.sizes.split(","):
            root = work / size
            r = run_pipeline(spark, size, root, args.history_length)
            results.append(r)
            print(
                f"[{size}] {r['rows']} rows: generate {r['gen_s']:.1f}s, spark raw→MDS {r['spark_s']:.1f}s", flush=True
            )
    finally:
        spark.stop()

    print("\n## raw → MDS (local[2], 2 cores)")
    print(
        "| size | rows | generate s | Spark raw→MDS s | rows/s (Spark) | time growth | rows growth | time/rows growth |"
    )
    print("|---|---|---|---|---|---|---|---|")
    prev = None
    for r in results:
        growth = ""
        if prev:
            tg, rg = r["spark_s"] / prev["spark_s"], r["rows"] / prev["rows"]
            growth = f"{tg:.2f}x | {rg:.2f}x | {tg / rg:.2f}"
        else:
            growth = " | | "
        print(
            f"| {r['size']} | {r['rows']:,} | {r['gen_s']:.1f} | {r['spark_s']:.1f} | {r['rows'] / r['spark_s']:,.0f} | {growth} |"
        )
        prev = r
    print("\nReading the MDS back (blocks vs. Parquet vs. the row layout, vs. training): benchmarks/data_loader.py.")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
