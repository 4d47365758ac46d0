"""Metrics of scored candidate lists and labelled pairs: AUROC, log-loss, and the rank of each list's positive.

A list is the pairs that share a query id; its positive's rank (pairs with a strictly higher score) feeds the
same HR@K / NDCG@K as the full-ranking evaluator (`protocol.metrics_from_ranks`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); NaN without both classes."""
    import pandas as pd

    y = np.asarray(labels, dtype=np.float64) > 0.5
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = pd.Series(np.asarray(scores, dtype=np.float64)).rank(method="average").to_numpy()
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def log_loss(labels: np.ndarray, logits: np.ndarray) -> float:
    y = np.asarray(labels, dtype=np.float64)
    z = np.asarray(logits, dtype=np.float64)
    if len(y) == 0:
        return float("nan")
    # log(1 + exp(-|z|)) + max(z, 0) - y z : stable BCE with logits
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def list_ranks(query_ids: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per query (sorted by id): rank of its positive among the query's pairs (number of pairs with a strictly
    higher score), or a large number (a miss) when the query has no positive."""
    import pandas as pd

    df = pd.DataFrame(
        {"q": np.asarray(query_ids), "y": np.asarray(labels) > 0.5, "s": np.asarray(scores, dtype=np.float64)}
    )
    pos = df[df["y"]].groupby("q")["s"].max()
    queries = np.unique(df["q"].to_numpy())
    pos_score = pd.Series(pos).reindex(queries).to_numpy()
    df["ps"] = pd.Series(pos_score, index=queries).reindex(df["q"]).to_numpy()
    higher = (df["s"] > df["ps"]).groupby(df["q"]).sum().reindex(queries).to_numpy()
    miss = np.isnan(pos_score)
    ranks = higher.astype(np.int64)
    ranks[miss] = np.iinfo(np.int32).max
    return ranks


def pair_metrics(
    labels: np.ndarray, logits: np.ndarray, query_ids: np.ndarray | None, ks: Sequence[int]
) -> dict[str, float]:
    from recsys_assets.evaluation.protocol import metrics_from_ranks

    out = {"auroc": auroc(labels, logits), "logloss": log_loss(labels, logits)}
    if query_ids is not None:
        out.update(metrics_from_ranks(list_ranks(query_ids, labels, logits), ks))
    return out


def compare_orders(
    query_ids: np.ndarray, labels: np.ndarray, orders: dict[str, np.ndarray], ks: Sequence[int] = (10,)
) -> dict[str, dict[str, float]]:
    """List metrics of the same candidate lists under several orders (name -> score per pair)."""
    from recsys_assets.evaluation.protocol import metrics_from_ranks

    return {name: metrics_from_ranks(list_ranks(query_ids, labels, scores), ks) for name, scores in orders.items()}
