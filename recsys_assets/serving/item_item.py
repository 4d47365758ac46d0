"""The funnel's collaborative candidate sources: EASE item-item scores of each phase's fit rows (a pool source and
ranker features), and Spark ALS factors (ranker features).

Where the order of a user's rows carries little signal (a table without time, play counts), what the Two
Tower misses is what EASE / item-kNN capture: items that co-occur with the user's items. This source adds,
per query, the EASE top-K to the Two Tower's top-K (one merged pool of K, interleaved by rank with a share
of EASE items), and gives the ranker every candidate's EASE score and rank as features. λ (EASE's own
validation NDCG@10) and the share (the merged order's validation NDCG@10: 0 keeps the Two Tower's pool, 1
takes EASE's) are chosen on the validation cutoff (fit on train) and reused for the other phases. ALS (the
best classical baseline on play counts) gives the ranker each candidate's ALS score and rank.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from recsys_assets.data.schema import ITEM, POSITION, TIMESTAMP, USER

# users scored per EASE block (a block holds users × items float32 scores)
SCORE_BLOCK_USERS = 1024


@dataclasses.dataclass
class QueryScores:
    """A candidate source's scores of one phase's queries (rows aligned with the query states), each query's
    excluded items (those before it) at -inf. Scores are computed per block of queries when asked, so memory
    holds one block of queries × items, not all of them. A source gives `_scores(block)`."""

    model: Any  # the fitted source
    states: Any  # serving.retrieval.QueryStates
    _top: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)

    def _scores(self, rows: np.ndarray) -> torch.Tensor:
        raise NotImplementedError

    def _blocks(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        st = self.states
        for s in range(0, st.n, SCORE_BLOCK_USERS):
            e = min(s + SCORE_BLOCK_USERS, st.n)
            block = self._scores(np.arange(s, e)).float()
            lengths = np.diff(st.exclude_indptr[s : e + 1])
            rows = torch.as_tensor(np.repeat(np.arange(e - s), lengths))
            cols = torch.as_tensor(st.exclude_indices[st.exclude_indptr[s] : st.exclude_indptr[e]])
            block[rows, cols] = -torch.inf
            yield s, e, block

    def top(self, k: int) -> np.ndarray:
        """int64 [Q, k] the best k items per query (-1 where a query has fewer than k allowed items)."""
        if k not in self._top:
            out = np.full((self.states.n, k), -1, dtype=np.int64)
            for s, e, block in self._blocks():
                values, items = torch.topk(block, min(k, block.shape[1]), dim=1)
                out[s:e, : items.shape[1]] = torch.where(torch.isinf(values), -1, items).numpy()
            self._top[k] = out
        return self._top[k]

    def lookup(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(float32 [Q, m] EASE scores, NaN for -1 and excluded items; int64 [Q, m] ranks, 0 = the query's best
        allowed item, ties in item order, -1 for -1 items) of given items per query."""
        scores = np.full(items.shape, np.nan, dtype=np.float32)
        ranks = np.full(items.shape, -1, dtype=np.int64)
        for s, e, block in self._blocks():
            n = block.shape[1]
            it = torch.as_tensor(np.maximum(items[s:e], 0))
            order = torch.argsort(block, dim=1, descending=True, stable=True)
            rank = torch.empty_like(order)
            rank.scatter_(1, order, torch.arange(n).expand(e - s, -1).contiguous())
            sc = torch.gather(block, 1, it).numpy()
            valid = items[s:e] >= 0
            scores[s:e] = np.where(valid & np.isfinite(sc), sc, np.nan)
            ranks[s:e] = np.where(valid, torch.gather(rank, 1, it).numpy(), -1)
        return scores, ranks


class ItemItemScores(QueryScores):
    """EASE: a query's row is the items before it (a window query has seen more than its user's fit rows)."""

    def _scores(self, rows: np.ndarray) -> torch.Tensor:
        return self.model.score_rows(self.states.exclude_indptr, self.states.exclude_indices, rows)


class FactorScores(QueryScores):
    """Spark ALS: the query's user's factors (fitted on the phase's fit rows) against every item's."""

    def _scores(self, rows: np.ndarray) -> torch.Tensor:
        return self.model.score(self.states.users[rows])


def als_scores(session, frame: pd.DataFrame, phase: str, states, settings: dict, *, num_users: int, num_items: int):
    """Spark ALS (implicit; `settings`: rank, reg_param, alpha, max_iter) fitted on the phase's fit rows, scoring
    the phase's queries; with the last fitted position of each user, as `item_item_scores`."""
    from recsys_assets.evaluation.baselines import SparkALS

    fit_rows, task = _phase_fit(frame, phase, num_users, num_items)
    model = SparkALS(session, seed=0, **settings).fit(task)
    return FactorScores(model, states), last_positions(fit_rows, num_users)


def _phase_fit(frame: pd.DataFrame, phase: str, num_users: int, num_items: int):
    from recsys_assets.data.phases import phase as phase_of
    from recsys_assets.evaluation.protocol import EvalTask

    fit_rows = frame.loc[phase_of(phase).fit.mask(frame)]
    return fit_rows, EvalTask.of_fit_rows(fit_rows[[USER, ITEM, TIMESTAMP]], phase, num_users, num_items)


def choose_lambda(
    frame: pd.DataFrame, *, num_users: int, num_items: int, lambdas: Sequence[float], log: Callable[[str], None]
) -> tuple[float, dict[float, float]]:
    """The λ with the best validation NDCG@10 (EASE fitted on train; XᵀX built once for all λ); {λ: NDCG@10}.
    One λ is taken as given, without a fit ({}): there is nothing to choose."""
    from recsys_assets.evaluation.baselines import ease_grid
    from recsys_assets.evaluation.protocol import EvalTask, evaluate

    if len(lambdas) == 1:
        log(f"item-item source: EASE λ={float(lambdas[0]):g} given (one value: nothing to choose, no validation fit)")
        return float(lambdas[0]), {}
    task = EvalTask.from_splits(frame, "validation", num_users=num_users, num_items=num_items)
    ease = ease_grid(max_items=num_items, dtype=torch.float32)
    results = {}
    for lam in lambdas:
        t0 = time.perf_counter()
        results[float(lam)] = float(evaluate(ease(lam=lam).fit(task).score, task)["ndcg@10"])
        seconds = time.perf_counter() - t0
        log(f"item-item source: EASE λ={lam:g} validation NDCG@10 {results[float(lam)]:.4f} ({seconds:.1f}s)")
    return max(results, key=results.get), results


def item_item_scores(frame: pd.DataFrame, phase: str, states, lam: float, *, num_users: int, num_items: int):
    """EASE fitted on the phase's fit rows (data.phases), scoring the phase's queries (`states`); with the
    last fit position of each user (0: none), the evidence that no query's row or a later one was fitted on."""
    from recsys_assets.evaluation.baselines import EASE

    fit_rows, task = _phase_fit(frame, phase, num_users, num_items)
    model = EASE(lam, max_items=num_items, dtype=torch.float32).fit(task)
    return ItemItemScores(model, states), last_positions(fit_rows, num_users)


def last_positions(rows: pd.DataFrame, num_users: int) -> np.ndarray:
    """int64 [num_users]: each user's last position among `rows` (0 where the user has none)."""
    out = np.zeros(num_users, dtype=np.int64)
    np.maximum.at(out, rows[USER].to_numpy(np.int64), rows[POSITION].to_numpy(np.int64))
    return out


def merge_pools(first: np.ndarray, second: np.ndarray, k: int, share: float = 0.5) -> np.ndarray:
    """int64 [Q, k]: per row, two ranked lists merged by rank so that about `share` of the pool comes from
    `second` (0: `first` alone, 1: `second` alone; first's item before second's at equal key), duplicates kept
    once, cut at k; -1 pads a row with fewer distinct items."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1], got {share}")
    rank_a, rank_b = np.arange(first.shape[1]) + 0.5, np.arange(second.shape[1]) + 0.5
    keys = np.concatenate(
        [
            rank_a / (1.0 - share) if share < 1 else np.full(len(rank_a), np.inf),
            rank_b / share if share > 0 else np.full(len(rank_b), np.inf),
        ]
    )
    order = np.argsort(keys, kind="stable")
    order = order[np.isfinite(keys[order])]
    both = np.concatenate([first, second], axis=1)[:, order]
    out = np.full((first.shape[0], k), -1, dtype=np.int64)
    for i, row in enumerate(both):
        row = row[row >= 0]
        _, first_at = np.unique(row, return_index=True)
        kept = row[np.sort(first_at)][:k]
        out[i, : len(kept)] = kept
    return out


def choose_share(
    first: np.ndarray, second: np.ndarray, targets: np.ndarray, k: int, shares: Sequence[float], cutoff: int = 10
) -> tuple[float, dict[float, float]]:
    """The share of the second source whose merged order has the best NDCG@cutoff on the queries' targets
    (validation), among the shares that beat the smallest share by more than twice the standard error of the
    paired per-query difference (a gain within noise keeps the smaller share: the first source's pool);
    {share: NDCG@cutoff}."""
    has = targets >= 0
    gains = {}
    for share in sorted(shares):
        merged = merge_pools(first[has], second[has], k, share)[:, :cutoff]
        hit_row, hit_pos = np.nonzero(merged == targets[has][:, None])
        g = np.zeros(int(has.sum()))
        g[hit_row] = 1.0 / np.log2(hit_pos + 2.0)
        gains[float(share)] = g
    results = {s: float(g.mean()) if len(g) else 0.0 for s, g in gains.items()}
    base = min(gains)
    chosen = base
    for share, g in gains.items():
        diff = g - gains[base]
        se = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else np.inf
        if diff.mean() > 2 * se and results[share] > results[chosen]:
            chosen = share
    return chosen, results
