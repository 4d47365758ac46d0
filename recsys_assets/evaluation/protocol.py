"""The evaluation protocol: full ranking, leave-last-out.

Input is a splits table (pandas): columns ``user``, ``item``, ``timestamp``, ``split`` with ``split`` in
{"train", "validation", "test"} and contiguous 0-based integer ids (see `recsys_assets.data.schema`).
Per user, interactions are ordered by (timestamp, item).

Two phases:

- ``"validation"``: fit on the train rows; for each user with a validation row, rank the validation item
  over ALL items, the user's train items excluded.
- ``"test"``: fit on train + validation rows; rank the test item, the user's train and validation items
  excluded.

The rank of the held-out item is the number of non-excluded candidates with a STRICTLY higher score (ties
count in favour of the held-out item; the held-out item itself is never excluded). From the ranks:
``HR@K = mean(rank < K)`` and ``NDCG@K = mean(1 / log2(rank + 2) if rank < K else 0)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from recsys_assets.data.schema import FIT_SPLITS_OF_PHASE, ITEM, SPLIT, SPLITS, TIMESTAMP, USER

PHASES = ("validation", "test")
DEFAULT_KS = (10, 100)

# What a scorer may return: one row of scores per requested user, one column per item.
Scores = torch.Tensor | np.ndarray
ScoreFn = Callable[[np.ndarray], Scores]


def _csr_from_pairs(rows: np.ndarray, cols: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """indptr/indices of rows already sorted by row."""
    counts = np.bincount(rows, minlength=n_rows)
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return indptr, cols.astype(np.int64, copy=False)


def gather_csr(indptr: np.ndarray, indices: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sub-CSR made of `rows` (in that order) of a CSR matrix."""
    starts = indptr[rows]
    lengths = indptr[rows + 1] - starts
    new_indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_indptr[1:])
    offsets = np.repeat(starts - new_indptr[:-1], lengths) + np.arange(new_indptr[-1], dtype=np.int64)
    return new_indptr, indices[offsets]


@dataclasses.dataclass(frozen=True, eq=False)
class EvalTask:
    """One phase of the protocol, ready to evaluate: what to fit on, and what to rank for whom.

    Attributes:
        phase: "validation" or "test".
        num_users, num_items: id cardinalities (scores have `num_items` columns).
        fit: the interactions a model may fit on (train, or train + validation), columns of the splits table
            without ``split``, sorted by (user, timestamp, item), index reset.
        users: int64 [Q], the query users (sorted ascending), each with exactly one held-out row.
        targets: int64 [Q], the held-out item of each query user.
        exclude_indptr, exclude_indices: CSR (int64) aligned with `users`: the distinct items of each query
            user in `fit` (sorted by item id) which are removed from that user's ranking.
        user_items_indptr, user_items_indices: CSR (int64) over ALL users: the distinct fit items of each user
            (sorted by item id); a binary user x item matrix for models such as EASE.
        seq_indptr, seq_items: CSR (int64) over ALL users: each user's fit items in chronological
            (timestamp, item) order, repeats kept; for sequence models.
    """

    phase: str
    num_users: int
    num_items: int
    fit: pd.DataFrame
    users: np.ndarray
    targets: np.ndarray
    exclude_indptr: np.ndarray
    exclude_indices: np.ndarray
    user_items_indptr: np.ndarray
    user_items_indices: np.ndarray
    seq_indptr: np.ndarray
    seq_items: np.ndarray

    @property
    def n_queries(self) -> int:
        return int(len(self.users))

    def sequence(self, user: int) -> np.ndarray:
        """The chronological fit items of one user (possibly empty)."""
        return self.seq_items[self.seq_indptr[user] : self.seq_indptr[user + 1]]

    @property
    def last_items(self) -> np.ndarray:
        """int64 [num_users]: each user's most recent fit item, -1 for users without fit interactions."""
        last = np.full(self.num_users, -1, dtype=np.int64)
        has = self.seq_indptr[1:] > self.seq_indptr[:-1]
        last[has] = self.seq_items[self.seq_indptr[1:][has] - 1]
        return last

    def item_counts(self) -> np.ndarray:
        """int64 [num_items]: number of fit interactions per item."""
        return np.bincount(self.fit[ITEM].to_numpy(), minlength=self.num_items).astype(np.int64)

    @classmethod
    def from_splits(
        cls,
        splits: pd.DataFrame,
        phase: str,
        *,
        num_users: int | None = None,
        num_items: int | None = None,
    ) -> EvalTask:
        """Build the task of `phase` from a splits table. Cardinalities default to max id + 1."""
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
        missing = {USER, ITEM, TIMESTAMP, SPLIT} - set(splits.columns)
        if missing:
            raise ValueError(f"splits table lacks columns {sorted(missing)}")
        unknown = set(pd.unique(splits[SPLIT])) - set(SPLITS)
        if unknown:
            raise ValueError(f"unknown split values {sorted(map(str, unknown))}; expected {SPLITS}")

        user_all = splits[USER].to_numpy(dtype=np.int64)
        item_all = splits[ITEM].to_numpy(dtype=np.int64)
        if len(splits) and (user_all.min() < 0 or item_all.min() < 0):
            raise ValueError("ids must be contiguous 0-based ints (found a negative id)")
        n_users = int(user_all.max()) + 1 if num_users is None and len(splits) else int(num_users or 0)
        n_items = int(item_all.max()) + 1 if num_items is None and len(splits) else int(num_items or 0)
        if len(splits) and (user_all.max() >= n_users or item_all.max() >= n_items):
            raise ValueError(
                f"ids out of range: max user {user_all.max()} (num_users {n_users}), "
                f"max item {item_all.max()} (num_items {n_items})"
            )

        held = splits.loc[splits[SPLIT] == phase, [USER, ITEM]].sort_values(USER, kind="stable")
        users = held[USER].to_numpy(dtype=np.int64)
        if len(users) > 1 and np.any(users[1:] == users[:-1]):
            dup = int(users[1:][users[1:] == users[:-1]][0])
            raise ValueError(f"user {dup} has more than one {phase} row; the protocol holds out one per user")
        fit_rows = splits.loc[splits[SPLIT].isin(FIT_SPLITS_OF_PHASE[phase])]
        return cls.of_fit_rows(fit_rows, phase, n_users, n_items, users=users, targets=held[ITEM].to_numpy(np.int64))

    @classmethod
    def of_fit_rows(
        cls,
        fit_rows: pd.DataFrame,
        phase: str,
        num_users: int,
        num_items: int,
        *,
        users: np.ndarray | None = None,
        targets: np.ndarray | None = None,
    ) -> EvalTask:
        """The task of given fit rows (user, item, timestamp[, split]) and query users (none by default: a task
        to fit models on, such as the ranker phase's candidate sources: data/phases.py)."""
        users = np.zeros(0, np.int64) if users is None else users
        targets = np.zeros(0, np.int64) if targets is None else targets
        fit = (
            fit_rows.drop(columns=[c for c in (SPLIT,) if c in fit_rows.columns])
            .sort_values([USER, TIMESTAMP, ITEM], kind="stable")
            .reset_index(drop=True)
        )
        fit_users = fit[USER].to_numpy(dtype=np.int64)
        fit_items = fit[ITEM].to_numpy(dtype=np.int64)
        seq_indptr, seq_items = _csr_from_pairs(fit_users, fit_items, num_users)

        codes = np.unique(fit_users * num_items + fit_items)  # distinct (user, item), sorted by user then item
        ui_indptr, ui_indices = _csr_from_pairs(codes // num_items, codes % num_items, num_users)
        ex_indptr, ex_indices = gather_csr(ui_indptr, ui_indices, users)

        return cls(
            phase=phase,
            num_users=num_users,
            num_items=num_items,
            fit=fit,
            users=users,
            targets=targets,
            exclude_indptr=ex_indptr,
            exclude_indices=ex_indices,
            user_items_indptr=ui_indptr,
            user_items_indices=ui_indices,
            seq_indptr=seq_indptr,
            seq_items=seq_items,
        )


@dataclasses.dataclass(frozen=True, eq=False)
class EvalResult(Mapping[str, float]):
    """Metrics of one evaluation, readable as a dict: ``result["ndcg@10"]``.

    Attributes:
        metrics: {"hr@K": ..., "ndcg@K": ...} for each K, in the order of `ks`.
        n_users: number of query users ranked.
        ranks: int64 [n_users], the rank of each query user's held-out item (aligned with `users`).
        users: int64 [n_users], the query users.
        phase: the phase evaluated, when known.
    """

    metrics: dict[str, float]
    n_users: int
    ranks: np.ndarray
    users: np.ndarray
    phase: str | None = None

    def __getitem__(self, key: str) -> float:
        return self.metrics[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.metrics)

    def __len__(self) -> int:
        return len(self.metrics)

    def as_dict(self) -> dict[str, float]:
        return dict(self.metrics)

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v:.4f}" for k, v in self.metrics.items())
        return f"EvalResult(phase={self.phase!r}, n_users={self.n_users}, {shown})"


def _as_index_tensor(values: np.ndarray | torch.Tensor | Sequence[int], device: torch.device) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.to(device=device, dtype=torch.int64)
    return torch.as_tensor(np.asarray(values, dtype=np.int64), device=device)


def ranks_from_scores(
    scores: Scores,
    targets: np.ndarray | torch.Tensor,
    exclude_indptr: np.ndarray | torch.Tensor,
    exclude_indices: np.ndarray | torch.Tensor,
) -> torch.Tensor:
    """Rank of each row's target among the row's non-excluded items.

    Args:
        scores: [B, N] float scores (torch on any device, or numpy); not modified.
        targets: [B] target item per row.
        exclude_indptr: [B + 1] CSR row pointers of the excluded items. A window of a larger CSR is fine: the
            row items are ``exclude_indices[exclude_indptr[i]:exclude_indptr[i + 1]]``.
        exclude_indices: the excluded item ids.

    Returns:
        int64 tensor [B] on the device of `scores`: the number of non-excluded items whose score is strictly
        higher than the target's. The target is never excluded, even when listed.
    """
    scores_t = torch.as_tensor(scores)
    if scores_t.ndim != 2:
        raise ValueError(f"scores must be 2-D [users, items], got shape {tuple(scores_t.shape)}")
    if scores_t.is_complex() or not (scores_t.is_floating_point() or scores_t.dtype in _INT_DTYPES):
        raise TypeError(f"scores must be real numbers, got {scores_t.dtype}")
    device = scores_t.device
    n_rows, n_items = scores_t.shape

    targets_t = _as_index_tensor(targets, device)
    if targets_t.shape != (n_rows,):
        raise ValueError(f"targets must have shape ({n_rows},), got {tuple(targets_t.shape)}")
    indptr = np.asarray(exclude_indptr.cpu() if isinstance(exclude_indptr, torch.Tensor) else exclude_indptr)
    indptr = indptr.astype(np.int64, copy=False)
    if indptr.shape != (n_rows + 1,):
        raise ValueError(f"exclude_indptr must have shape ({n_rows + 1},), got {indptr.shape}")
    if np.any(np.diff(indptr) < 0):
        raise ValueError("exclude_indptr must be non-decreasing")
    lo, hi = int(indptr[0]), int(indptr[-1])
    indices_t = _as_index_tensor(exclude_indices[lo:hi], device)
    if indices_t.numel() != hi - lo:
        raise ValueError("exclude_indices is shorter than exclude_indptr says")

    if n_rows == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    if bool(((targets_t < 0) | (targets_t >= n_items)).any()):
        raise ValueError(f"targets out of range [0, {n_items})")
    if indices_t.numel() and bool(((indices_t < 0) | (indices_t >= n_items)).any()):
        raise ValueError(f"excluded items out of range [0, {n_items})")

    target_scores = scores_t.gather(1, targets_t[:, None])  # [B, 1]
    if scores_t.is_floating_point() and bool(torch.isnan(target_scores).any()):
        raise ValueError("a held-out item has a NaN score")
    higher = scores_t > target_scores  # NaN candidates compare False: they never outrank the target
    if indices_t.numel():
        counts = torch.as_tensor(np.diff(indptr), device=device)
        rows = torch.repeat_interleave(torch.arange(n_rows, device=device), counts)
        higher[rows, indices_t] = False
    return higher.sum(dim=1, dtype=torch.int64)


_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def metrics_from_ranks(ranks: np.ndarray | torch.Tensor, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """{"hr@K", "ndcg@K"} for each K from 0-based ranks (NaN for an empty set of ranks)."""
    r = np.asarray(ranks.cpu() if isinstance(ranks, torch.Tensor) else ranks, dtype=np.float64)
    out: dict[str, float] = {}
    for k in ks:
        if int(k) != k or k <= 0:
            raise ValueError(f"cut-offs must be positive ints, got {k!r}")
        k = int(k)
        hit = r < k
        gain = np.where(hit, 1.0 / np.log2(r + 2.0), 0.0)
        out[f"hr@{k}"] = float(hit.mean()) if len(r) else float("nan")
        out[f"ndcg@{k}"] = float(gain.mean()) if len(r) else float("nan")
    return out


def evaluate(
    score_fn: ScoreFn,
    task: EvalTask,
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = 1024,
) -> EvalResult:
    """Rank every query user's held-out item with `score_fn` and report HR@K / NDCG@K.

    `score_fn(users)` gets an int64 numpy array of user ids and returns scores [len(users), num_items]
    (torch on any device, computed there, or numpy). The user's excluded items are treated as -inf.
    """
    if batch_size <= 0:
        raise ValueError("batch_size must be positive")
    n = task.n_queries
    ranks = np.zeros(n, dtype=np.int64)
    for start in range(0, n, batch_size):
        end = min(start + batch_size, n)
        users = task.users[start:end]
        scores = score_fn(users.copy())
        shape = tuple(scores.shape)
        if shape != (end - start, task.num_items):
            raise ValueError(f"score_fn returned shape {shape}; expected ({end - start}, {task.num_items})")
        with torch.no_grad():
            batch_ranks = ranks_from_scores(
                scores, task.targets[start:end], task.exclude_indptr[start : end + 1], task.exclude_indices
            )
        ranks[start:end] = batch_ranks.cpu().numpy()
    return EvalResult(
        metrics=metrics_from_ranks(ranks, ks),
        n_users=n,
        ranks=ranks,
        users=task.users.copy(),
        phase=task.phase,
    )


def leave_last_out_splits(
    interactions: pd.DataFrame,
    *,
    user_col: str = USER,
    item_col: str = ITEM,
    time_col: str = TIMESTAMP,
    min_interactions: int = 3,
) -> pd.DataFrame:
    """Reference (pandas) leave-last-out split: per user sort by (timestamp, item); last -> test, second to
    last -> validation, the rest -> train. Users with fewer than `min_interactions` rows stay all train.

    Returns a copy sorted by (user, timestamp, item), index reset, with a ``split`` column added.
    """
    df = interactions.sort_values([user_col, time_col, item_col], kind="stable").reset_index(drop=True)
    grouped = df.groupby(user_col, sort=False)
    size = grouped[user_col].transform("size").to_numpy()
    from_end = size - grouped.cumcount().to_numpy() - 1  # 0 = the user's last interaction
    split = np.full(len(df), "train", dtype=object)
    eligible = size >= min_interactions
    split[eligible & (from_end == 0)] = "test"
    split[eligible & (from_end == 1)] = "validation"
    df[SPLIT] = split
    return df


def index_interactions(
    raw: pd.DataFrame,
    *,
    user_col: str = USER,
    item_col: str = ITEM,
    time_col: str = TIMESTAMP,
) -> tuple[pd.DataFrame, int, int]:
    """Map raw user / item ids to contiguous 0-based ints in ascending raw-id order (so sorting by item gives
    the same order before and after). Returns (df with columns user, item, timestamp + the other columns,
    num_users, num_items)."""
    user_ids, users = np.unique(raw[user_col].to_numpy(), return_inverse=True)
    item_ids, items = np.unique(raw[item_col].to_numpy(), return_inverse=True)
    df = raw.drop(columns=[user_col, item_col, time_col])
    df.insert(0, TIMESTAMP, raw[time_col].to_numpy(dtype=np.int64))
    df.insert(0, ITEM, items.astype(np.int64))
    df.insert(0, USER, users.astype(np.int64))
    return df.reset_index(drop=True), int(len(user_ids)), int(len(item_ids))
