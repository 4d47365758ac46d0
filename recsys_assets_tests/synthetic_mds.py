"""A tiny on-disk dataset in the exact layout of `recsys_assets.data.schema` (what the Spark side produces),
written with pandas/pyarrow and `streaming.MDSWriter`, for tests of the training code.

Planted structure (so that a model with history clearly beats MostPopular):
- items fall into `num_clusters` clusters (item i is in cluster i % num_clusters, so id 0 is an ordinary item);
- each item's category bag holds its cluster's category, sometimes an extra "noise" category, and is empty
  for a few items;
- a user's next item comes, with probability `p_stay`, from the cluster of the user's previous item, else from
  the global popularity distribution; within a cluster, items are drawn by popularity;
- popularity is long-tailed (Zipf over a random item order);
- users never repeat an item; user attributes loosely follow the user's first cluster.

Leave-last-out per user: the last interaction is ``test``, the second to last ``validation``, the rest
``train``. ``history`` of a row = the user's earlier items, most recent first, padded with -1 to H.

Usage: ``data = write_synthetic_dataset(tmp_path / "ds")``; ``data.meta``, ``data.splits`` (pandas).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from recsys_assets.data.blocks import read_layout
from recsys_assets.data.schema import (
    CATEGORIES,
    HISTORY,
    HISTORY_LEN,
    ITEM,
    PAD_ID,
    POSITION,
    RANKER_FIT,
    RANKER_WINDOW,
    RATING,
    SPLIT,
    SPLITS,
    TIMESTAMP,
    USER,
    DatasetMeta,
    DatasetPaths,
)


@dataclasses.dataclass(frozen=True)
class SyntheticDataset:
    root: Path
    meta: DatasetMeta
    splits: pd.DataFrame  # the splits table as written (history as lists)
    item_features: pd.DataFrame
    user_features: pd.DataFrame
    cluster_of_item: np.ndarray

    @property
    def paths(self) -> DatasetPaths:
        return DatasetPaths(self.root)


def _zipf_weights(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    ranks = rng.permutation(n)
    w = 1.0 / (1.0 + ranks) ** exponent
    return w / w.sum()


def generate_interactions(
    *,
    num_users: int = 300,
    num_items: int = 200,
    num_clusters: int = 10,
    min_len: int = 8,
    max_len: int = 16,
    p_stay: float = 0.85,
    popularity_exponent: float = 1.0,
    seed: int = 0,
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, np.ndarray]:
    """(interactions sorted by user/timestamp, item popularity weights, cluster of item, first cluster of user)."""
    rng = np.random.default_rng(seed)
    cluster = np.arange(num_items) % num_clusters
    pop = _zipf_weights(num_items, popularity_exponent, rng)
    members = [np.flatnonzero(cluster == c) for c in range(num_clusters)]
    users, items, stamps = [], [], []
    first_cluster = np.zeros(num_users, dtype=np.int64)
    t0 = 1_600_000_000
    for u in range(num_users):
        length = int(rng.integers(min_len, max_len + 1))
        seen = np.zeros(num_items, dtype=bool)
        c = int(rng.integers(num_clusters))
        first_cluster[u] = c
        t = t0 + int(rng.integers(0, 10_000))
        prev = -1
        for _ in range(length):
            if prev >= 0 and rng.random() < p_stay:
                cand = members[cluster[prev]]
            elif prev < 0:
                cand = members[c]
            else:
                cand = np.arange(num_items)
            w = pop[cand] * ~seen[cand]
            if w.sum() == 0:  # cluster exhausted: fall back to any unseen item
                cand = np.arange(num_items)
                w = pop * ~seen
            item = int(rng.choice(cand, p=w / w.sum()))
            seen[item] = True
            users.append(u)
            items.append(item)
            stamps.append(t)
            t += int(rng.integers(60, 86_400))
            prev = item
    df = pd.DataFrame(
        {
            USER: np.asarray(users, dtype=np.int32),
            ITEM: np.asarray(items, dtype=np.int32),
            TIMESTAMP: np.asarray(stamps, dtype=np.int64),
            RATING: rng.integers(1, 6, size=len(users)).astype(np.float32),
        }
    )
    return df, pop, cluster, first_cluster


def _add_splits_and_history(df: pd.DataFrame, history_length: int, ranker_window: int = 0) -> pd.DataFrame:
    df = df.sort_values([USER, TIMESTAMP, ITEM], kind="stable").reset_index(drop=True)
    size = df.groupby(USER)[USER].transform("size").to_numpy()
    pos = df.groupby(USER).cumcount().to_numpy()
    from_end = size - pos - 1
    split = np.where(from_end == 0, "test", np.where(from_end == 1, "validation", "train"))
    split[size < 3] = "train"
    n_train = np.where(size < 3, size, size - 2)
    window = np.minimum(ranker_window, np.maximum(n_train - 1, 0))
    df[POSITION] = (pos + 1).astype(np.int32)
    df[RANKER_WINDOW] = (pos + 1 <= n_train) & (pos + 1 > n_train - window)
    histories, lens = [], []
    items = df[ITEM].to_numpy()
    start = 0
    for i in range(len(df)):
        if pos[i] == 0:
            start = i
        prev = items[start:i][::-1][:history_length]
        h = np.full(history_length, PAD_ID, dtype=np.int32)
        h[: len(prev)] = prev
        histories.append(h)
        lens.append(len(prev))
    df[SPLIT] = split
    df[HISTORY] = histories
    df[HISTORY_LEN] = np.asarray(lens, dtype=np.int32)
    return df


def _write_parquet(df: pd.DataFrame, folder: Path, schema: pa.Schema) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(df, schema=schema, preserve_index=False)
    pq.write_table(table, folder / "part-00000.parquet")
    (folder / "_SUCCESS").write_text("")


def _write_mds(df: pd.DataFrame, folder: Path, history_length: int) -> None:
    from recsys_assets.data.blocks import write_blocks
    from recsys_assets.data.mds import split_layout

    # rows shuffled before blocking, as the Spark writer does, so that a block mixes users
    write_blocks(folder, df.sample(frac=1.0, random_state=0), split_layout(history_length), size_limit=1 << 16)


def write_synthetic_dataset(
    root: str | Path,
    *,
    num_users: int = 300,
    num_items: int = 200,
    num_clusters: int = 10,
    num_extra_categories: int = 4,
    history_length: int = 8,
    min_len: int = 8,
    max_len: int = 16,
    p_stay: float = 0.85,
    seed: int = 0,
    ranker_window: int = 0,
) -> SyntheticDataset:
    """Write interactions/, item_features/, user_features/, splits/, mds/{train,validation,test}/ (+ ranker_fit
    with a ranker window), meta.json."""
    root = Path(root)
    paths = DatasetPaths(root)
    rng = np.random.default_rng(seed + 1)
    inter, _, cluster, first_cluster = generate_interactions(
        num_users=num_users,
        num_items=num_items,
        num_clusters=num_clusters,
        min_len=min_len,
        max_len=max_len,
        p_stay=p_stay,
        seed=seed,
    )
    splits = _add_splits_and_history(inter, history_length, ranker_window)

    # item features: categories = [cluster] (+ a noise category sometimes); a few items have none.
    num_categories = num_clusters + num_extra_categories
    cats = []
    for i in range(num_items):
        r = rng.random()
        if r < 0.05:
            cats.append(np.zeros(0, dtype=np.int32))
        elif r < 0.35:
            cats.append(np.asarray([cluster[i], num_clusters + rng.integers(num_extra_categories)], dtype=np.int32))
        else:
            cats.append(np.asarray([cluster[i]], dtype=np.int32))
    train_counts = np.bincount(splits.loc[splits[SPLIT] == "train", ITEM], minlength=num_items)
    item_features = pd.DataFrame(
        {ITEM: np.arange(num_items, dtype=np.int32), CATEGORIES: cats, "popularity": train_counts.astype(np.int64)}
    )
    # user attributes: "group" follows the first cluster loosely, "region" is noise.
    group_card, region_card = 4, 3
    group = np.where(rng.random(num_users) < 0.7, first_cluster % group_card, rng.integers(group_card, size=num_users))
    user_features = pd.DataFrame(
        {
            USER: np.arange(num_users, dtype=np.int32),
            "attr_group": group.astype(np.int32),
            "attr_region": rng.integers(region_card, size=num_users).astype(np.int32),
        }
    )

    _write_parquet(
        inter,
        paths.interactions,
        pa.schema([(USER, pa.int32()), (ITEM, pa.int32()), (TIMESTAMP, pa.int64()), (RATING, pa.float32())]),
    )
    _write_parquet(
        item_features,
        paths.item_features,
        pa.schema([(ITEM, pa.int32()), (CATEGORIES, pa.list_(pa.int32())), ("popularity", pa.int64())]),
    )
    _write_parquet(
        user_features,
        paths.user_features,
        pa.schema([(USER, pa.int32()), ("attr_group", pa.int32()), ("attr_region", pa.int32())]),
    )
    splits_out = splits.copy()
    splits_out[HISTORY] = [list(map(int, h)) for h in splits_out[HISTORY]]
    _write_parquet(
        splits_out,
        paths.splits,
        pa.schema(
            [
                (USER, pa.int32()),
                (ITEM, pa.int32()),
                (TIMESTAMP, pa.int64()),
                (RATING, pa.float32()),
                (SPLIT, pa.string()),
                (HISTORY, pa.list_(pa.int32())),
                (HISTORY_LEN, pa.int32()),
                (POSITION, pa.int32()),
                (RANKER_WINDOW, pa.bool_()),
            ]
        ),
    )
    rows = {}
    for s in SPLITS:
        part = splits.loc[splits[SPLIT] == s]
        _write_mds(part, paths.mds(s), history_length)
        rows[s] = int(len(part))
    if ranker_window:
        _write_mds(
            splits.loc[(splits[SPLIT] == "train") & ~splits[RANKER_WINDOW]], paths.mds(RANKER_FIT), history_length
        )
    meta = DatasetMeta(
        num_users=num_users,
        num_items=num_items,
        num_categories=num_categories,
        user_attribute_cardinalities={"attr_group": group_card, "attr_region": region_card},
        history_length=history_length,
        rows=rows,
        mds_layout=read_layout(paths.mds("train")).to_dict(),
        ranker_window=ranker_window,
        ranker_queries=int(splits[RANKER_WINDOW].sum()),
    )
    paths.meta.write_text(meta.to_json())
    return SyntheticDataset(
        root=root,
        meta=meta,
        splits=splits_out,
        item_features=item_features,
        user_features=user_features,
        cluster_of_item=cluster,
    )


if __name__ == "__main__":  # pragma: no cover - handy for manual runs
    import sys

    ds = write_synthetic_dataset(sys.argv[1])
    print(json.dumps(json.loads(ds.meta.to_json()), indent=1))
