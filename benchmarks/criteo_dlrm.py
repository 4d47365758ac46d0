"""DLRM on the Criteo display-advertising layout: quality (AUROC / logloss) and training throughput, 1 vs 2
torchrun processes.

Reproduce (prints the tables below):
    V=$(bash scripts/bootstrap.sh); PYSPARK_PYTHON=$V/bin/python $V/bin/python benchmarks/criteo_dlrm.py \
        [--input ../shared/data/criteo-dac-head/train_head900.txt] [--num-embeddings 1000] [--epochs 8]

Steps: `recsys_assets.data.criteo.write_criteo_dataset` (Spark: parse, log1p dense, hashed categoricals,
first 80 % train as MDS, next 10 % validation, last 10 % test as Parquet), then the generic DLRM trainer
(`python -m recsys_assets.training.dlrm` under torchrun) with the config from `criteo_train_config`, once with 1
process and once with 2 (same global batch: each of the 2 takes half). Epochs are early-stopped on validation
AUROC; the reported metrics are those of the chosen epoch. samples/s counts training time only (evaluation
excluded). On the 900-line sample the validation and test parts have 90 rows each: their AUROC is noisy
(± ~0.07); give the full Kaggle ``train.txt`` (or a longer head of it) with ``--input`` for meaningful numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build(input_path: str, out: Path, num_embeddings: int) -> dict:
    from pyspark.sql import SparkSession

    from recsys_assets.data.criteo import write_criteo_dataset

    spark = (
        SparkSession.builder.master("local[2]")
        .appName("criteo_bench")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.memory", "4g")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    try:
        t0 = time.time()
        meta = write_criteo_dataset(spark, input_path, out, num_embeddings_per_feature=num_embeddings)
        meta["seconds"] = time.time() - t0
        return meta
    finally:
        spark.stop()


def torchrun(config: dict, nproc: int, work: Path):
    import torch

    cfg = work / f"cfg-{nproc}-{time.time_ns()}.json"
    out = cfg.with_suffix(".pt")
    cfg.write_text(json.dumps(config))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "recsys_assets.training.dlrm",
        "--config",
        str(cfg),
        "--result",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-3000:])
    return torch.load(out, weights_only=False)  # our own result object, written by this benchmark


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", default=str(REPO.parent / "shared" / "data" / "criteo-dac-head" / "train_head900.txt"))
    ap.add_argument("--num-embeddings", type=int, default=1000, help="rows per table (26 tables)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--patience", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64, help="global batch")
    ap.add_argument("--embedding-dim", type=int, default=16)
    args = ap.parse_args()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    if not Path(args.input).exists():
        sys.exit(f"no Criteo input at {args.input}")
    work = Path(tempfile.mkdtemp(prefix="recsys-bench-criteo-"))
    meta = build(args.input, work / "ds", args.num_embeddings)

    from recsys_assets.training.criteo import criteo_train_config

    base = dict(
        epochs=args.epochs,
        patience=args.patience,
        embedding_dim=args.embedding_dim,
        bottom_layer_sizes=(64, args.embedding_dim),
        top_layer_sizes=(64, 32, 1),
        seed=0,
    )
    one = torchrun(criteo_train_config(work / "ds", batch_size=args.batch_size, **base).to_dict(), 1, work)
    two = torchrun(criteo_train_config(work / "ds", batch_size=args.batch_size // 2, **base).to_dict(), 2, work)

    rows = meta["splits"]
    print(
        f"\n## Criteo data: {Path(args.input).name}, {meta['lines']} lines ({meta['bad_lines_dropped']} dropped), "
        f"train/validation/test = {rows['train']['rows']}/{rows['validation']['rows']}/{rows['test']['rows']} "
        f"(row order), positive rate {rows['train']['positive_rate']:.3f}/{rows['validation']['positive_rate']:.3f}/"
        f"{rows['test']['positive_rate']:.3f}; Spark → MDS/Parquet {meta['seconds']:.1f} s; "
        f"26 tables × {args.num_embeddings} rows × dim {args.embedding_dim}"
    )
    print(
        f"\n## DLRM quality (epoch chosen on validation AUROC, max {args.epochs} epochs, global batch {args.batch_size})"
    )
    print("| processes | best epoch | val AUROC | val logloss | test AUROC | test logloss |")
    print("|---|---|---|---|---|---|")
    for r in (one, two):
        v, t = r.final_metrics["validation"], r.final_metrics["test"]
        print(
            f"| {r.world_size} | {r.best_epoch} | {v['auroc']:.4f} | {v['logloss']:.4f} | {t['auroc']:.4f} | {t['logloss']:.4f} |"
        )
    print(f"\n## DLRM training throughput (training only; {one.history[0]['samples']} samples per epoch)")
    print("| processes | epochs run | samples/s (train) | peak RSS per process (MiB) | total s |")
    print("|---|---|---|---|---|")
    for r in (one, two):
        rss = ", ".join(f"{x:.0f}" for x in r.peak_rss_mb)
        print(f"| {r.world_size} | {len(r.history)} | {r.samples_per_second:,.0f} | {rss} | {r.total_seconds:.1f} |")
    print(f"| ratio 2 / 1 | | {two.samples_per_second / one.samples_per_second:.2f} | | |")


if __name__ == "__main__":
    main()
