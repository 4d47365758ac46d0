"""The retrieval stage over published folders: item vectors, the search index (and its recall), and the Two
Tower's candidates per user that the ranker trains on and re-ranks.

Folders: a dataset (`schema.DatasetPaths`: splits, meta, features), a Two Tower model folder
(`training.model_files`), an item-embeddings / index folder (item_vectors.npy, items.hnsw.faiss)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from recsys_assets.data import schema as S
from recsys_assets.data.splits import load_query_splits
from recsys_assets.serving.retrieval import (
    HnswIndex,
    exact_top_k,
    item_ranks,
    pairwise_scores,
    query_states,
    query_vectors,
    recall_at_k,
    sample_random_items,
    timed,
)
from recsys_assets.serving.source_ids import with_source_ids
from recsys_assets.training.model_files import load_trained_two_tower

ITEM_VECTORS = "item_vectors.npy"
HNSW_FILE = "items.hnsw.faiss"
ITEMS_FILE = "items.parquet"  # row i: item i in the source's ids
# seeds the sample of users whose queries measure the index's recall
RECALL_SAMPLE_SEED = 0
# the two cutoffs: "validation" (train-only fit: the ranker's training queries), "test" (the served model)
CANDIDATE_PHASES = ("validation", "test")


def serving_queries(
    model_root, dataset_root: str | Path, phase: str, *, all_users: bool, splits: pd.DataFrame | None = None
):
    """(model, feature store, query states, query vectors) of one cutoff with the Two Tower fit of that phase;
    `splits`: a `load_query_splits` frame already read (else read here)."""
    from recsys_assets.models.features import FeatureStore

    model, spec = load_trained_two_tower(model_root, phase=phase)
    meta = S.DatasetMeta.load(S.DatasetPaths(Path(dataset_root)).meta)
    store = FeatureStore.load(dataset_root, spec)
    states = query_states(
        load_query_splits(dataset_root) if splits is None else splits,
        phase,
        num_users=meta.num_users,
        num_items=meta.num_items,
        history_length=spec.history_length,
        all_users=all_users,
    )
    return model, store, states, query_vectors(model, store, states)


def two_tower_scorer(model_root, dataset_root: str | Path, splits: pd.DataFrame):
    """The served Two Tower as the evaluator's score function (test phase, users with a test row)."""
    from recsys_assets.models.two_tower import ItemEncoder

    model, store, states, qv = serving_queries(model_root, dataset_root, "test", all_users=False, splits=splits)
    with torch.no_grad():
        iv = ItemEncoder(model, store).encode_all()
    row_of = {int(u): i for i, u in enumerate(states.users)}
    return lambda users: qv[torch.as_tensor([row_of[int(u)] for u in users])] @ iv.T


def write_item_embeddings(model_root, dataset_root: str | Path, out_dir: Path, two_tower_run_id: str) -> dict:
    """Every item through the served model's candidate tower: item_vectors.npy (row i = item i), item_ids.npy,
    items.parquet (row i: item i, its source item_id, title, categories), model.json (provenance). Returns
    num_items, dim and mean_norm."""
    from recsys_assets.models.features import FeatureStore
    from recsys_assets.models.two_tower import ItemEncoder

    model, spec = load_trained_two_tower(model_root)
    store = FeatureStore.load(dataset_root, spec)
    with torch.no_grad():
        vectors = ItemEncoder(model, store).encode_all().numpy().astype(np.float32)
    np.save(out_dir / ITEM_VECTORS, vectors)
    np.save(out_dir / "item_ids.npy", np.arange(len(vectors), dtype=np.int64))
    items = pd.DataFrame({S.ITEM: np.arange(len(vectors), dtype=np.int32)})
    with_source_ids(items, dataset_root).to_parquet(out_dir / ITEMS_FILE, index=False)
    (out_dir / "model.json").write_text(
        json.dumps({"mlflow_run_id": two_tower_run_id, "model_path": str(getattr(model_root, "path", model_root))})
    )
    norms = np.linalg.norm(vectors, axis=1)
    return {
        "num_items": int(vectors.shape[0]),
        "dim": int(vectors.shape[1]),
        "mean_norm": float(norms.mean()) if len(norms) else 0.0,
    }


def build_item_index(
    embeddings_root: str | Path,
    model_root,
    dataset_root: str | Path,
    out_dir: Path,
    *,
    hnsw_m: int,
    ef_construction: int,
    ef_search: int,
    recall_k: int,
    recall_sample_users: int,
) -> dict:
    """faiss HNSW over the item vectors (+ a copy of them for exact search) and its recall@K against exact
    search on a sample of test queries. Writes info.json; returns it with k and index_bytes."""
    vectors = np.load(Path(embeddings_root) / ITEM_VECTORS)
    if vectors.ndim != 2 or len(vectors) == 0:
        raise ValueError(f"item_index: {ITEM_VECTORS} in {embeddings_root} is empty or not 2-D ({vectors.shape})")
    index, build_s = timed(HnswIndex.build, vectors, m=hnsw_m, ef_construction=ef_construction, ef_search=ef_search)
    _, _, states, qv = serving_queries(model_root, dataset_root, "test", all_users=True)
    rng = np.random.default_rng(RECALL_SAMPLE_SEED)
    sample = np.sort(rng.choice(states.n, size=min(recall_sample_users, states.n), replace=False))
    q = qv[torch.as_tensor(sample)]
    k = min(recall_k, len(vectors))
    (exact, _), exact_s = timed(exact_top_k, q, torch.from_numpy(vectors), k)
    (approx, _), approx_s = timed(index.search, q.numpy(), k)
    recall = recall_at_k(approx, exact)
    index.save(out_dir / HNSW_FILE)
    np.save(out_dir / ITEM_VECTORS, vectors)
    info = {
        "num_items": int(len(vectors)),
        "dim": int(vectors.shape[1]),
        "hnsw_m": hnsw_m,
        "ef_construction": ef_construction,
        "ef_search": ef_search,
        f"recall@{k}": recall,
        "build_seconds": build_s,
        "sample_queries": int(len(sample)),
        "exact_seconds": exact_s,
        "hnsw_seconds": approx_s,
        "item_embeddings": str(embeddings_root),
    }
    (out_dir / "info.json").write_text(json.dumps(info, indent=2))
    return {**info, "k": k, "index_bytes": (out_dir / HNSW_FILE).stat().st_size}


def generate_candidates(
    model_root,
    index_root: str | Path,
    dataset_root: str | Path,
    out_dir: Path,
    *,
    k: int,
    index: str,
    num_random_negatives: int,
    seed: int,
    two_tower_run_id: str,
    item_item_lambdas: Sequence[float] = (),
    item_item_max_items: int = 20_000,
    item_item_shares: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    log: Callable[[str], None] = print,
) -> dict:
    """Top-k items per user (fit items excluded) at both cutoffs: "test" (the served model, every user; exact or
    HNSW search) and "validation" (the train-only fit, users with a validation row), plus the ranker's extra
    validation pairs (training_pool: the target when retrieval missed it, random negatives) and the query
    states. With `item_item_lambdas`, the pool is the Two Tower's top-k merged with EASE's top-k (serving.
    item_item; λ chosen on validation), cut at k. Every pair carries its Two Tower score and rank, its EASE
    score and rank, and its pool rank (the retrieval order). Writes candidates / training_pool / queries
    Parquet and info.json; returns k, per-phase stats (queries, with_target, hr@k of the pool and of each
    source, seconds) and candidate_rows."""
    from recsys_assets.serving.item_item import choose_lambda, choose_share, item_item_scores, merge_pools

    frames, pools, queries, stats = [], [], [], {}
    splits = load_query_splits(dataset_root)
    meta = S.DatasetMeta.load(S.DatasetPaths(Path(dataset_root)).meta)
    use_item_item = bool(item_item_lambdas) and meta.num_items <= item_item_max_items
    if item_item_lambdas and not use_item_item:
        log(f"item-item source off: {meta.num_items} items > item_item_max_items={item_item_max_items}")
    frame = splits[[S.USER, S.ITEM, S.TIMESTAMP, S.SPLIT]]
    sizes = dict(num_users=meta.num_users, num_items=meta.num_items)
    lam, lam_trials = choose_lambda(frame, lambdas=item_item_lambdas, log=log, **sizes) if use_item_item else (None, {})
    share, share_trials = 0.0, {}  # the share of EASE items in the pool: chosen on the validation cutoff
    for phase in CANDIDATE_PHASES:
        t0 = time.time()
        model, store, states, qv = serving_queries(
            model_root, dataset_root, phase, all_users=phase == "test", splits=splits
        )
        if states.n == 0:
            raise ValueError(f"retrieval_candidates: no {phase} queries in {dataset_root}")
        vectors = _item_vectors(phase, index_root, model, store)
        kk = min(k, vectors.shape[0])
        if phase == "test" and index == "hnsw":
            hnsw = HnswIndex.load(Path(index_root) / HNSW_FILE)
            items, _ = hnsw.search(qv.numpy(), kk, states.exclude_indptr, states.exclude_indices)
        else:
            items, _ = exact_top_k(qv, vectors, kk, states.exclude_indptr, states.exclude_indices)
        two_tower_items = items
        item_item = None
        if use_item_item:
            item_item = item_item_scores(frame, phase, states, lam, **sizes)
            if phase == "validation":  # the share of EASE items in the pool, chosen here, kept for test
                share, share_trials = choose_share(
                    two_tower_items, item_item.top(kk), states.targets, kk, item_item_shares
                )
                log(f"item-item share of the pool: {share:g} (validation NDCG@10 of the merged order {share_trials})")
            items = merge_pools(two_tower_items, item_item.top(kk), kk, share)
        frames.append(_retrieved(phase, states, qv, vectors, items, item_item))
        queries.append(states.frame())
        has_target = states.targets >= 0
        hr = lambda found: float(((found == states.targets[:, None]).any(axis=1) & has_target)[has_target].mean())  # noqa: E731
        hit = (items == states.targets[:, None]).any(axis=1) & has_target
        stats[phase] = {
            "queries": int(states.n),
            "with_target": int(has_target.sum()),
            f"hr@{kk}": hr(items) if has_target.any() else float("nan"),
            f"two_tower_hr@{kk}": hr(two_tower_items) if has_target.any() else float("nan"),
            **({f"item_item_hr@{kk}": hr(item_item.top(kk))} if item_item is not None and has_target.any() else {}),
            "seconds": time.time() - t0,
        }
        if phase == "validation":
            pools += _training_pool(
                phase, states, qv, vectors, items, has_target & ~hit, num_random_negatives, seed, item_item, kk
            )
        log(f"{phase}: {states.n} queries, " + ", ".join(f"{m} {v:.4f}" for m, v in stats[phase].items() if "hr@" in m))
    pd.concat(frames, ignore_index=True).to_parquet(out_dir / "candidates.parquet", index=False)
    pd.concat(pools, ignore_index=True).to_parquet(out_dir / "training_pool.parquet", index=False)
    pd.concat(queries, ignore_index=True).to_parquet(out_dir / "queries.parquet", index=False)
    item_item_info = {
        "item_item_lambda": lam,
        "item_item_validation_ndcg@10": {str(x): v for x, v in lam_trials.items()},
        "item_item_share": share if use_item_item else None,
        "pool_order_validation_ndcg@10": {str(x): v for x, v in share_trials.items()},
    }
    (out_dir / "info.json").write_text(
        json.dumps(
            {"k": k, "index": index, "phases": stats, "two_tower_run_id": two_tower_run_id, **item_item_info}, indent=2
        )
    )
    return {"k": kk, "phases": stats, "candidate_rows": int(sum(len(f) for f in frames)), **item_item_info}


def _item_vectors(phase: str, index_root: str | Path, model, store) -> torch.Tensor:
    """The served model's published vectors for "test"; the train-only fit's, computed here, for "validation"."""
    from recsys_assets.models.two_tower import ItemEncoder

    if phase == "test":
        return torch.from_numpy(np.load(Path(index_root) / ITEM_VECTORS))
    with torch.no_grad():
        return ItemEncoder(model, store).encode_all()


def _pairs(
    phase: str, states, qv, vectors, items: np.ndarray, item_item, pool_rank: np.ndarray, source: str
) -> pd.DataFrame:
    """The (query user, item) pairs of `items` [Q, m] with both sources' scores and ranks (-1 items dropped)."""
    n = items.shape[1]
    if item_item is not None:
        ii_score, ii_rank = item_item.score_of(items), item_item.rank_of(items)
    else:  # no item-item source: constant features
        ii_score, ii_rank = np.zeros(items.shape, np.float32), np.full(items.shape, -1, np.int64)
    frame = pd.DataFrame(
        {
            "phase": phase,
            S.USER: np.repeat(states.users, n).astype(np.int32),
            S.ITEM: items.reshape(-1).astype(np.int32),
            "retrieval_score": pairwise_scores(qv, vectors, items).reshape(-1),
            "retrieval_rank": item_ranks(qv, vectors, states, items).reshape(-1).astype(np.int32),
            "item_item_score": np.nan_to_num(ii_score, nan=0.0).reshape(-1),
            "item_item_rank": ii_rank.reshape(-1).astype(np.int32),
            "pool_rank": pool_rank.reshape(-1).astype(np.int32),
            "source": source,
        }
    )
    return frame[frame[S.ITEM] >= 0]


def _retrieved(phase: str, states, qv, vectors, items: np.ndarray, item_item) -> pd.DataFrame:
    pool_rank = np.broadcast_to(np.arange(items.shape[1]), items.shape)
    return _pairs(phase, states, qv, vectors, items, item_item, pool_rank, "retrieved")


def _training_pool(
    phase: str,
    states,
    qv: torch.Tensor,
    vectors: torch.Tensor,
    items: np.ndarray,
    missed: np.ndarray,
    num_random: int,
    seed: int,
    item_item,
    k: int,
) -> list[pd.DataFrame]:
    """The ranker's extra pairs: the target where the pool missed it, and random negatives, each with the
    features the candidates carry (their pool rank: k, beyond the pool)."""
    targets = np.where(missed, states.targets, -1)[:, None]
    rnd = sample_random_items(states, items, vectors.shape[0], num_random, seed)
    beyond = lambda a: np.full(a.shape, k)  # noqa: E731
    return [
        _pairs(phase, states, qv, vectors, targets, item_item, beyond(targets), "target"),
        _pairs(phase, states, qv, vectors, rnd, item_item, beyond(rnd), "random"),
    ]
