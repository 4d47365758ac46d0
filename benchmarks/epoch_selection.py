"""Which early-stopping rule picks the Two Tower's epoch count best, judged on validation users only.

Reproduce (prints the table below; about 2.5 minutes per seed on 2 cores):
    V=$(bash scripts/bootstrap.sh); PYSPARK_PYTHON=$V/bin/python $V/bin/python benchmarks/epoch_selection.py \
        [--movielens ../shared/data/ml-latest-small] [--data-root <an mds_splits folder>] [--seeds 5] [--epochs 16]

Each seed trains the validation phase for a fixed number of epochs (no early stopping) and keeps every epoch's
rank of each validation user's held-out item. Then, for many random halvings of the users, each rule (a window
of epochs averaged into the signal, and a patience) picks an epoch on half A, as training.loop would, and the
table gives half B's NDCG@10 at that epoch: a rule that picks noise scores lower on the other half. Test rows
are never read.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

RULES = ((1, 3), (1, 5), (2, 3), (3, 3), (3, 5), (5, 3))  # (window, patience)


def epoch_ranks(data_root: str, seed: int, epochs: int) -> np.ndarray:
    """[epochs, users] 0-based ranks of the validation items after each epoch of a fixed-epoch validation fit."""
    import recsys_assets.evaluation.protocol as protocol
    from recsys_assets.training.two_tower import train_two_tower

    seen: list[np.ndarray] = []
    metrics_from_ranks = protocol.metrics_from_ranks

    def keeping(ranks, ks):  # the trainer's evaluation computes the ranks; this keeps a copy of each epoch's
        seen.append(np.asarray(ranks.cpu() if hasattr(ranks, "cpu") else ranks, dtype=np.float64).copy())
        return metrics_from_ranks(ranks, ks)

    protocol.metrics_from_ranks = keeping
    try:
        train_two_tower(
            {
                "data_root": data_root,
                "epochs": epochs,
                "eval_phase": "validation",
                "early_stopping": False,
                "seed": seed,
            }
        )
    finally:
        protocol.metrics_from_ranks = metrics_from_ranks
    return np.stack(seen[:epochs])


def split_half_table(ranks_per_seed: list[np.ndarray], splits: int, seed: int = 0) -> list[tuple]:
    from recsys_assets.training.loop import Selection, replay_selection

    rng = np.random.default_rng(seed)
    out = {rule: ([], [], []) for rule in RULES}
    best_possible = []
    for ranks in ranks_per_seed:
        gain = np.where(ranks < 10, 1.0 / np.log2(ranks + 2.0), 0.0)  # NDCG@10 of one held-out item
        users = gain.shape[1]
        for _ in range(splits):
            order = rng.permutation(users)
            a, b = gain[:, order[: users // 2]].mean(1), gain[:, order[users // 2 :]].mean(1)
            best_possible.append(b.max())
            for rule in RULES:
                epoch, ran = replay_selection(
                    a.tolist(), Selection("ndcg@10", window=rule[0], patience=rule[1], restore_best=False)
                )
                for column, value in zip(out[rule], (b[epoch], epoch + 1, ran)):
                    column.append(value)
    rows = [(*rule, *(float(np.mean(c)) for c in cols), float(np.std(cols[1]))) for rule, cols in out.items()]
    return rows + [("half B's own best epoch (not a rule)", "", float(np.mean(best_possible)), "", "", "")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--movielens", default=str(REPO.parent / "shared" / "data" / "ml-latest-small"))
    ap.add_argument("--data-root", help="an mds_splits folder (skips building the data assets)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--splits", type=int, default=200, help="random halvings of the users per seed")
    args = ap.parse_args()
    data_root = args.data_root
    if data_root is None:
        movielens = Path(args.movielens)
        if not (movielens / "ratings.csv").exists():
            sys.exit(f"skipped: {movielens}/ratings.csv is absent (pass --movielens or --data-root)")
        from train_two_tower import build_dataset

        work = Path(tempfile.mkdtemp(prefix="epoch-selection-"))
        data_root = str(build_dataset({"source": "movielens", "movielens_path": str(movielens)}, work / "ml"))
    ranks = []
    for seed in range(args.seeds):
        ranks.append(epoch_ranks(data_root, seed, args.epochs))
        curve = np.where(ranks[-1] < 10, 1.0 / np.log2(ranks[-1] + 2.0), 0.0).mean(1)
        print(f"seed {seed}: validation NDCG@10 per epoch {np.round(curve, 4).tolist()}", flush=True)
    print(
        f"\n{args.seeds} seeds x {args.splits} halvings of {ranks[0].shape[1]} validation users, {args.epochs} epochs"
    )
    print("| window | patience | half B NDCG@10 at the epoch chosen on half A | chosen epochs | epochs run | sd |")
    print("|---|---|---|---|---|---|")
    for row in split_half_table(ranks, args.splits):
        print("| " + " | ".join(_cell(v) for v in row) + " |")


def _cell(value) -> str:
    if not isinstance(value, float):
        return str(value)
    return f"{value:.4f}" if value < 1 else f"{value:.2f}"


if __name__ == "__main__":
    main()
