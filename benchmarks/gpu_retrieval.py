"""Exact top-k retrieval and the full-ranking evaluator on CPU tensors vs CUDA tensors.

Times the project's own code paths on random vectors (inner product, dim 64):
- `exact_top_k` (recsys_assets.serving.retrieval): batched scores + exclusions + top-k, results back in numpy;
- the evaluator: per batch `queries @ items.T` then `ranks_from_scores` (recsys_assets.evaluation.protocol),
  the rank of each query's target with its excluded items removed (what every epoch's validation does).
Item vectors live on the device before timing (a resident index); queries too. Each figure is the median of
`--repeats` timed runs after one warm-up; CUDA runs are synchronized. Where CUDA exists, the results are
checked against the CPU ones (ranks equal; top-k lists equal up to ties).

    python benchmarks/gpu_retrieval.py                              # 2048 queries; 10k, 100k, 500k items
    python benchmarks/gpu_retrieval.py --items 1000000 --queries 8192

Without a GPU it prints the CPU column and says so.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recsys_assets.evaluation.protocol import ranks_from_scores  # noqa: E402
from recsys_assets.serving.retrieval import exact_top_k  # noqa: E402


def make_inputs(num_queries: int, num_items: int, dim: int, excluded: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    qv = torch.nn.functional.normalize(torch.randn(num_queries, dim, generator=g), dim=1)
    iv = torch.nn.functional.normalize(torch.randn(num_items, dim, generator=g), dim=1)
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 2 * excluded + 1, size=num_queries)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    indices = rng.integers(0, num_items, size=int(indptr[-1])).astype(np.int64)
    targets = rng.integers(0, num_items, size=num_queries).astype(np.int64)
    return qv, iv, indptr, indices, targets


def batch_rows(num_items: int, max_elements: int) -> int:
    """Queries per batch so that one [batch, items] score matrix stays under `max_elements`."""
    return int(max(1, min(1024, max_elements // num_items)))


def run_top_k(qv, iv, indptr, indices, k, batch, device):
    return exact_top_k(qv, iv, k, indptr, indices, batch_size=batch)


def run_ranks(qv, iv, indptr, indices, targets, batch, device):
    out = []
    for s in range(0, qv.shape[0], batch):
        e = min(s + batch, qv.shape[0])
        scores = qv[s:e] @ iv.T
        out.append(ranks_from_scores(scores, targets[s:e], indptr[s : e + 1], indices).cpu())
    return torch.cat(out)


def timed(fn, device: torch.device, repeats: int):
    def once():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out, time.perf_counter() - t0

    out, _ = once()  # warm-up (kernel selection, allocator)
    times = [once()[1] for _ in range(repeats)]
    return out, statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=2048)
    p.add_argument("--items", type=int, nargs="+", default=[10_000, 100_000, 500_000])
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--excluded", type=int, default=30, help="mean excluded (already seen) items per query")
    p.add_argument(
        "--max-score-elements",
        type=int,
        default=1 << 27,
        help="cap on one [batch, items] score matrix (memory); sets the query batch",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--accel-device",
        default=None,
        help="device of the second column (default: cuda where available; 'cpu' only exercises the "
        "comparison code on a machine without a GPU)",
    )
    args = p.parse_args(argv)

    if args.accel_device:
        cuda = torch.device(args.accel_device)
    else:
        cuda = torch.device("cuda") if torch.cuda.is_available() else None
    print(
        f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, "
        f"CUDA: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'not available'}"
        + (f", second column on {cuda}" if cuda is not None and cuda.type != "cuda" else "")
    )
    print(
        f"{args.queries} queries, dim {args.dim}, k {args.k}, ~{args.excluded} excluded items per query, "
        f"median of {args.repeats} runs after a warm-up"
    )
    header = f"{'operation':<26}{'items':>10}{'batch':>7}{'CPU ms':>11}{'CUDA ms':>11}{'CPU/CUDA':>10}  check"
    print(header)
    print("-" * len(header))
    for n in args.items:
        qv, iv, indptr, indices, targets = make_inputs(args.queries, n, args.dim, args.excluded, args.seed)
        batch = batch_rows(n, args.max_score_elements)
        cpu = torch.device("cpu")
        jobs = {
            "exact_top_k": lambda q, i, dev: run_top_k(q, i, indptr, indices, args.k, batch, dev),
            "evaluator (ranks)": lambda q, i, dev: run_ranks(q, i, indptr, indices, targets, batch, dev),
        }
        for name, job in jobs.items():
            cpu_out, cpu_s = timed(lambda: job(qv, iv, cpu), cpu, args.repeats)
            if cuda is not None:
                q_d, i_d = qv.to(cuda), iv.to(cuda)
                cuda_out, cuda_s = timed(lambda: job(q_d, i_d, cuda), cuda, args.repeats)
                if name == "exact_top_k":
                    same = np.mean([len(np.intersect1d(a, b)) / len(a) for a, b in zip(cpu_out[0], cuda_out[0])])
                    check = f"top-k overlap {same:.4f}"
                else:
                    diff = (cpu_out - cuda_out).abs()
                    check = f"ranks equal {float((diff == 0).float().mean()):.4f}, max |diff| {int(diff.max())}"
                print(
                    f"{name:<26}{n:>10,}{batch:>7}{cpu_s * 1e3:>11.1f}{cuda_s * 1e3:>11.1f}"
                    f"{cpu_s / cuda_s:>9.1f}x  {check}"
                )
            else:
                print(f"{name:<26}{n:>10,}{batch:>7}{cpu_s * 1e3:>11.1f}{'-':>11}{'-':>10}  -")
    if cuda is None:
        print("no GPU here: CUDA column not measured")
    return 0


if __name__ == "__main__":
    sys.exit(main())
