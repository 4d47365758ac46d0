"""The retrieval stage over published folders: item vectors, the search index (and its recall), and the Two
Tower's candidates per user that the ranker trains on and re-ranks.

Folders: a dataset (`schema.DatasetPaths`: splits, meta, features), a Two Tower model folder
(`training.model_files`), an item-embeddings / index folder (item_vectors.npy, items.hnsw.faiss)."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

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


@dataclasses.dataclass(frozen=True)
class CandidatePhase:
    """What retrieval does at one phase (data.phases.Phase): which Two Tower fit proposes the candidates (the
    phase's own: fitted on its fit rows), whether it is the served cutoff (the published item vectors and the
    configured search, every user), whether the ranker trains on its lists (+ the target where retrieval
    missed it, random negatives), and whether the pool's EASE share is chosen on it."""

    phase: str
    served: bool = False
    ranker_trains_on: bool = False
    chooses_share: bool = False


def candidate_phases(ranker_queries: int) -> list[CandidatePhase]:
    """In order of computation: validation (chooses the EASE share), the ranker window when the dataset has one
    (the ranker's training lists; else the validation lists are), test (served)."""
    window = ranker_queries > 0
    return [
        CandidatePhase("validation", chooses_share=True, ranker_trains_on=not window),
        *([CandidatePhase("ranker", ranker_trains_on=True)] if window else []),
        CandidatePhase("test", served=True),
    ]


@dataclasses.dataclass
class PoolSettings:
    """The settings every phase shares (RetrievalConfig's), and what the validation phase chose."""

    k: int
    index: str
    num_random_negatives: int
    seed: int
    item_item_lambda: float | None  # None: the item-item source is off
    item_item_shares: Sequence[float]
    als: dict | None = None  # Spark ALS settings (rank, reg_param, alpha, max_iter); None: no ALS features
    session: Any = None  # the SparkSession ALS fits in
    share: float = 0.0
    share_trials: dict[float, float] = dataclasses.field(default_factory=dict)


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
    item_item_max_items: int | None = None,
    item_item_shares: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    als_rank: int = 0,
    als_reg_param: float = 0.1,
    als_alpha: float = 1.0,
    als_max_iter: int = 15,
    session: Any = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Top-k items per query at each phase of `candidate_phases` (data/phases.py: ranker window, validation,
    test), each from the Two Tower fit of that phase (the served one for test: exact or HNSW search, every
    user), plus the ranker's extra pairs of the phase it trains on (training_pool: the target when retrieval
    missed it, random negatives) and the query states. With `item_item_lambdas`, the pool is the Two Tower's
    top-k merged with EASE's top-k (serving.item_item, fitted on the phase's fit rows; λ and the share chosen
    on validation), cut at k. Every pair carries its Two Tower score and rank, its EASE score and rank, and its
    pool rank (the retrieval order). Writes candidates / training_pool / queries Parquet, fit_positions.npz
    (each phase's last fitted position per user, for the leakage check) and info.json; returns k, per-phase
    stats (queries, with_target, hr@k of the pool and of each source, seconds) and candidate_rows."""
    from recsys_assets.evaluation.memory import dense_item_refusal
    from recsys_assets.serving.item_item import choose_lambda

    splits = load_query_splits(dataset_root)
    meta = S.DatasetMeta.load(S.DatasetPaths(Path(dataset_root)).meta)
    refusal = dense_item_refusal(meta.num_items, item_item_max_items, "item-item (EASE) source")
    use_item_item = bool(item_item_lambdas) and refusal is None
    if item_item_lambdas and refusal:
        log(refusal)  # before anything items × items is allocated; the Two Tower's pool (and ALS) remain
    sizes = dict(num_users=meta.num_users, num_items=meta.num_items)
    evaluator_frame = splits[[S.USER, S.ITEM, S.TIMESTAMP, S.SPLIT]]
    lam, lam_trials = (
        choose_lambda(evaluator_frame, lambdas=item_item_lambdas, log=log, **sizes) if use_item_item else (None, {})
    )
    als = dict(rank=als_rank, reg_param=als_reg_param, alpha=als_alpha, max_iter=als_max_iter) if als_rank else None
    if als is not None and session is None:
        raise ValueError("retrieval_candidates: ALS features need a SparkSession")
    pool = PoolSettings(k, index, num_random_negatives, seed, lam, item_item_shares, als, session)
    outputs = [
        phase_candidates(cp, pool, model_root, index_root, dataset_root, splits, log)
        for cp in candidate_phases(meta.ranker_queries)
    ]
    _write_candidates(out_dir, outputs)
    stats = {o.phase: o.stats for o in outputs}
    item_item_info = {
        "item_item_lambda": lam,
        "item_item_validation_ndcg@10": {str(x): v for x, v in lam_trials.items()},
        "item_item_share": pool.share if use_item_item else None,
        "pool_order_validation_ndcg@10": {str(x): v for x, v in pool.share_trials.items()},
    }
    (out_dir / "info.json").write_text(
        json.dumps(
            {
                "k": k,
                "index": index,
                "phases": stats,
                "two_tower_run_id": two_tower_run_id,
                "als_rank": als_rank,
                **item_item_info,
            },
            indent=2,
        )
    )
    kk = min(k, meta.num_items)
    return {"k": kk, "phases": stats, "candidate_rows": int(sum(len(o.pairs) for o in outputs)), **item_item_info}


# in a candidates folder: each phase's last position per user among the rows its candidate models were fitted on
FIT_POSITIONS_FILE = "fit_positions.npz"


@dataclasses.dataclass
class PhaseCandidates:
    phase: str
    pairs: pd.DataFrame  # the retrieved pool
    pool: list[pd.DataFrame]  # the ranker's extra pairs (empty unless it trains on this phase)
    queries: pd.DataFrame
    stats: dict
    fit_positions: dict[str, np.ndarray]  # source ("two_tower", "item_item") -> last fitted position per user


def phase_candidates(
    cp: CandidatePhase, pool: PoolSettings, model_root, index_root, dataset_root, splits: pd.DataFrame, log
) -> PhaseCandidates:
    """One phase's pool: the Two Tower fit of the phase (+ EASE fitted on the same rows), merged; the ranker's
    extra pairs where it trains on this phase. `pool.share` is set here on the phase that chooses it."""
    from recsys_assets.serving.item_item import als_scores, choose_share, item_item_scores, merge_pools

    t0 = time.time()
    meta = S.DatasetMeta.load(S.DatasetPaths(Path(dataset_root)).meta)
    model, store, states, qv = serving_queries(model_root, dataset_root, cp.phase, all_users=cp.served, splits=splits)
    if states.n == 0:
        raise ValueError(f"retrieval_candidates: no {cp.phase} queries in {dataset_root}")
    vectors = _item_vectors(cp.served, index_root, model, store)
    kk = min(pool.k, vectors.shape[0])
    if cp.served and pool.index == "hnsw":
        hnsw = HnswIndex.load(Path(index_root) / HNSW_FILE)
        items, _ = hnsw.search(qv.numpy(), kk, states.exclude_indptr, states.exclude_indices)
    else:
        items, _ = exact_top_k(qv, vectors, kk, states.exclude_indptr, states.exclude_indices)
    two_tower_items, item_item = items, None
    fit_positions = {"two_tower": _two_tower_fit_positions(model_root, cp.phase, splits, meta.num_users)}
    if pool.item_item_lambda is not None:
        sizes = dict(num_users=meta.num_users, num_items=meta.num_items)
        item_item, fit_positions["item_item"] = item_item_scores(
            splits, cp.phase, states, pool.item_item_lambda, **sizes
        )
        if cp.chooses_share:
            pool.share, pool.share_trials = choose_share(
                two_tower_items, item_item.top(kk), states.targets, kk, pool.item_item_shares
            )
            log(
                f"item-item share of the pool: {pool.share:g} (validation NDCG@10 of the merged order {pool.share_trials})"
            )
        items = merge_pools(two_tower_items, item_item.top(kk), kk, pool.share)
    has_target = states.targets >= 0
    hit = (items == states.targets[:, None]).any(axis=1) & has_target
    als = None
    if pool.als is not None:
        sizes = dict(num_users=meta.num_users, num_items=meta.num_items)
        als, fit_positions["als"] = als_scores(pool.session, splits, cp.phase, states, pool.als, **sizes)
    extra = (
        _training_pool_items(states, items, has_target & ~hit, pool, vectors.shape[0]) if cp.ranker_trains_on else []
    )
    sources = {"item_item": item_item, "als": als}
    frames = candidate_pairs(cp.phase, states, qv, vectors, [(items, None, "retrieved"), *extra], sources, kk)
    hr = lambda found: float(((found == states.targets[:, None]).any(axis=1) & has_target)[has_target].mean())  # noqa: E731
    stats = {
        "queries": int(states.n),
        "with_target": int(has_target.sum()),
        f"hr@{kk}": hr(items) if has_target.any() else float("nan"),
        f"two_tower_hr@{kk}": hr(two_tower_items) if has_target.any() else float("nan"),
        **({f"item_item_hr@{kk}": hr(item_item.top(kk))} if item_item is not None and has_target.any() else {}),
        "seconds": time.time() - t0,
    }
    log(f"{cp.phase}: {states.n} queries, " + ", ".join(f"{m} {v:.4f}" for m, v in stats.items() if "hr@" in m))
    return PhaseCandidates(cp.phase, frames[0], frames[1:], states.frame(), stats, fit_positions)


def _two_tower_fit_positions(model_root, phase: str, splits: pd.DataFrame, num_users: int) -> np.ndarray:
    """The last position per user among the rows of the MDS folders the phase's Two Tower fit trained on."""
    from recsys_assets.data.phases import rows_of_folders
    from recsys_assets.serving.item_item import last_positions
    from recsys_assets.training.model_files import two_tower_fit_folders

    folders = two_tower_fit_folders(model_root, phase)
    return last_positions(splits.loc[rows_of_folders(splits, folders)], num_users)


def _write_candidates(out_dir: Path, outputs: list[PhaseCandidates]) -> None:
    pd.concat([o.pairs for o in outputs], ignore_index=True).to_parquet(out_dir / "candidates.parquet", index=False)
    pools = [f for o in outputs for f in o.pool]
    pool_frame = pd.concat(pools, ignore_index=True) if pools else outputs[0].pairs.iloc[:0]
    pool_frame.to_parquet(out_dir / "training_pool.parquet", index=False)
    pd.concat([o.queries for o in outputs], ignore_index=True).to_parquet(out_dir / "queries.parquet", index=False)
    np.savez(
        out_dir / FIT_POSITIONS_FILE,
        **{f"{o.phase}/{source}": v for o in outputs for source, v in o.fit_positions.items()},
    )


def _item_vectors(served: bool, index_root: str | Path, model, store) -> torch.Tensor:
    """The served model's published vectors for the served phase; the phase's own fit's, computed here, else."""
    from recsys_assets.models.two_tower import ItemEncoder

    if served:
        return torch.from_numpy(np.load(Path(index_root) / ITEM_VECTORS))
    with torch.no_grad():
        return ItemEncoder(model, store).encode_all()


def _training_pool_items(states, items: np.ndarray, missed: np.ndarray, pool: PoolSettings, num_items: int) -> list:
    """The ranker's extra items per query: the target where the pool missed it, and random negatives (both
    placed beyond the pool: pool rank k)."""
    targets = np.where(missed, states.targets, -1)[:, None]
    rnd = sample_random_items(states, items, num_items, pool.num_random_negatives, pool.seed)
    return [(targets, "beyond", "target"), (rnd, "beyond", "random")]


def candidate_pairs(phase: str, states, qv, vectors, item_sets: list, sources: dict, k: int) -> list[pd.DataFrame]:
    """One frame of (query, item) pairs per (items [Q, m], pool rank (None: the column index; "beyond": k),
    source) of `item_sets`, with the Two Tower's and every collaborative source's score and rank (-1 items
    dropped; a source that is off gives score 0 and rank -1). Each source's lookups of all sets are made in one
    pass over the queries."""
    widths = [a.shape[1] for a, _, _ in item_sets]
    every = np.concatenate([a for a, _, _ in item_sets], axis=1)
    looked_up = {}
    for name, source in sources.items():
        if source is not None:
            looked_up[name] = source.lookup(every)
        else:  # the source is off: constant features
            looked_up[name] = np.zeros(every.shape, np.float32), np.full(every.shape, -1, np.int64)
    scores = pairwise_scores(qv, vectors, every)
    ranks = item_ranks(qv, vectors, states, every)
    frames, lo = [], 0
    for (items, pool_rank, source), width in zip(item_sets, widths):
        cols = slice(lo, lo + width)
        lo += width
        pr = np.full(items.shape, k) if pool_rank == "beyond" else np.broadcast_to(np.arange(width), items.shape)
        frame = pd.DataFrame(
            {
                "phase": phase,
                S.QUERY_ID: np.repeat(states.query_ids, width).astype(np.int64),
                S.USER: np.repeat(states.users, width).astype(np.int32),
                S.ITEM: items.reshape(-1).astype(np.int32),
                "retrieval_score": scores[:, cols].reshape(-1),
                "retrieval_rank": ranks[:, cols].reshape(-1).astype(np.int32),
                **{
                    column: values
                    for name, (score, rank) in looked_up.items()
                    for column, values in (
                        (f"{name}_score", np.nan_to_num(score[:, cols], nan=0.0).reshape(-1)),
                        (f"{name}_rank", rank[:, cols].reshape(-1).astype(np.int32)),
                    )
                },
                "pool_rank": pr.reshape(-1).astype(np.int32),
                "source": source,
            }
        )
        frames.append(frame[frame[S.ITEM] >= 0])
    return frames
