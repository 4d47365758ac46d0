"""The ranker's dense features, each defined once: a name, a one-line meaning and a numpy computation.

A feature reads a `PairBatch` (some queries' candidate pairs as arrays: the candidate, the query's time and
history, both retrieval sources' scores and ranks) and a `FeatureState` (what a phase's fit rows say about
items, users and transitions, as numpy arrays). Nothing here needs Spark: the Spark path
(`data.ranking.spark_features`) runs `compute_features` on whole queries per task, and an online scorer calls it
on one request's pairs, so both compute the same values.

`FEATURES` is the registry, in the DLRM's input order; `DENSE_FEATURES` are their names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from recsys_assets.data import schema as S

SECONDS_PER_DAY = 86400.0
# the pair columns `compute_features` reads (besides S.HISTORY, a list column)
RETRIEVAL_SCORE, RETRIEVAL_RANK = "retrieval_score", "retrieval_rank"
ITEM_ITEM_SCORE, ITEM_ITEM_RANK = "item_item_score", "item_item_rank"
ALS_SCORE, ALS_RANK = "als_score", "als_rank"
QUERY_TIMESTAMP = "query_timestamp"
SOURCE, RETRIEVED = "source", "retrieved"  # the candidates retrieval proposed (vs. added targets / random items)
PAIR_INPUTS = (
    S.QUERY_ID,
    S.USER,
    S.ITEM,
    QUERY_TIMESTAMP,
    S.HISTORY,
    RETRIEVAL_SCORE,
    RETRIEVAL_RANK,
    ITEM_ITEM_SCORE,
    ITEM_ITEM_RANK,
    ALS_SCORE,
    ALS_RANK,
    SOURCE,
)
# Optional pair columns: the query's best retrieved candidate's score under each source, given by a caller that
# scores only part of a query's pairs (data.ranking samples the training negatives first); without them, the best
# is taken over the pairs passed.
BEST_SCORE_COLUMNS = {score: f"best_{score}" for score in (RETRIEVAL_SCORE, ITEM_ITEM_SCORE, ALS_SCORE)}


# --------------------------------------------------------------------------------------------- the state
@dataclasses.dataclass
class SparseCounts:
    """Counts of (a, b) pairs of ids, keyed a * width + b (sorted), looked up by binary search."""

    keys: np.ndarray  # int64, sorted
    counts: np.ndarray  # int64
    width: int

    @classmethod
    def of(cls, a: np.ndarray, b: np.ndarray, counts: np.ndarray, width: int) -> SparseCounts:
        keys = np.asarray(a, np.int64) * width + np.asarray(b, np.int64)
        order = np.argsort(keys, kind="stable")
        return cls(keys[order], np.asarray(counts, np.int64)[order], width)

    def get(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """int64 counts of each (a, b); 0 where absent or where a < 0."""
        keys = np.asarray(a, np.int64) * self.width + np.asarray(b, np.int64)
        at = np.minimum(np.searchsorted(self.keys, keys), max(len(self.keys) - 1, 0))
        found = (np.asarray(a) >= 0) & (len(self.keys) > 0)
        if len(self.keys):
            found &= self.keys[at] == keys
        return np.where(found, self.counts[at] if len(self.keys) else 0, 0)


@dataclasses.dataclass
class FeatureState:
    """What the features know of one phase's fit rows (data/phases.py), per item and user, and the transition
    counts; nothing about a query's own row or later ones. Built by `data.ranking.feature_state` (Spark)."""

    phase: str
    item_count: np.ndarray  # int64 [num_items]: fit rows of the item
    item_recent_count: np.ndarray  # int64 [num_items]: fit rows of the item at or after `recent_cutoff`
    item_first_ts: np.ndarray  # int64 [num_items]: first fit timestamp (meaningless where item_count is 0)
    item_last_ts: np.ndarray  # int64 [num_items]
    user_count: np.ndarray  # int64 [num_users]: fit rows of the user
    user_last_ts: np.ndarray  # int64 [num_users]
    user_last_position: np.ndarray  # int64 [num_users]: the user's last fitted position (0: none): leakage check
    transitions: SparseCounts  # (previous item, item) -> fit rows whose history starts with the previous item
    previous_totals: np.ndarray  # int64 [num_items]: fit rows whose previous item is this one
    follows: SparseCounts  # (h, item) -> fit rows of the item with h among their last `window` history items
    category_indptr: np.ndarray  # int64 [num_items + 1]: each item's categories (CSR)
    category_indices: np.ndarray  # int64
    window: int  # history items the co-occurrence feature reads
    recent_cutoff: int  # timestamp: the latest `recent_fraction` of fit time starts here

    @property
    def num_users(self) -> int:
        return len(self.user_count)

    def with_unknown_user(self) -> FeatureState:
        """This state with one more user, id `num_users`, who has no fit rows: what the features know of a user
        the tables do not hold (an online request from a new user)."""
        grown = {
            name: np.append(getattr(self, name), 0) for name in ("user_count", "user_last_ts", "user_last_position")
        }
        return dataclasses.replace(self, **grown)

    def save(self, path: str | Path) -> None:
        arrays = {k: v for k, v in dataclasses.asdict(self).items() if isinstance(v, np.ndarray)}
        for name in ("transitions", "follows"):
            counts: SparseCounts = getattr(self, name)
            arrays |= {f"{name}_keys": counts.keys, f"{name}_counts": counts.counts}
        scalars = {"window": self.window, "recent_cutoff": self.recent_cutoff, "width": self.transitions.width}
        np.savez(path, phase=np.array(self.phase), **arrays, **{k: np.array(v) for k, v in scalars.items()})

    @classmethod
    def load(cls, path: str | Path) -> FeatureState:
        z = np.load(path)
        width = int(z["width"])
        sparse = {n: SparseCounts(z[f"{n}_keys"], z[f"{n}_counts"], width) for n in ("transitions", "follows")}
        arrays = {
            f.name: z[f.name]
            for f in dataclasses.fields(cls)
            if f.name not in sparse and f.name in z and f.name != "phase"
        }
        return cls(
            phase=str(z["phase"]),
            **{k: v for k, v in arrays.items() if k not in ("window", "recent_cutoff")},
            **sparse,
            window=int(z["window"]),
            recent_cutoff=int(z["recent_cutoff"]),
        )


# ---------------------------------------------------------------------------------------------- the batch
@dataclasses.dataclass
class PairBatch:
    """Candidate pairs of whole queries, as arrays (one entry per pair)."""

    user: np.ndarray  # int64 [n]
    item: np.ndarray  # int64 [n]
    query_time: np.ndarray  # int64 [n]
    history: np.ndarray  # int64 [n, H], most recent first, -1 padded
    retrieval_score: np.ndarray  # float32 [n]
    retrieval_rank: np.ndarray  # int64 [n]
    item_item_score: np.ndarray  # float32 [n]
    item_item_rank: np.ndarray  # int64 [n]
    best_retrieval_score: np.ndarray  # float32 [n]: the query's best retrieved candidate's score (own if none)
    best_item_item_score: np.ndarray  # float32 [n]
    als_score: np.ndarray  # float32 [n]
    als_rank: np.ndarray  # int64 [n]
    best_als_score: np.ndarray  # float32 [n]

    @classmethod
    def of(cls, pairs: pd.DataFrame) -> PairBatch:
        """From PAIR_INPUTS columns; every query's pairs must be in `pairs` (the best scores are per query),
        unless BEST_SCORE_COLUMNS give each query's best."""
        qid = pairs[S.QUERY_ID]
        missing = [c for c, b in BEST_SCORE_COLUMNS.items() if b not in pairs.columns]
        best = pairs[pairs[SOURCE] == RETRIEVED].groupby(S.QUERY_ID)[missing].max() if missing else None

        def best_of(column: str) -> np.ndarray:  # the query's best retrieved candidate's; its own where none
            own = pairs[column].astype(np.float32)
            given = BEST_SCORE_COLUMNS[column]
            found = pairs[given] if given in pairs.columns else qid.map(best[column])
            return found.astype(np.float32).fillna(own).to_numpy(np.float32)

        return cls(
            user=pairs[S.USER].to_numpy(np.int64),
            item=pairs[S.ITEM].to_numpy(np.int64),
            query_time=pairs[QUERY_TIMESTAMP].to_numpy(np.int64),
            history=_padded(pairs[S.HISTORY].to_numpy()),
            retrieval_score=pairs[RETRIEVAL_SCORE].to_numpy(np.float32),
            retrieval_rank=pairs[RETRIEVAL_RANK].to_numpy(np.int64),
            item_item_score=pairs[ITEM_ITEM_SCORE].to_numpy(np.float32),
            item_item_rank=pairs[ITEM_ITEM_RANK].to_numpy(np.int64),
            best_retrieval_score=best_of(RETRIEVAL_SCORE),
            best_item_item_score=best_of(ITEM_ITEM_SCORE),
            als_score=pairs[ALS_SCORE].to_numpy(np.float32),
            als_rank=pairs[ALS_RANK].to_numpy(np.int64),
            best_als_score=best_of(ALS_SCORE),
        )


def _padded(histories: np.ndarray) -> np.ndarray:
    if len(histories) and len({len(h) for h in histories[:1000]}) == 1:
        try:  # the fixed-length history of the ranking tables
            return np.stack(histories).astype(np.int64)
        except ValueError:
            pass
    width = max((len(h) for h in histories), default=0)
    out = np.full((len(histories), max(width, 1)), S.PAD_ID, dtype=np.int64)
    for i, h in enumerate(histories):
        out[i, : len(h)] = h
    return out


# -------------------------------------------------------------------------------------------- the registry
@dataclasses.dataclass(frozen=True)
class Feature:
    name: str
    meaning: str
    compute: Callable[[PairBatch, FeatureState], np.ndarray]  # float64 [n]


FEATURES: list[Feature] = []


def feature(name: str, meaning: str):
    def register(fn: Callable[[PairBatch, FeatureState], np.ndarray]):
        FEATURES.append(Feature(name, meaning, fn))
        return fn

    return register


def _log1p(x: np.ndarray) -> np.ndarray:
    return np.log1p(np.maximum(np.asarray(x, np.float64), 0.0))


def _log_days(later: np.ndarray, earlier: np.ndarray, known: np.ndarray) -> np.ndarray:
    days = np.maximum(later - earlier, 0).astype(np.float64) / SECONDS_PER_DAY
    return np.where(known, np.log1p(days), 0.0)


def source_features(source: str, gap_meaning: str, rank_meaning: str) -> None:
    """A candidate source's two features: its score minus the query's best retrieved candidate's score under it
    (scores of two fits compare this way), and log1p of the item's rank in the query's full ranking by it."""
    feature(f"{source}_score_gap", gap_meaning)(
        lambda b, s: (getattr(b, f"{source}_score") - getattr(b, f"best_{source}_score")).astype(np.float64)
    )
    feature(f"log_{source}_rank", rank_meaning)(lambda b, s: _log1p(getattr(b, f"{source}_rank")))


source_features(
    "retrieval",
    "the Two Tower score minus the query's best retrieved candidate's score",
    "log1p(the item's rank in the query's full Two Tower ranking)",
)


@feature("log_item_count", "log1p(fit interactions of the item)")
def _(b: PairBatch, s: FeatureState) -> np.ndarray:
    return _log1p(s.item_count[b.item])


@feature("log_item_recent_count", "log1p(fit interactions of the item in the latest `recent_fraction` of fit time)")
def _(b: PairBatch, s: FeatureState) -> np.ndarray:
    return _log1p(s.item_recent_count[b.item])


@feature("log_user_count", "log1p(fit interactions of the user)")
def _(b: PairBatch, s: FeatureState) -> np.ndarray:
    return _log1p(s.user_count[b.user])


@feature(
    "last_item_transition", "log1p(fit rows whose previous item is the query's last item and whose item is this one)"
)
def _(b: PairBatch, s: FeatureState) -> np.ndarray:
    return _log1p(s.transitions.get(b.history[:, 0], b.item))


@feature("last_item_transition_share", "those rows / fit rows whose previous item is the query's last item")
def _(b: PairBatch, s: FeatureState) -> np.ndarray:
    last = b.history[:, 0]
    totals = np.where(last >= 0, s.previous_totals[np.maximum(last, 0)], 0)
    return s.transitions.get(last, b.item) / np.maximum(totals, 1).astype(np.float64)


@feature(
    "recent_cooccurrence",
    "sum over the query's last `window` items h of log1p(fit rows of this item with h among their last `window`)",
)
def _(b: PairBatch, s: FeatureState) -> np.ndarray:
    recent = b.history[:, : s.window]
    counts = s.follows.get(recent, np.broadcast_to(b.item[:, None], recent.shape))
    return np.log1p(counts.astype(np.float64)).sum(axis=1)


@feature("log_item_age_days", "log1p(days from the item's first fit interaction to the query time)")
def _(b: PairBatch, s: FeatureState) -> np.ndarray:
    return _log_days(b.query_time, s.item_first_ts[b.item], s.item_count[b.item] > 0)


@feature("log_item_idle_days", "log1p(days from the item's last fit interaction to the query time)")
def _(b: PairBatch, s: FeatureState) -> np.ndarray:
    return _log_days(b.query_time, s.item_last_ts[b.item], s.item_count[b.item] > 0)


@feature("log_user_idle_days", "log1p(days from the user's last fit interaction to the query time)")
def _(b: PairBatch, s: FeatureState) -> np.ndarray:
    return _log_days(b.query_time, s.user_last_ts[b.user], s.user_count[b.user] > 0)


@feature("category_overlap", "share of the item's categories found among the query history's categories")
def _(b: PairBatch, s: FeatureState) -> np.ndarray:
    width = int(s.category_indices.max()) + 1 if len(s.category_indices) else 1
    # (pair, category) codes of the history's categories and of the item's; an item's categories are distinct
    hist_pair, hist_cat = _categories_of(s, b.history)
    seen = np.unique(hist_pair * width + hist_cat)
    item_pair, item_cat = _categories_of(s, b.item[:, None])
    found = np.isin(item_pair * width + item_cat, seen, assume_unique=False)
    hits = np.bincount(item_pair[found], minlength=len(b.item))
    total = np.bincount(item_pair, minlength=len(b.item))
    return hits / np.maximum(total, 1).astype(np.float64)


def _categories_of(s: FeatureState, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, category) of every category of every item >= 0 of each row of `items` [n, m]."""
    rows, cols = np.nonzero(items >= 0)
    ids = items[rows, cols]
    lengths = s.category_indptr[ids + 1] - s.category_indptr[ids]
    starts = np.repeat(s.category_indptr[ids], lengths)
    within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(rows, lengths), s.category_indices[starts + within]


source_features(
    "item_item",
    "the EASE score minus the query's best retrieved candidate's EASE score (0: source off)",
    "log1p(the item's rank in the query's full EASE ranking) (0: source off)",
)
source_features(
    "als",
    "the ALS score minus the query's best retrieved candidate's ALS score (0: ALS off)",
    "log1p(the item's rank in the query user's full ALS ranking) (0: ALS off)",
)

DENSE_FEATURES = tuple(f.name for f in FEATURES)


def feature_matrix(state: FeatureState, batch: PairBatch) -> np.ndarray:
    """float64 [n, len(FEATURES)]: every feature of every pair, in the registry's order."""
    columns = [f.compute(batch, state) for f in FEATURES]
    return np.stack(columns, axis=1) if columns else np.zeros((len(batch.item), 0))


def compute_features(state: FeatureState, pairs: pd.DataFrame) -> pd.DataFrame:
    """`pairs` (PAIR_INPUTS columns and any others, whole queries) with one float64 column per feature."""
    values = feature_matrix(state, PairBatch.of(pairs))
    out = pairs.copy()
    for j, f in enumerate(FEATURES):
        out[f.name] = values[:, j]
    return out


# ----------------------------------------------------------------------------------------- sparse switches
# The DLRM's sparse features: each switch's default (chosen on the holdout lists) and meaning, declared once for
# the asset's config, the layout (data.ranking.sparse_layout) and the settings search.
SPARSE_SWITCHES: dict[str, tuple[bool, str]] = {
    "use_user_id": (False, "A user-id table (up to ranker_window lists per user train it)."),
    "use_item_id": (False, "An item-id table (always used when no other sparse feature exists)."),
    "use_history": (False, "The user's history as a bag on the item table."),
    "use_categories": (True, "The item's categories as a bag."),
    "use_user_attributes": (True, "One table per user attribute."),
}
