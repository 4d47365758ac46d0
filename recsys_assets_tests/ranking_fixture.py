"""A small dataset folder and candidates folder for the ranker's data, written with pandas only (no project
code), so the same inputs can be fed to this tree and to an older one.

`write_ranking_inputs(root, ranker_window)` writes root/dataset (splits with position and ranker_window,
item_features, user_features, meta.json) and root/candidates (candidates, training_pool, queries Parquet;
fit_positions.npz, the last fitted position per user of each phase's sources, as the phases define them).
Candidates are random items the user has not seen before the query, with random scores.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

USERS, ITEMS, CATEGORIES, HISTORY = 30, 40, 6, 5
POOL, RANDOM_NEGATIVES = 8, 2
STRIDE = 1 << 32  # data.phases.QUERY_ID_STRIDE


def _splits(rng: np.random.Generator, ranker_window: int) -> pd.DataFrame:
    rows = []
    for u in range(USERS):
        n = int(rng.integers(4, 11))
        items = rng.choice(ITEMS, size=n, replace=False)
        times = np.sort(rng.choice(np.arange(1_000_000, 1_000_000 + 86400 * 60, 3600), size=n, replace=False))
        n_train = n - 2
        window = min(ranker_window, n_train - 1)
        for p in range(1, n + 1):
            history = [int(x) for x in items[: p - 1][::-1][:HISTORY]]
            rows.append(
                {
                    "user": u,
                    "item": int(items[p - 1]),
                    "timestamp": int(times[p - 1]),
                    "rating": float(rng.integers(1, 6)),
                    "history": history + [-1] * (HISTORY - len(history)),
                    "history_len": len(history),
                    "position": p,
                    "ranker_window": bool(n_train - window < p <= n_train),
                    "split": "test" if p == n else "validation" if p == n - 1 else "train",
                }
            )
    frame = pd.DataFrame(rows)
    return frame.astype(
        {"user": "int32", "item": "int32", "rating": "float32", "history_len": "int32", "position": "int32"}
    )


def _queries(splits: pd.DataFrame) -> pd.DataFrame:
    n_train = splits[splits["split"] == "train"].groupby("user").size()
    phase = np.where(splits["ranker_window"], "ranker", splits["split"])
    q = splits[(phase != "train")].copy()
    q["phase"] = phase[phase != "train"]
    steps = np.where(q["phase"] == "ranker", n_train.reindex(q["user"]).to_numpy() - q["position"] + 1, 0)
    q["query_id"] = q["user"].astype(np.int64) + steps.astype(np.int64) * STRIDE
    q["target"] = q["item"]
    return q[["phase", "user", "target", "timestamp", "history", "history_len", "position", "query_id"]]


def _candidates(rng, splits: pd.DataFrame, queries: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The retrieved pool of every query, and the ranker's extra pairs of the phase it trains on."""
    trains_on = "ranker" if (queries["phase"] == "ranker").any() else "validation"
    als_rng = np.random.default_rng(12345)
    pool_rows, extra_rows = [], []
    for q in queries.itertuples():
        seen = set(splits[(splits["user"] == q.user) & (splits["position"] < q.position)]["item"])
        allowed = np.array([i for i in range(ITEMS) if i not in seen])
        pool = rng.choice(allowed, size=min(POOL, len(allowed)), replace=False)
        scores = np.sort(rng.normal(size=len(pool)).astype(np.float32))[::-1]
        ii = rng.normal(size=len(pool)).astype(np.float32)
        als = als_rng.normal(size=len(pool)).astype(np.float32)  # its own stream: the others' draws stay as they were
        for r, (item, score) in enumerate(zip(pool, scores)):
            ii_rank, als_rank = int(rng.integers(0, 30)), int(als_rng.integers(0, 30))
            pool_rows.append(
                (q.phase, q.query_id, q.user, int(item), score, r, ii[r], ii_rank, als[r], als_rank, r, "retrieved")
            )
        if q.phase != trains_on:
            continue
        if q.target not in set(pool):
            extra_rows.append((q.phase, q.query_id, q.user, q.target, -1.0, 60, 0.0, 50, 0.1, 40, POOL, "target"))
        rest = [i for i in allowed if i not in set(pool) and i != q.target]
        for item in rng.choice(rest, size=min(RANDOM_NEGATIVES, len(rest)), replace=False):
            extra_rows.append((q.phase, q.query_id, q.user, int(item), -2.0, 70, -1.0, 80, -0.5, 90, POOL, "random"))
    columns = [
        "phase",
        "query_id",
        "user",
        "item",
        "retrieval_score",
        "retrieval_rank",
        "item_item_score",
        "item_item_rank",
        "als_score",
        "als_rank",
        "pool_rank",
        "source",
    ]
    types = {
        "query_id": "int64",
        "user": "int32",
        "item": "int32",
        "retrieval_score": "float32",
        "retrieval_rank": "int32",
        "item_item_score": "float32",
        "item_item_rank": "int32",
        "als_score": "float32",
        "als_rank": "int32",
        "pool_rank": "int32",
    }
    return pd.DataFrame(pool_rows, columns=columns).astype(types), pd.DataFrame(extra_rows, columns=columns).astype(
        types
    )


def _fit_positions(splits: pd.DataFrame) -> dict[str, np.ndarray]:
    """Each phase's last fit position per user: ranker = train before the window, validation = train,
    test = train + validation."""
    fits = {
        "ranker": (splits["split"] == "train") & ~splits["ranker_window"],
        "validation": splits["split"] == "train",
        "test": splits["split"].isin(["train", "validation"]),
    }
    out = {}
    for phase, keep in fits.items():
        last = np.zeros(USERS, np.int64)
        np.maximum.at(last, splits.loc[keep, "user"].to_numpy(), splits.loc[keep, "position"].to_numpy())
        out[f"{phase}/two_tower"] = last
        out[f"{phase}/item_item"] = last
    return out


def write_ranking_inputs(root: Path, ranker_window: int = 0, seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    dataset, candidates = Path(root) / "dataset", Path(root) / "candidates"
    splits = _splits(rng, ranker_window)
    (dataset / "splits").mkdir(parents=True)
    for name, part in splits.groupby("split"):
        (dataset / "splits" / f"split={name}").mkdir()
        part.drop(columns="split").to_parquet(dataset / "splits" / f"split={name}" / "part-0.parquet", index=False)
    cats = [sorted(rng.choice(CATEGORIES, size=int(rng.integers(0, 3)), replace=False).tolist()) for _ in range(ITEMS)]
    items = pd.DataFrame({"item": np.arange(ITEMS, dtype=np.int32), "categories": cats})
    items["popularity"] = np.bincount(splits.loc[splits["split"] == "train", "item"], minlength=ITEMS).astype(np.int64)
    (dataset / "item_features").mkdir()
    items.to_parquet(dataset / "item_features" / "part-0.parquet", index=False)
    users = pd.DataFrame(
        {"user": np.arange(USERS, dtype=np.int32), "attr_group": rng.integers(1, 4, USERS).astype(np.int32)}
    )
    (dataset / "user_features").mkdir()
    users.to_parquet(dataset / "user_features" / "part-0.parquet", index=False)
    meta = {
        "num_users": USERS,
        "num_items": ITEMS,
        "num_categories": CATEGORIES,
        "user_attribute_cardinalities": {"attr_group": 4},
        "history_length": HISTORY,
        "rows": {s: int((splits["split"] == s).sum()) for s in ("train", "validation", "test")},
    }
    if ranker_window:  # (a tree from before the window reads the meta without these)
        meta |= {"ranker_window": ranker_window, "ranker_queries": int(splits["ranker_window"].sum())}
    (dataset / "meta.json").write_text(json.dumps(meta))
    candidates.mkdir(parents=True)
    queries = _queries(splits)
    pool, extra = _candidates(rng, splits, queries)
    pool.to_parquet(candidates / "candidates.parquet", index=False)
    extra.to_parquet(candidates / "training_pool.parquet", index=False)
    queries.to_parquet(candidates / "queries.parquet", index=False)
    np.savez(candidates / "fit_positions.npz", **_fit_positions(splits))
    return dataset, candidates
