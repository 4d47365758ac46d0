"""Retrieval stage after training: item_index (exact + faiss HNSW) → retrieval_candidates (top-K per user).

Thin wiring: the search code is in recsys_assets.serving.retrieval."""
import dataclasses
import json
import time
from pathlib import Path
from typing import Literal

import dagster as dg
from pydantic import Field

from recsys_assets.data import schema as S
from recsys_assets.data.publish import publish_folder
from recsys_assets.defs.constants import RETRIEVAL_GROUP
from recsys_assets.defs.model_assets import load_trained_two_tower
from recsys_assets.defs.resources import StateResource
from recsys_assets.defs.types import CandidateSet, PublishedFolder, TrainedModel


class ItemIndexConfig(dg.Config):
    hnsw_m: int = Field(32, ge=4, description="HNSW graph degree.")
    ef_construction: int = Field(200, ge=8)
    ef_search: int = Field(256, ge=8)
    recall_k: int = Field(100, ge=1)
    recall_sample_users: int = Field(1000, ge=1, description="Users whose queries measure the index's recall.")


class RetrievalConfig(dg.Config):
    k: int = Field(100, ge=1, description="Candidates per user handed to the ranker.")
    index: Literal["exact", "hnsw"] = Field("exact", description="Serving search: exact top-k or the faiss HNSW index.")
    num_random_negatives: int = Field(10, ge=0, description="Uniform random items per validation query (ranker negatives).")
    seed: int = 0


QUERY_SPLIT_COLUMNS = (S.USER, S.ITEM, S.TIMESTAMP, S.SPLIT, S.HISTORY, S.HISTORY_LEN)


def load_query_splits(mds_splits: PublishedFolder):
    """The splits table with what query states need (history included)."""
    from recsys_assets.data.splits import load_splits_frame

    return load_splits_frame(mds_splits.path, QUERY_SPLIT_COLUMNS)


def serving_queries(two_tower_model: TrainedModel, mds_splits: PublishedFolder, phase: str, *, all_users: bool,
                    splits=None):
    """(model, feature store, query states, query vectors) of one cutoff with the fit of that phase; `splits`:
    a `load_query_splits` frame already read (else read here)."""
    from recsys_assets.models.features import FeatureStore
    from recsys_assets.serving.retrieval import query_states, query_vectors

    model, spec = load_trained_two_tower(two_tower_model, phase=phase)
    meta = S.DatasetMeta.load(S.DatasetPaths(Path(mds_splits.path)).meta)
    store = FeatureStore.load(mds_splits.path, spec)
    states = query_states(load_query_splits(mds_splits) if splits is None else splits, phase,
                          num_users=meta.num_users, num_items=meta.num_items, history_length=spec.history_length,
                          all_users=all_users)
    return model, store, states, query_vectors(model, store, states)


@dg.asset(
    group_name=RETRIEVAL_GROUP,
    kinds={"faiss", "pytorch", "numpy"},
    tags={"stage": "retrieval"},
    description="Search structures over item_embeddings: exact (matrix product + top-k in torch) and a faiss "
    "HNSW inner-product index; metadata: build time, size, recall@K of HNSW against exact search.",
)
def item_index(
    context: dg.AssetExecutionContext,
    config: ItemIndexConfig,
    item_embeddings: PublishedFolder,
    two_tower_model: TrainedModel,
    mds_splits: PublishedFolder,
    state: StateResource,
) -> dg.Output[PublishedFolder]:
    import numpy as np
    import torch

    from recsys_assets.serving.retrieval import HnswIndex, exact_top_k, recall_at_k, timed

    vectors = np.load(Path(item_embeddings.path) / "item_vectors.npy")
    if vectors.ndim != 2 or len(vectors) == 0:
        raise ValueError(f"item_index: item_vectors.npy in {item_embeddings.path} is empty or not 2-D ({vectors.shape})")
    index, build_s = timed(HnswIndex.build, vectors, m=config.hnsw_m, ef_construction=config.ef_construction,
                           ef_search=config.ef_search)
    _, _, states, qv = serving_queries(two_tower_model, mds_splits, "test", all_users=True)
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(states.n, size=min(config.recall_sample_users, states.n), replace=False))
    q = qv[torch.as_tensor(sample)]
    k = min(config.recall_k, len(vectors))
    (exact, _), exact_s = timed(exact_top_k, q, torch.from_numpy(vectors), k)
    (approx, _), approx_s = timed(index.search, q.numpy(), k)
    recall = recall_at_k(approx, exact)
    dest = state.asset_dir("item_index", context.run_id)
    with publish_folder(dest) as tmp:
        index.save(tmp / "items.hnsw.faiss")
        np.save(tmp / "item_vectors.npy", vectors)
        info = {"num_items": int(len(vectors)), "dim": int(vectors.shape[1]), "hnsw_m": config.hnsw_m,
                "ef_construction": config.ef_construction, "ef_search": config.ef_search,
                f"recall@{k}": recall, "build_seconds": build_s, "sample_queries": int(len(sample)),
                "exact_seconds": exact_s, "hnsw_seconds": approx_s, "item_embeddings": item_embeddings.path}
        (tmp / "info.json").write_text(json.dumps(info, indent=2))
    size = (dest / "items.hnsw.faiss").stat().st_size
    context.log.info(f"HNSW over {len(vectors)} items: recall@{k} {recall:.4f} vs exact on {len(sample)} queries")
    return dg.Output(
        PublishedFolder(str(dest)),
        metadata={
            "published_path": dg.MetadataValue.path(str(dest)),
            "num_items": int(len(vectors)),
            "build_seconds": float(build_s),
            "index_bytes": int(size),
            f"hnsw_recall_at_{k}": float(recall),
            "exact_ms_per_query": float(1000 * exact_s / max(1, len(sample))),
            "hnsw_ms_per_query": float(1000 * approx_s / max(1, len(sample))),
        },
    )


@dg.asset(
    group_name=RETRIEVAL_GROUP,
    kinds={"pytorch", "parquet"},
    tags={"stage": "retrieval"},
    description="Top-K items per user from the Two Tower (the user's fit items excluded), for two cutoffs: "
    "'test' (the served model, refit on train+validation; every user) and 'validation' (the train-only fit; "
    "users with a validation row: the ranker's training queries). Parquet: candidates (phase, user, item, "
    "retrieval_score, retrieval_rank, source), training_pool (the validation item when it was not retrieved, "
    "random negatives), queries (the query states).",
)
def retrieval_candidates(
    context: dg.AssetExecutionContext,
    config: RetrievalConfig,
    two_tower_model: TrainedModel,
    item_index: PublishedFolder,
    mds_splits: PublishedFolder,
    state: StateResource,
) -> dg.Output[CandidateSet]:
    import numpy as np
    import pandas as pd
    import torch

    from recsys_assets.models.two_tower import ItemEncoder
    from recsys_assets.serving.retrieval import (
        HnswIndex,
        exact_top_k,
        item_ranks,
        pairwise_scores,
        sample_random_items,
    )

    frames, pools, queries, stats = [], [], [], {}
    splits = load_query_splits(mds_splits)
    for phase in ("validation", "test"):
        t0 = time.time()
        model, store, states, qv = serving_queries(two_tower_model, mds_splits, phase, all_users=phase == "test",
                                                   splits=splits)
        if states.n == 0:
            raise ValueError(f"retrieval_candidates: no {phase} queries in {mds_splits.path}")
        if phase == "test":
            vectors = torch.from_numpy(np.load(Path(item_index.path) / "item_vectors.npy"))
        else:
            with torch.no_grad():
                vectors = ItemEncoder(model, store).encode_all()
        k = min(config.k, vectors.shape[0])
        if phase == "test" and config.index == "hnsw":
            index = HnswIndex.load(Path(item_index.path) / "items.hnsw.faiss")
            items, scores = index.search(qv.numpy(), k, states.exclude_indptr, states.exclude_indices)
        else:
            items, scores = exact_top_k(qv, vectors, k, states.exclude_indptr, states.exclude_indices)
        n_q = states.n
        cand = pd.DataFrame({
            "phase": phase,
            S.USER: np.repeat(states.users, k).astype(np.int32),
            S.ITEM: items.reshape(-1).astype(np.int32),
            "retrieval_score": scores.reshape(-1).astype(np.float32),
            "retrieval_rank": np.tile(np.arange(k, dtype=np.int32), n_q),
            "source": "retrieved",
        })
        cand = cand[cand[S.ITEM] >= 0]
        frames.append(cand)
        queries.append(states.frame())
        has_target = states.targets >= 0
        hit = (items == states.targets[:, None]).any(axis=1) & has_target
        stats[phase] = {"queries": int(n_q), "with_target": int(has_target.sum()),
                        f"hr@{k}": float(hit[has_target].mean()) if has_target.any() else float("nan"),
                        "seconds": time.time() - t0}
        if phase == "validation":
            # the ranker's extra pairs: the validation item when retrieval missed it, and random negatives
            # the evaluator's rank of the target (fit items removed): the same feature the candidates carry
            t_score = pairwise_scores(qv, vectors, states.targets[:, None])[:, 0]
            t_rank = item_ranks(qv, vectors, states, states.targets[:, None])[:, 0]
            missed = has_target & ~hit
            pools.append(pd.DataFrame({
                "phase": phase, S.USER: states.users[missed].astype(np.int32),
                S.ITEM: states.targets[missed].astype(np.int32),
                "retrieval_score": t_score[missed], "retrieval_rank": t_rank[missed].astype(np.int32), "source": "target",
            }))
            rnd = sample_random_items(states, items, vectors.shape[0], config.num_random_negatives, config.seed)
            r_scores = pairwise_scores(qv, vectors, rnd)
            r_ranks = item_ranks(qv, vectors, states, rnd)
            ok = rnd >= 0
            pools.append(pd.DataFrame({
                "phase": phase, S.USER: np.repeat(states.users, rnd.shape[1])[ok.reshape(-1)].astype(np.int32),
                S.ITEM: rnd[ok].astype(np.int32), "retrieval_score": r_scores[ok].astype(np.float32),
                "retrieval_rank": r_ranks[ok].astype(np.int32), "source": "random",
            }))
        context.log.info(f"{phase}: {n_q} queries, HR@{k} {stats[phase][f'hr@{k}']:.4f}")
    dest = state.asset_dir("retrieval_candidates", context.run_id)
    with publish_folder(dest) as tmp:
        pd.concat(frames, ignore_index=True).to_parquet(tmp / "candidates.parquet", index=False)
        pd.concat(pools, ignore_index=True).to_parquet(tmp / "training_pool.parquet", index=False)
        pd.concat(queries, ignore_index=True).to_parquet(tmp / "queries.parquet", index=False)
        (tmp / "info.json").write_text(json.dumps({"k": config.k, "index": config.index, "phases": stats,
                                                   "two_tower_run_id": two_tower_model.mlflow_run_id}, indent=2))
    k = min(config.k, vectors.shape[0])
    metadata = {
        "published_path": dg.MetadataValue.path(str(dest)),
        "k": int(k),
        "index": config.index,
        "two_tower_run_id": two_tower_model.mlflow_run_id,
        "candidate_rows": int(sum(len(f) for f in frames)),
    }
    for phase, st in stats.items():
        metadata[f"{phase}_queries"] = st["queries"]
        metadata[f"{phase}_retrieval_hr_at_{k}"] = float(st[f"hr@{k}"])
    return dg.Output(CandidateSet(path=str(dest), two_tower_run_id=two_tower_model.mlflow_run_id), metadata=metadata)


retrieval_assets = [item_index, retrieval_candidates]
