"""SASRec (Kang & McAuley 2018) as a reference baseline, in plain PyTorch.

Causal self-attention over each user's last `max_len` fit items in chronological (timestamp, item) order, item
embeddings tied with the output layer, trained on next-item prediction with a FULL softmax over the catalogue
at every position. It has the baselines' interface (``fit(task) -> self``, ``score(users)``), so `tune` chooses
its settings (epochs included) on the validation phase and refits them on train + validation for the test.

Run ``python -m recsys_assets.evaluation.sasrec --help`` for the numbers on MovieLens latest-small.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from recsys_assets.evaluation.protocol import EvalTask
from recsys_assets.models.attention import CausalSequenceEncoder

PAD = 0  # sequences hold item id + 1, so 0 is free for padding


class SASRecNet(nn.Module):
    """Item embeddings + the shared causal self-attention encoder (`models.attention.CausalSequenceEncoder`:
    learned positions, `blocks` pre-LN blocks, a final LayerNorm).

    Input: [B, L] shifted item ids (item + 1), left-padded with `PAD`, L <= max_len. Positions count from the
    end, so the most recent item always has the same position whatever the padding.
    """

    def __init__(self, num_items: int, *, hidden: int, blocks: int, heads: int, max_len: int, dropout: float):
        super().__init__()
        self.hidden = hidden
        self.item_embedding = nn.Embedding(num_items + 1, hidden, padding_idx=PAD)
        self.encoder = CausalSequenceEncoder(
            hidden=hidden, blocks=blocks, heads=heads, max_len=max_len, dropout=dropout
        )
        # small embeddings (the paper's Xavier init): N(0, 1) would make the tied output logits huge
        nn.init.xavier_normal_(self.item_embedding.weight)
        nn.init.xavier_normal_(self.encoder.position_embedding.weight)
        with torch.no_grad():
            self.item_embedding.weight[PAD].zero_()

    @property
    def output_embeddings(self) -> torch.Tensor:
        """[num_items, hidden]: the item embeddings without the padding row (tied output layer)."""
        return self.item_embedding.weight[1:]

    def forward(self, sequences: torch.Tensor) -> torch.Tensor:
        """[B, L] -> hidden states [B, L, hidden]."""
        return self.encoder(self.item_embedding(sequences) * self.hidden**0.5, sequences == PAD)


class SASRec:
    """SASRec baseline: ``fit(task)`` trains from scratch (seeded), ``score(users)`` = the user's last position's
    output · every item embedding.

    An epoch visits every user with at least two fit items once, in a seeded random order, `batch_size` users
    per step; the loss is the mean full-softmax cross-entropy of the next item over all of their positions.
    """

    def __init__(
        self,
        *,
        epochs: int = 10,
        hidden: int = 64,
        blocks: int = 2,
        heads: int = 1,
        max_len: int = 200,
        dropout: float = 0.2,
        lr: float = 3e-3,
        batch_size: int = 16,
        seed: int = 0,
        device: str | torch.device = "cpu",
        log: Callable[[str], None] | None = None,
    ) -> None:
        if epochs < 0 or max_len <= 0 or batch_size <= 0:
            raise ValueError("epochs must be >= 0, max_len and batch_size positive")
        self.epochs = epochs
        self.hidden = hidden
        self.blocks = blocks
        self.heads = heads
        self.max_len = max_len
        self.dropout = dropout
        self.lr = lr
        self.batch_size = batch_size
        self.seed = seed
        self.device = torch.device(device)
        self.log = log
        self.net_: SASRecNet | None = None
        self._task: EvalTask | None = None  # the fit task: score() reads its users' sequences

    def _padded(self, task: EvalTask, users: np.ndarray, length: int) -> torch.Tensor:
        """[len(users), L] shifted ids of each user's last `length` fit items, left-padded; L = the longest
        row, so batches of short sequences stay short."""
        ends = task.seq_indptr[users + 1]
        starts = np.maximum(task.seq_indptr[users], ends - length)
        lengths = ends - starts
        width = max(int(lengths.max(initial=0)), 1)
        out = np.full((len(users), width), PAD, dtype=np.int64)
        for row, (start, n) in enumerate(zip(starts, lengths)):
            if n:
                out[row, width - n :] = task.seq_items[start : start + n] + 1
        return torch.as_tensor(out, device=self.device)

    def fit(self, task: EvalTask) -> SASRec:
        self.net_ = None
        self._task = task
        lengths = np.diff(task.seq_indptr)
        trainable = np.flatnonzero(lengths >= 2)  # a user needs an input and a next item
        # fork: the seed fixes this fit (init, dropout, order) without touching the caller's global RNG
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            net = SASRecNet(
                task.num_items,
                hidden=self.hidden,
                blocks=self.blocks,
                heads=self.heads,
                max_len=self.max_len,
                dropout=self.dropout,
            ).to(self.device)
            optimizer = torch.optim.Adam(net.parameters(), lr=self.lr, betas=(0.9, 0.98))  # the paper's betas
            order_rng = np.random.default_rng(self.seed)
            net.train()
            for epoch in range(self.epochs):
                total, count = 0.0, 0
                shuffled = order_rng.permutation(trainable)
                for start in range(0, len(shuffled), self.batch_size):
                    users = shuffled[start : start + self.batch_size]
                    # the last max_len + 1 items: inputs are all but the last, targets all but the first
                    window = self._padded(task, users, self.max_len + 1)
                    inputs, targets = window[:, :-1], window[:, 1:]
                    hidden = net(inputs)
                    scored = inputs != PAD  # then the target is a real item too (left padding)
                    # logits only where there is a target: the [positions, items] matrix dominates the cost
                    logits = hidden[scored] @ net.output_embeddings.T
                    loss = F.cross_entropy(logits, targets[scored] - 1)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    positions = int(scored.sum())
                    total += float(loss.detach()) * positions
                    count += positions
                if self.log is not None:
                    self.log(f"SASRec epoch {epoch + 1}/{self.epochs}: loss {total / max(count, 1):.4f}")
        net.eval()
        self.net_ = net
        return self

    @torch.no_grad()
    def score(self, users: np.ndarray) -> torch.Tensor:
        if self.net_ is None or self._task is None:
            raise RuntimeError("SASRec is not fitted: call fit(task) first")
        users = np.asarray(users, dtype=np.int64)
        sequences = self._padded(self._task, users, self.max_len)
        last_hidden = self.net_(sequences)[:, -1]  # the next item after the whole fit sequence
        return last_hidden @ self.net_.output_embeddings.T


# --------------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    from recsys_assets.evaluation.baselines import _default_ratings, load_movielens_splits, tune

    parser = argparse.ArgumentParser(description="SASRec tuned on validation, on a MovieLens ratings.csv.")
    parser.add_argument("--ratings", type=Path, default=_default_ratings())
    parser.add_argument("--epochs", default="5,10", help="comma list: the grid tuned on validation")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--max-len", type=int, default=200)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    splits, num_users, num_items = load_movielens_splits(args.ratings)
    settings = {
        "hidden": args.hidden,
        "blocks": args.blocks,
        "heads": args.heads,
        "max_len": args.max_len,
        "dropout": args.dropout,
        "lr": args.lr,
        "batch_size": args.batch_size,
    }
    print(f"{args.ratings}: {len(splits)} interactions, {num_users} users, {num_items} items; SASRec {settings}")
    t0 = time.perf_counter()
    tuned = tune(
        lambda **p: SASRec(**settings, **p, device=args.device),
        {"epochs": [int(e) for e in args.epochs.split(",")]},
        splits,
        num_users=num_users,
        num_items=num_items,
        log=lambda line: print(f"  {line}  ({time.perf_counter() - t0:.0f}s)", flush=True),
    )
    for phase, result in (("validation", tuned.validation), ("test", tuned.test)):
        m = result.metrics
        print(
            f"SASRec {tuned.params} {phase:<10} HR@10 {m['hr@10']:.4f}  NDCG@10 {m['ndcg@10']:.4f}  "
            f"HR@100 {m['hr@100']:.4f}  (n={result.n_users})"
        )
    print(f"tune + refit: {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
