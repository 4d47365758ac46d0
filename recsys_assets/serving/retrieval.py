"""Candidate retrieval with a trained Two Tower: query states, exact top-k (torch), an approximate faiss index.

No Dagster, no Spark. Used by the retrieval assets and the evaluation.

- `query_states(splits, phase, ...)`: the phase's queries (data/phases.py): its held-out rows (each with the
  history before it, most recent first) or, with ``all_users``, the user's whole sequence for users without a
  held-out row. Excluded items = the items of the user's rows before the query.
- `query_vectors`: the query tower over those states.
- `exact_top_k`: batched matrix product + top-k with exclusions, in torch (CPU or CUDA tensors).
- `HnswIndex`: faiss HNSW inner-product index over the item vectors; `search` filters exclusions.
- `recall_at_k`: overlap of approximate and exact top-k lists.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from recsys_assets.data.schema import (
    HISTORY,
    HISTORY_LEN,
    ITEM,
    PAD_ID,
    POSITION,
    QUERY_ID,
    RANKER_WINDOW,
    SPLIT,
    TIMESTAMP,
    USER,
)

NO_TARGET = -1


@dataclasses.dataclass
class QueryStates:
    """One row per query of a phase (data/phases.py), sorted by (user, position)."""

    phase: str
    users: np.ndarray  # int64 [Q]
    targets: np.ndarray  # int64 [Q]; NO_TARGET for a user without a held-out row (the serving query at the end)
    timestamps: np.ndarray  # int64 [Q]: the held-out row's time, else one after the user's last row
    history: np.ndarray  # int32 [Q, H], most recent first, PAD_ID padded
    history_len: np.ndarray  # int32 [Q]
    exclude_indptr: np.ndarray  # int64 [Q + 1]: CSR of the items of the user's rows before the query
    exclude_indices: np.ndarray  # int64 (distinct, sorted per query): removed from its ranking
    positions: np.ndarray  # int64 [Q]: the query's place in the user's order (1-based)
    query_ids: np.ndarray  # int64 [Q]: data.phases.query_ids

    @property
    def n(self) -> int:
        return int(len(self.users))

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "phase": self.phase,
                USER: self.users.astype(np.int32),
                "target": self.targets.astype(np.int32),
                TIMESTAMP: self.timestamps.astype(np.int64),
                HISTORY: list(self.history.astype(np.int32)),
                HISTORY_LEN: self.history_len.astype(np.int32),
                POSITION: self.positions.astype(np.int32),
                QUERY_ID: self.query_ids.astype(np.int64),
            }
        )


def query_states(
    splits: pd.DataFrame,
    phase: str,
    *,
    num_users: int,
    num_items: int,
    history_length: int,
    all_users: bool = False,
) -> QueryStates:
    """The queries of `phase`: its held-out rows (data.phases.PHASES) with the history before each, and with
    `all_users`, one query after the last row of every user without a held-out row. Excluded items: those of
    the user's rows before the query (for validation and test: the user's fit items, as in the evaluator).
    `splits`: the splits table (user, item, timestamp, split, history, history_len, position, ranker_window)."""
    from recsys_assets.data.phases import phase as phase_of
    from recsys_assets.data.phases import query_ids
    from recsys_assets.models.features import stack_history

    rows = splits.sort_values([USER, POSITION], kind="stable")
    users_all = rows[USER].to_numpy(np.int64)
    if len(rows) and (users_all.max() >= num_users or rows[ITEM].max() >= num_items):
        raise ValueError(f"ids out of range of num_users={num_users} / num_items={num_items}")
    held = rows.loc[phase_of(phase).queries.mask(rows)]
    users = held[USER].to_numpy(np.int64)
    pos = held[POSITION].to_numpy(np.int64)
    train_rows = np.bincount(users_all[rows[SPLIT].to_numpy() == "train"], minlength=num_users)
    steps = np.where(held[RANKER_WINDOW].to_numpy(bool), train_rows[users] - pos + 1, 0)
    parts = [
        (users, held[ITEM].to_numpy(np.int64), held[TIMESTAMP].to_numpy(np.int64), pos, steps),
        stack_history(held[HISTORY].to_numpy(), history_length),
        np.minimum(held[HISTORY_LEN].to_numpy(np.int32), history_length).astype(np.int32),
    ]
    if all_users:
        parts = _with_end_queries(parts, rows, num_users, history_length)
    (users, targets, ts, pos, steps), hist, hlen = parts
    ex_indptr, ex_indices = _items_before(rows, users, pos, num_users, num_items)
    return QueryStates(phase, users, targets, ts, hist, hlen, ex_indptr, ex_indices, pos, query_ids(users, steps))


def _with_end_queries(parts, rows: pd.DataFrame, num_users: int, history_length: int):
    """`parts` + one query after the last row of each user who has rows but no query, sorted by (user, pos)."""
    (users, targets, ts, pos, steps), hist, hlen = parts
    counts = np.bincount(rows[USER].to_numpy(np.int64), minlength=num_users)
    extra = np.setdiff1d(np.flatnonzero(counts), users)
    if not len(extra):
        return parts
    starts = np.concatenate([[0], np.cumsum(counts)])
    items = rows[ITEM].to_numpy(np.int64)
    e_hist = np.full((len(extra), history_length), PAD_ID, dtype=np.int32)
    for i, u in enumerate(extra):
        seq = items[starts[u] : starts[u + 1]][::-1][:history_length]
        e_hist[i, : len(seq)] = seq
    e_len = np.minimum(counts[extra], history_length).astype(np.int32)
    e_ts = rows.groupby(USER)[TIMESTAMP].max().reindex(extra).to_numpy(np.int64) + 1
    order = np.lexsort((np.concatenate([pos, counts[extra] + 1]), np.concatenate([users, extra])))
    cat = lambda a, b: np.concatenate([a, b])[order]  # noqa: E731
    no_target = np.full(len(extra), NO_TARGET, dtype=np.int64)
    columns = (
        cat(users, extra),
        cat(targets, no_target),
        cat(ts, e_ts),
        cat(pos, counts[extra] + 1),
        cat(steps, np.zeros(len(extra), np.int64)),
    )
    return columns, cat(hist, e_hist), cat(hlen, e_len)


def _items_before(
    rows: pd.DataFrame, users: np.ndarray, positions: np.ndarray, num_users: int, num_items: int
) -> tuple[np.ndarray, np.ndarray]:
    """CSR [Q] of the distinct items (sorted) of each user's rows before the query's position. `rows`: sorted
    by (user, position), positions 1..n per user."""
    counts = np.bincount(rows[USER].to_numpy(np.int64), minlength=num_users)
    starts = np.concatenate([[0], np.cumsum(counts)])[users]
    lengths = np.minimum(positions - 1, counts[users])
    indptr = np.zeros(len(users) + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    offsets = np.repeat(starts - indptr[:-1], lengths) + np.arange(indptr[-1], dtype=np.int64)
    query = np.repeat(np.arange(len(users), dtype=np.int64), lengths)
    codes = np.unique(query * num_items + rows[ITEM].to_numpy(np.int64)[offsets])
    distinct = np.bincount(codes // num_items, minlength=len(users))
    out_indptr = np.zeros(len(users) + 1, dtype=np.int64)
    np.cumsum(distinct, out=out_indptr[1:])
    return out_indptr, codes % num_items


@torch.no_grad()
def query_vectors(two_tower, store, states: QueryStates, batch_size: int = 2048) -> torch.Tensor:
    """[Q, d] query-tower vectors of the states (on the store's device)."""
    from recsys_assets.models.two_tower import QueryEncoder

    enc = QueryEncoder(two_tower, store)
    device = store.user_attrs.device
    out = []
    for s in range(0, states.n, batch_size):
        e = min(s + batch_size, states.n)
        out.append(
            enc(
                torch.as_tensor(states.users[s:e], device=device),
                torch.as_tensor(states.history[s:e], device=device),
                torch.as_tensor(states.history_len[s:e], device=device),
            )
        )
    return torch.cat(out) if out else torch.zeros(0, two_tower.output_dim)


def catalogue_scores(qv: torch.Tensor, iv: torch.Tensor) -> torch.Tensor:
    """[Q, n] scores of every item per query; a query's row does not depend on the batch (models.rows)."""
    from recsys_assets.models.rows import with_min_rows

    return with_min_rows(lambda q: q @ iv.T, qv)


def _masked_scores(qv: torch.Tensor, iv: torch.Tensor, indptr: np.ndarray, indices: np.ndarray) -> torch.Tensor:
    return _mask_excluded(catalogue_scores(qv, iv), indptr, indices)


def _mask_excluded(scores: torch.Tensor, indptr: np.ndarray, indices: np.ndarray) -> torch.Tensor:
    """Excluded items (CSR window `indptr` over `indices`) set to -inf, in place."""
    counts = np.diff(indptr)
    if counts.sum():
        lo, hi = int(indptr[0]), int(indptr[-1])
        rows = torch.repeat_interleave(
            torch.arange(len(counts), device=scores.device), torch.as_tensor(counts, device=scores.device)
        )
        scores[rows, torch.as_tensor(indices[lo:hi], device=scores.device)] = -torch.inf
    return scores


@torch.no_grad()
def exact_top_k(
    qv: torch.Tensor,
    item_vectors: torch.Tensor,
    k: int,
    exclude_indptr: np.ndarray | None = None,
    exclude_indices: np.ndarray | None = None,
    batch_size: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """(items int64 [Q, k], scores float32 [Q, k]) by descending score; excluded items never appear. Rows with
    fewer than k allowed items are padded with item -1 / score -inf."""
    q = qv.shape[0]
    k_eff = min(k, item_vectors.shape[0])
    items = np.full((q, k), -1, dtype=np.int64)
    scores = np.full((q, k), -np.inf, dtype=np.float32)
    if exclude_indptr is None:
        exclude_indptr, exclude_indices = np.zeros(q + 1, dtype=np.int64), np.zeros(0, dtype=np.int64)
    iv = item_vectors.to(qv.device)
    for s in range(0, q, batch_size):
        e = min(s + batch_size, q)
        sc = _masked_scores(qv[s:e], iv, exclude_indptr[s : e + 1], exclude_indices)
        top = torch.topk(sc, k_eff, dim=1)
        vals = top.values.float().cpu().numpy()
        idx = top.indices.cpu().numpy()
        idx = np.where(np.isfinite(vals), idx, -1)
        items[s:e, :k_eff], scores[s:e, :k_eff] = idx, vals
    return items, scores


# queries × catalogue entries per block of `item_ranks` (its int64 positions: 128 MB)
RANK_BLOCK_ENTRIES = 1 << 24


@torch.no_grad()
def item_ranks(
    qv: torch.Tensor, item_vectors: torch.Tensor, states: QueryStates, items: np.ndarray, batch_size: int | None = None
) -> np.ndarray:
    """int64 [Q, m]: the rank of each given item in its query's full ranking (number of non-excluded items
    with a strictly higher score: the evaluator's convention); -1 where the item is -1.

    Each catalogue score is placed among the query's m given scores (a binary search in m sorted values) and
    counted, instead of sorting the catalogue per query: n log m, not n log n, and no n-wide index tensor."""
    q, m = items.shape
    out = np.full((q, m), -1, dtype=np.int64)
    iv = item_vectors.to(qv.device)
    batch = batch_size or max(1, RANK_BLOCK_ENTRIES // max(int(iv.shape[0]), 1))
    for s in range(0, q, batch):
        e = min(s + batch, q)
        sc = catalogue_scores(qv[s:e], iv)
        it = torch.as_tensor(np.maximum(items[s:e], 0), device=sc.device)
        # the item's own score taken from the same product (a separately computed dot product can differ in the
        # last bit and count the item as beating itself); kept even if the item is excluded, like the evaluator
        own = sc.gather(1, it)
        sc = _mask_excluded(sc, states.exclude_indptr[s : e + 1], states.exclude_indices)
        own_sorted, order = torch.sort(own, dim=1)
        below = torch.searchsorted(own_sorted, sc, side="left")  # per catalogue item: given scores strictly below
        counts = torch.zeros((e - s, m + 1), dtype=torch.int64, device=sc.device)
        counts.scatter_add_(1, below, torch.ones_like(below))
        # the j-th smallest given score is beaten by every catalogue item with more than j given scores below it
        beaten = counts.flip(1).cumsum(1).flip(1)[:, 1:]
        ranks = torch.empty_like(beaten).scatter_(1, order, beaten)
        out[s:e] = np.where(items[s:e] >= 0, ranks.cpu().numpy(), -1)
    return out


def sample_random_items(states: QueryStates, candidates: np.ndarray, num_items: int, n: int, seed: int) -> np.ndarray:
    """int64 [Q, n] uniform random items per query, none of them excluded, the target or a candidate."""
    rng = np.random.default_rng(seed)
    out = np.full((states.n, n), -1, dtype=np.int64)
    if n == 0:
        return out
    for i in range(states.n):
        banned = set(states.exclude_indices[states.exclude_indptr[i] : states.exclude_indptr[i + 1]].tolist())
        banned.update(candidates[i][candidates[i] >= 0].tolist())
        if states.targets[i] >= 0:
            banned.add(int(states.targets[i]))
        allowed = num_items - len(banned)
        if allowed <= 0:
            continue
        want = min(n, allowed)
        picked: list[int] = []
        seen: set[int] = set()
        while len(picked) < want:
            for x in rng.integers(0, num_items, size=2 * want + 8).tolist():
                if x not in banned and x not in seen:
                    seen.add(x)
                    picked.append(x)
                    if len(picked) == want:
                        break
        out[i, :want] = picked
    return out


def pairwise_scores(qv: torch.Tensor, item_vectors: torch.Tensor, items: np.ndarray) -> np.ndarray:
    """float32 [Q, m] scores of given items per query (-1 items → NaN)."""
    it = torch.as_tensor(np.maximum(items, 0), device=qv.device)
    s = torch.einsum("qd,qmd->qm", qv, item_vectors.to(qv.device)[it]).float().cpu().numpy()
    return np.where(items >= 0, s, np.nan).astype(np.float32)


class HnswIndex:
    """faiss HNSW (inner product) over the item vectors, with exclusion filtering at search time."""

    def __init__(self, index, num_items: int, ef_search: int) -> None:
        self.index = index
        self.num_items = num_items
        self.ef_search = ef_search

    @classmethod
    def build(
        cls, item_vectors: np.ndarray, m: int = 32, ef_construction: int = 200, ef_search: int = 256
    ) -> HnswIndex:
        import faiss

        vecs = np.ascontiguousarray(item_vectors, dtype=np.float32)
        index = faiss.IndexHNSWFlat(vecs.shape[1], m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.add(vecs)
        return cls(index, len(vecs), ef_search)

    def save(self, path: str | Path) -> None:
        import faiss

        faiss.write_index(self.index, str(path))

    @classmethod
    def load(cls, path: str | Path, ef_search: int = 256) -> HnswIndex:
        import faiss

        index = faiss.read_index(str(path))
        return cls(index, index.ntotal, ef_search)

    def search(
        self,
        qv: np.ndarray,
        k: int,
        exclude_indptr: np.ndarray | None = None,
        exclude_indices: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Like `exact_top_k` (items, scores), approximately. Asks faiss for k + the query's exclusion count
        and drops excluded items, so every row keeps k allowed items where that many exist."""
        import faiss

        qv = np.ascontiguousarray(qv, dtype=np.float32)
        q = len(qv)
        items = np.full((q, k), -1, dtype=np.int64)
        scores = np.full((q, k), -np.inf, dtype=np.float32)
        counts = np.diff(exclude_indptr) if exclude_indptr is not None else np.zeros(q, dtype=np.int64)
        # group queries by how many extra results they need, so one search call serves many queries
        extra = np.minimum(counts, self.num_items)
        for need in np.unique(extra):
            rows = np.flatnonzero(extra == need)
            kk = int(min(self.num_items, k + need))
            params = faiss.SearchParametersHNSW(efSearch=max(self.ef_search, kk))
            d, idx = self.index.search(qv[rows], kk, params=params)
            for j, r in enumerate(rows):
                ids = idx[j]
                keep = ids >= 0
                if exclude_indptr is not None and counts[r]:
                    ex = exclude_indices[exclude_indptr[r] : exclude_indptr[r + 1]]
                    keep &= ~np.isin(ids, ex)
                ids, ds = ids[keep][:k], d[j][keep][:k]
                items[r, : len(ids)], scores[r, : len(ids)] = ids, ds
        return items, scores


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean over rows of |approx ∩ exact| / |exact| (ignoring -1 padding)."""
    hits, total = 0, 0
    for a, e in zip(approx, exact):
        e = e[e >= 0]
        hits += len(np.intersect1d(a[a >= 0], e))
        total += len(e)
    return hits / total if total else float("nan")


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0
