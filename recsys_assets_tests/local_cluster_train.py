"""Train the Two Tower through `TorchDistributorResource` in a process of its own, with its own SparkSession.

Used by `test_local_cluster.py`: a `local-cluster[...]` master needs its own session (executor JVMs are started
with the SparkContext), and the pytest process already holds the shared `local[2]` session that other tests
use. Running here leaves that session untouched.

    python local_cluster_train.py --master 'local-cluster[2,1,2048]' --local-mode false \
        --config cfg.json --out result.json

Writes JSON: master, local_mode, executors (executor JVMs registered), seconds (the distributed run),
final_metrics, best_epoch, world_size, history (epoch, loss, metrics), progress_events.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _registered_executors(sc) -> int:
    # getExecutorMemoryStatus counts the driver's block manager too
    return int(sc._jsc.sc().getExecutorMemoryStatus().size()) - 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--master", required=True)
    p.add_argument("--local-mode", choices=["true", "false"], required=True)
    p.add_argument("--num-processes", type=int, default=2)
    p.add_argument("--expect-executors", type=int, default=0, help="wait until this many executors registered")
    p.add_argument("--config", required=True, help="TwoTowerTrainConfig as JSON")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    # Executors' Python workers (and the torchrun they start) must run this interpreter.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)

    import dagster as dg

    from recsys_assets.defs.resources import SparkResource, TorchDistributorResource
    from recsys_assets.training.two_tower import TwoTowerTrainConfig, train_two_tower

    with open(args.config) as fh:
        config = TwoTowerTrainConfig.from_dict(json.load(fh))
    spark = SparkResource(master=args.master, driver_memory="1g", shuffle_partitions=2)
    sc = spark.spark_session.sparkContext
    deadline = time.monotonic() + 120
    while _registered_executors(sc) < args.expect_executors and time.monotonic() < deadline:
        time.sleep(0.5)
    executors = _registered_executors(sc)
    if executors < args.expect_executors:
        raise RuntimeError(f"only {executors} of {args.expect_executors} executors registered after 120 s")

    events: list[dict] = []
    resource = TorchDistributorResource(
        spark=spark, num_processes=args.num_processes, local_mode=args.local_mode == "true", timeout_seconds=600
    )
    t0 = time.monotonic()
    result = resource.run(
        dg.build_asset_context(),
        train_two_tower,
        config,
        progress_file=config.progress_file,
        on_progress=events.append,
    )
    seconds = time.monotonic() - t0
    out = {
        "master": sc.master,
        "local_mode": resource.local_mode,
        "executors": executors,
        "seconds": seconds,
        "final_metrics": result.final_metrics,
        "best_epoch": result.best_epoch,
        "world_size": result.world_size,
        "history": [{k: h[k] for k in ("epoch", "loss", "metrics")} for h in result.history],
        "progress_events": len(events),
    }
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)
    spark.spark_session.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
