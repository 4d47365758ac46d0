"""Data loader benchmark: MDS blocks → model-ready batches, next to Parquet → torch, the row layout and training.

Reproduce (prints the tables below; the 4m dataset takes a few minutes of Spark on 2 cores):
    V=$(bash scripts/bootstrap.sh); PYSPARK_PYTHON=$V/bin/python $V/bin/python benchmarks/data_loader.py \
        [--sizes 100k,1m,4m] [--batch-size 1024] [--train-batch-size 256] [--row-layout-rows 200000]

Measured side by side in one run, each reader in a fresh process (so its peak RSS is its own):
1. For each synthetic size (the real data assets write the dataset with Spark):
   - Parquet: pyarrow reads the train split's user, item, history and history_len and copies them into torch
     tensors (columnar, no shuffle, no KJT): the ceiling;
   - blocks: the trainers' reader (training/block_loader.py: two-level shuffle, rank agreement, resumable)
     → the Two Tower's model-ready batch (KeyedJaggedTensor + candidate ids, as `TwoTowerHooks.train_step`
     builds it), one process;
   - rows: the layout before blocks (one MDS sample per row, StreamingDataLoader + default collate → the
     same KJT) over the first --row-layout-rows rows of the same split, written for this run;
   - ratios blocks / Parquet and blocks / rows; peak RSS per process of blocks and rows.
2. On the first size, at one global batch (--train-batch-size; 2 processes take half each): the block reader
   alone in 2 processes (total rows/s) against Two Tower training in 2 processes (samples/s, training only),
   and training in 2 processes (one thread each) against 1 process with 2 threads and with 1.
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

COLUMNS = ("user", "item", "history", "history_len")


# ------------------------------------------------------------------------------------------ reader processes
def _model_ready(batch, spec, store, config):
    """What the Two Tower's training step builds from a batch before the model runs."""
    import torch

    from recsys_assets.models.features import batch_to_kjt

    kjt = batch_to_kjt(batch, spec, store)
    cand = torch.as_tensor(batch["item"]).long()
    return kjt, cand


def read_worker(args) -> None:
    """One reader process (or one rank under torchrun): iterate one epoch, build model-ready batches."""
    from recsys_assets.data.schema import DatasetMeta, DatasetPaths
    from recsys_assets.models.features import FeatureStore
    from recsys_assets.training.distributed import init_distributed, shutdown_distributed
    from recsys_assets.training.reporting import peak_rss_mb
    from recsys_assets.training.streaming import block_loader, prepare_streaming
    from recsys_assets.training.two_tower import TwoTowerTrainConfig, train_block_columns

    root = Path(args.data)
    meta = DatasetMeta.load(DatasetPaths(root).meta)
    config = TwoTowerTrainConfig(data_root=str(root), batch_size=args.batch_size)
    spec = config.feature_spec(meta)
    store = FeatureStore.load(root, spec)
    env = init_distributed()
    prepare_streaming()
    if args.read == "blocks":
        loader = block_loader(
            [args.mds], train_block_columns(meta.history_length), args.batch_size, env, seed=0, num_workers=args.workers
        )
    else:
        from streaming import StreamingDataLoader, StreamingDataset

        dataset = StreamingDataset(local=args.mds, shuffle=True, shuffle_seed=0, batch_size=args.batch_size)
        loader = StreamingDataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)
    rows, t0 = 0, time.perf_counter()
    for batch in loader:
        _model_ready(batch, spec, store, config)
        rows += len(batch["user"])
    seconds = time.perf_counter() - t0
    result = {"rank": env.rank, "rows": rows, "seconds": seconds, "peak_rss_mb": peak_rss_mb()}
    Path(f"{args.out}.{env.rank}").write_text(json.dumps(result))
    shutdown_distributed(env)


def run_reader(read: str, data: Path, mds: Path, batch_size: int, work: Path, nproc: int = 1, workers: int = 0):
    out = work / f"read-{read}-{nproc}-{time.time_ns()}"
    me = [str(Path(__file__).resolve()), "--worker", "--read", read, "--data", str(data), "--mds", str(mds)]
    me += ["--batch-size", str(batch_size), "--out", str(out), "--workers", str(workers)]
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.run(launcher + me, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-3000:])
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(nproc)]
    rows = sum(r["rows"] for r in ranks)
    return {
        "rows": rows,
        "rows_per_s": rows / max(r["seconds"] for r in ranks),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks),
    }


# -------------------------------------------------------------------------------------------- the baselines
def parquet_rows_per_second(data: Path, batch_size: int) -> dict:
    """pyarrow Parquet → torch tensors of the same columns (history as a [rows, H] matrix)."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import torch

    t0 = time.perf_counter()
    table = pq.read_table(data / "splits", columns=[*COLUMNS, "split"])
    table = table.filter(pc.equal(table["split"], "train"))
    rows = 0
    for rb in table.to_batches(max_chunksize=batch_size):
        users = torch.from_numpy(rb.column("user").to_numpy().astype(np.int32))
        torch.from_numpy(rb.column("item").to_numpy().astype(np.int32))
        torch.from_numpy(rb.column("history_len").to_numpy().astype(np.int32))
        flat = rb.column("history").flatten().to_numpy()
        torch.from_numpy(flat.astype(np.int32)).view(len(users), -1)
        rows += len(users)
    return {"rows": rows, "rows_per_s": rows / (time.perf_counter() - t0)}


def write_row_layout(data: Path, out: Path, max_rows: int) -> int:
    """The first `max_rows` train rows in the row layout (one MDS sample per row), as the Spark side wrote
    them before blocks."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from streaming import MDSWriter

    table = pq.read_table(
        data / "splits", columns=["user", "item", "timestamp", "rating", "history", "history_len", "split"]
    )
    table = table.filter(pc.equal(table["split"], "train")).slice(0, max_rows)
    columns = {"user": "int32", "item": "int32", "timestamp": "int64", "rating": "float32"}
    columns.update({"history": "ndarray:int32", "history_len": "int32"})
    frame = table.to_pandas()
    with MDSWriter(out=str(out), columns=columns, compression="zstd", size_limit="64mb") as w:
        for r in frame.itertuples(index=False):
            w.write(
                {
                    "user": np.int32(r.user),
                    "item": np.int32(r.item),
                    "timestamp": np.int64(r.timestamp),
                    "rating": np.float32(r.rating if r.rating == r.rating else np.nan),
                    "history": np.asarray(r.history, dtype=np.int32),
                    "history_len": np.int32(r.history_len),
                }
            )
    return len(frame)


# ------------------------------------------------------------------------------------------------------ main
def measure_size(size: str, work: Path, args) -> dict:
    from train_two_tower import build_dataset

    t0 = time.perf_counter()
    data = build_dataset({"synthetic": {"size": size}}, work / size)
    build_s = time.perf_counter() - t0
    mds = data / "mds" / "train"
    parquet = parquet_rows_per_second(data, args.batch_size)
    blocks = run_reader("blocks", data, mds, args.batch_size, work)
    rows_dir = work / f"rows-{size}"
    written = write_row_layout(data, rows_dir, args.row_layout_rows)
    rows = run_reader("rows", data, rows_dir, args.batch_size, work)
    print(
        f"[{size}] dataset {build_s:.0f}s; parquet {parquet['rows_per_s']:,.0f} rows/s; blocks "
        f"{blocks['rows_per_s']:,.0f}; rows {rows['rows_per_s']:,.0f} ({written} rows)",
        flush=True,
    )
    return {"size": size, "data": data, "parquet": parquet, "blocks": blocks, "rows": rows}


def training_part(data: Path, work: Path, args) -> dict:
    """Same global batch in both launches (each of 2 processes takes half), as benchmarks/train_two_tower.py."""
    from train_two_tower import torchrun

    cfg = {"data_root": str(data), "epochs": 2, "patience": 2, "batch_size": args.train_batch_size}
    one = torchrun(cfg, 1, work)
    # torchrun gives each of several processes one thread; one process alone uses both cores through threads
    one_thread = torchrun({**cfg, "num_threads": 1}, 1, work)
    two = torchrun({**cfg, "batch_size": args.train_batch_size // 2}, 2, work)
    reader = run_reader("blocks", data, data / "mds" / "train", args.train_batch_size // 2, work, nproc=2)
    return {
        "one": one.samples_per_second,
        "one_thread": one_thread.samples_per_second,
        "two": two.samples_per_second,
        "reader_two": reader["rows_per_s"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100k,1m,4m")
    ap.add_argument("--batch-size", type=int, default=1024, help="rows per batch of the reader tables")
    ap.add_argument("--train-batch-size", type=int, default=256, help="global batch of the training part")
    ap.add_argument("--row-layout-rows", type=int, default=200_000, help="rows the row-layout reader reads")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--read", choices=["blocks", "rows"])
    ap.add_argument("--data")
    ap.add_argument("--mds")
    ap.add_argument("--out")
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args()
    if args.worker:
        return read_worker(args)
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    work = Path(tempfile.mkdtemp(prefix="recsys-bench-loader-"))
    results = [measure_size(size, work, args) for size in args.sizes.split(",")]
    train = training_part(results[0]["data"], work, args)

    print(f"\n## MDS reader → model-ready Two Tower batches (batch {args.batch_size}, one process, 2 CPU cores)")
    print(
        "| size | train rows | Parquet → torch rows/s | blocks → KJT rows/s | blocks / Parquet | row layout → KJT "
        "rows/s | blocks / row layout | peak RSS blocks (MiB) | peak RSS row layout (MiB) | RSS ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        p, b, w = r["parquet"], r["blocks"], r["rows"]
        print(
            f"| {r['size']} | {b['rows']:,} | {p['rows_per_s']:,.0f} | {b['rows_per_s']:,.0f} | "
            f"{b['rows_per_s'] / p['rows_per_s']:.2f} | {w['rows_per_s']:,.0f} ({w['rows']:,} rows) | "
            f"{b['rows_per_s'] / w['rows_per_s']:.0f}× | {b['peak_rss_mb']:.0f} | {w['peak_rss_mb']:.0f} | "
            f"{b['peak_rss_mb'] / w['peak_rss_mb']:.2f} |"
        )
    half = args.train_batch_size // 2
    print(f"\n## reader vs. training, synthetic {results[0]['size']} (Two Tower, global batch {args.train_batch_size})")
    print("| what | rows/s |")
    print("|---|---|")
    print(f"| block reader → KJT alone, 2 processes of batch {half} (total) | {train['reader_two']:,.0f} |")
    print(f"| Two Tower training, 2 processes (total, training only) | {train['two']:,.0f} |")
    print(f"| Two Tower training, 1 process (2 threads) | {train['one']:,.0f} |")
    print(f"| Two Tower training, 1 process (1 thread) | {train['one_thread']:,.0f} |")
    print(f"| ratio reader / training (2 processes) | {train['reader_two'] / train['two']:.1f} |")
    print(f"| ratio training 2 processes / 1 process (2 threads) | {train['two'] / train['one']:.2f} |")
    print(f"| ratio training 2 processes / 1 process (1 thread) | {train['two'] / train['one_thread']:.2f} |")


if __name__ == "__main__":
    main()
