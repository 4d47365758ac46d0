"""The source's ids on what is served: every table keyed by internal contiguous ids (user, item) also gets the
source's user_id / item_id (int64 where the source's ids are integers, e.g. MovieLens userId / movieId, else
strings), the item's title and category names, from the dataset folder's user_index / item_index
(`schema.DatasetPaths`, written by the mds_splits stage)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from recsys_assets.data import schema as S
from recsys_assets.data.splits import load_splits_frame

RECOMMENDATIONS_FILE = "recommendations.parquet"
# the fallback list of a user the recommendations do not hold: the most interacted items of the fit splits
POPULAR_FILE = "popular.parquet"
POPULAR_ITEMS = 100
POPULARITY = "popularity"
# source columns first, in this order, then the rest of a table's columns
_LEADING = (S.USER_ID, "rank", S.ITEM_ID, S.TITLE, S.CATEGORIES)


def _typed(raw: pd.Series, id_type: str) -> pd.Series:
    if id_type not in S.ID_TYPES:
        raise ValueError(f"unknown id type {id_type!r}; expected one of {S.ID_TYPES}")
    return raw.astype("int64") if id_type == "int64" else raw.astype(object)


def id_maps(dataset_root: str | Path) -> tuple[pd.Series, pd.DataFrame]:
    """(user → user_id, item → [item_id, title, categories]), indexed by the internal ids."""
    paths = S.DatasetPaths(Path(dataset_root))
    if not (paths.user_index.exists() and paths.item_index.exists()):
        raise FileNotFoundError(
            f"dataset {paths.root} has no user_index/item_index (written before source ids were kept): "
            "materialize mds_splits again"
        )
    meta = S.DatasetMeta.load(paths.meta)
    users = pd.read_parquet(paths.user_index)
    items = pd.read_parquet(paths.item_index)
    user_ids = pd.Series(_typed(users["raw_user"], meta.user_id_type).to_numpy(), index=users[S.USER].to_numpy())
    item_info = pd.DataFrame(
        {
            S.ITEM_ID: _typed(items["raw_item"], meta.item_id_type).to_numpy(),
            S.TITLE: items[S.TITLE].to_numpy(),
            S.CATEGORIES: items[S.CATEGORIES].to_numpy(),
        },
        index=items[S.ITEM].to_numpy(),
    )
    return user_ids.sort_index(), item_info.sort_index()


def with_source_ids(table: pd.DataFrame, dataset_root: str | Path, maps=None) -> pd.DataFrame:
    """`table` with user_id (where it has `user`), item_id, title and categories (where it has `item`) in the
    source's ids, those columns first; the internal ids stay as `user` / `item`. An id the dataset does not
    know raises KeyError. `maps`: `id_maps(dataset_root)` already read (else read here)."""
    user_ids, item_info = maps if maps is not None else id_maps(dataset_root)
    out = table.reset_index(drop=True).copy()
    if S.USER in out:
        out[S.USER_ID] = user_ids.loc[out[S.USER].to_numpy()].to_numpy()
    if S.ITEM in out:
        info = item_info.loc[out[S.ITEM].to_numpy()]
        for col in (S.ITEM_ID, S.TITLE, S.CATEGORIES):
            out[col] = info[col].to_numpy()
    first = [c for c in _LEADING if c in out]
    return out[first + [c for c in out.columns if c not in first]]


def popular_items(dataset_root: str | Path, n: int = POPULAR_ITEMS, maps=None) -> pd.DataFrame:
    """The `n` items with the most train + validation interactions (ties: lower internal id), in source ids:
    item_id, title, categories, popularity (the count), item."""
    splits = load_splits_frame(dataset_root, [S.ITEM, S.SPLIT])
    fit = splits[splits[S.SPLIT].isin(["train", "validation"])]
    counts = fit.groupby(S.ITEM).size().rename(POPULARITY).reset_index()
    top = counts.sort_values([POPULARITY, S.ITEM], ascending=[False, True], kind="stable").head(n)
    top[POPULARITY] = top[POPULARITY].astype("int64")
    return with_source_ids(top, dataset_root, maps)


def publish_recommendations(top: pd.DataFrame, dataset_root: str | Path, out_dir: Path) -> pd.DataFrame:
    """recommendations.parquet (`top` with the source's ids) and popular.parquet (`popular_items`, the
    lookup's fallback) into `out_dir`; returns the recommendations as written."""
    maps = id_maps(dataset_root)  # read once for both tables
    out = with_source_ids(top, dataset_root, maps)
    out.to_parquet(Path(out_dir) / RECOMMENDATIONS_FILE, index=False)
    popular_items(dataset_root, maps=maps).to_parquet(Path(out_dir) / POPULAR_FILE, index=False)
    return out
