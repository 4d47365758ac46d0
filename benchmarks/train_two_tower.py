"""Two Tower training benchmark: scaling, loader vs. consumption, memory, and quality on MovieLens.

Reproduce (prints the tables below):
    V=$(bash scripts/bootstrap.sh); PYSPARK_PYTHON=$V/bin/python $V/bin/python benchmarks/train_two_tower.py \
        [--size 100k] [--movielens ../shared/data/ml-latest-small] [--encoders bag,sequence] [--skip-quality]

Measured side by side in one run, on 2 CPU cores:
1. Training throughput (samples/s, training only, evaluation excluded) with 1 process (the CPU default of
   TorchDistributorResource: its torch threads use every core) and 2 torchrun processes (one thread each) on the
   synthetic dataset, at the same global batch, and their ratio; peak RSS per process.
2. The MDS block reader alone (rows/s, same batch size, KeyedJaggedTensors built) vs. what training
   consumes (samples/s): the ratio says how much headroom the loader has.
3. On MovieLens (ml-latest-small, all ratings as implicit interactions), each query encoder (`bag`: the mean
   pooled history; `sequence`: causal self-attention over it) with the default process count: training
   samples/s and seconds per epoch side by side, and their ratio to the bag's.
4. The protocol's test metrics of the Two Tower with each encoder (early-stopped on validation NDCG@10, refit
   on train+validation) next to MostPopular, LastItemMarkov, EASE (λ tuned on validation) and Spark ALS
   (implicit; the reference setting), all from the one evaluator.
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
sys.path.insert(0, str(REPO / "benchmarks"))


def build_dataset(source: dict, root: Path) -> Path:
    """Materializes the data assets (the real Dagster graph) and returns the dataset folder."""
    import dagster as dg

    from recsys_assets.defs.data_assets import data_assets
    from recsys_assets.defs.resources import SparkResource, StateResource
    from recsys_assets.defs.storage import AssetFolderIOManager

    state = StateResource(root=str(root))
    result = dg.materialize(
        data_assets,
        resources={
            "spark": SparkResource(master="local[2]", shuffle_partitions=8, driver_memory="4g"),
            "state": state,
            "io_manager": AssetFolderIOManager(state=state),
        },
        run_config={"ops": {"raw_interactions": {"config": source}}},
    )
    assert result.success
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == "mds_splits"]
    return Path(event.materialization.metadata["path"].value)


def torchrun(config: dict, nproc: int, work: Path) -> dict:
    """Runs the training CLI under torchrun and returns the rank-0 result (fields of TwoTowerTrainResult)."""
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
        "recsys_assets.training.two_tower",
        "--config",
        str(cfg),
        "--result",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-3000:])
    return torch.load(out, weights_only=False)  # our own result object, written by this benchmark


def quality(movielens: Path, work: Path, epochs: int, encoders: list[str]) -> list[tuple[str, dict]]:
    import pandas as pd

    from recsys_assets.evaluation.baselines import EASE, LastItemMarkov, MostPopular, SparkALS, tune
    from recsys_assets.evaluation.protocol import EvalTask, evaluate

    data_root = build_dataset({"source": "movielens", "movielens_path": str(movielens)}, work / "ml")
    base = {"data_root": str(data_root), "epochs": epochs}
    rows, speed = [], []
    for encoder in encoders:
        settings = {**base, "query_encoder": encoder}
        selection = torchrun({**settings, "eval_phase": "validation"}, 1, work)
        refit = torchrun({**settings, "eval_phase": "test", "epochs": selection.best_epoch + 1}, 1, work)
        rows.append((f"Two Tower, {encoder} (val-selected epochs, refit train+val)", refit.final_metrics))
        speed.append((encoder, selection))
        print(
            f"two tower ({encoder}): validation {selection.final_metrics} (best epoch {selection.best_epoch}); "
            f"test {refit.final_metrics}",
            flush=True,
        )
    print_encoder_speed(movielens.name, speed)

    splits = pd.read_parquet(data_root / "splits", columns=["user", "item", "timestamp", "split"])
    test = EvalTask.from_splits(splits, "test")
    rows.append(("MostPopular", evaluate(MostPopular().fit(test).score, test).metrics))
    rows.append(("LastItemMarkov", evaluate(LastItemMarkov().fit(test).score, test).metrics))
    ease = tune(lambda lam: EASE(lam=lam), {"lam": [50.0, 200.0, 500.0, 1000.0]}, splits)
    rows.append((f"EASE (λ={ease.params['lam']:g}, chosen on validation)", ease.test.metrics))
    from pyspark.sql import SparkSession

    spark = SparkSession.builder.getOrCreate()
    als = SparkALS(spark, rank=64, reg_param=0.1, alpha=1.0, max_iter=15, seed=0).fit(test)
    rows.append(("Spark ALS implicit (rank 64, reg 0.1, alpha 1)", evaluate(als.score, test).metrics))
    return rows


def print_encoder_speed(dataset: str, runs: list[tuple[str, object]]) -> None:
    """Samples/s and seconds per epoch of each encoder's validation fit (training only), against the first's."""
    print(f"\n## query encoders on {dataset}: training speed (default process count, evaluation excluded)")
    print("| encoder | processes | samples/s | s per epoch | epoch cost / first encoder's |")
    print("|---|---|---|---|---|")

    def per_epoch(r) -> float:
        return sum(h["train_seconds"] for h in r.history) / max(1, len(r.history))

    first_epoch = per_epoch(runs[0][1])
    for encoder, r in runs:
        print(
            f"| {encoder} | {r.world_size} | {r.samples_per_second:,.0f} | {per_epoch(r):.2f} | {per_epoch(r) / first_epoch:.2f} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="100k", help="synthetic size for the throughput part")
    ap.add_argument("--epochs", type=int, default=2, help="epochs of the throughput runs")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--movielens", default=str(REPO.parent / "shared" / "data" / "ml-latest-small"))
    ap.add_argument("--quality-epochs", type=int, default=20)
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--encoders", default="bag,sequence", help="query encoders compared on MovieLens")
    args = ap.parse_args()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    work = Path(tempfile.mkdtemp(prefix="recsys-bench-tt-"))

    data_root = build_dataset({"synthetic": {"size": args.size}}, work / "synthetic")
    cfg = {
        "data_root": str(data_root),
        "epochs": args.epochs,
        "patience": args.epochs,
        "batch_size": args.batch_size,
        "eval_phase": "validation",
    }
    one = torchrun(cfg, 1, work)
    # Same global batch with 2 processes: each takes half.
    two = torchrun({**cfg, "batch_size": args.batch_size // 2}, 2, work)
    from data_loader import run_reader

    loader = run_reader("blocks", data_root, data_root / "mds" / "train", args.batch_size, work)["rows_per_s"]

    print(
        f"\n## Two Tower training throughput, synthetic {args.size} ({args.epochs} epochs, global batch {args.batch_size}, "
        "default query encoder)"
    )
    print("| processes | samples/s (train) | peak RSS per process (MiB) | total s |")
    print("|---|---|---|---|")
    for r in (one, two):
        rss = ", ".join(f"{x:.0f}" for x in r.peak_rss_mb)
        print(f"| {r.world_size} | {r.samples_per_second:,.0f} | {rss} | {r.total_seconds:.1f} |")
    print(f"| ratio default (1 process) / 2 processes | {one.samples_per_second / two.samples_per_second:.2f} | | |")
    print("\n## loader vs. training consumption")
    print("| what | rows/s |")
    print("|---|---|")
    print(f"| MDS block reader → KJT alone (1 process) | {loader:,.0f} |")
    print(f"| training consumes (2 processes, total) | {two.samples_per_second:,.0f} |")
    print(f"| ratio loader / training | {loader / two.samples_per_second:.1f} |")

    if not args.skip_quality:
        ml = Path(args.movielens)
        if not (ml / "ratings.csv").is_file():
            print(f"\n(quality part skipped: {ml} has no ratings.csv)")
            return
        rows = quality(ml, work, args.quality_epochs, args.encoders.split(","))
        print(f"\n## test metrics on {ml.name} (full ranking, leave-last-out, train+validation items excluded)")
        print("| model | HR@10 | NDCG@10 | HR@100 |")
        print("|---|---|---|---|")
        for name, m in rows:
            print(f"| {name} | {m['hr@10']:.4f} | {m['ndcg@10']:.4f} | {m['hr@100']:.4f} |")


if __name__ == "__main__":
    main()
