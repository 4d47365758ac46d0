"""Retrieval stage after training: item_index (exact + faiss HNSW) → retrieval_candidates (top-K per user); the
search code is in recsys_assets.serving.candidates."""

from typing import Literal

import dagster as dg
from pydantic import Field

from recsys_assets.defs.constants import RETRIEVAL_GROUP
from recsys_assets.defs.resources import SparkResource, StateResource
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
    num_random_negatives: int = Field(
        10, ge=0, description="Uniform random items per validation query (ranker negatives)."
    )
    seed: int = 0
    item_item_lambdas: list[float] = Field(
        [50.0, 200.0, 500.0, 1000.0],
        description="The collaborative candidate source: EASE's top-k merged with the Two Tower's (interleaved by "
        "rank), with EASE scores and ranks as ranker features; λ chosen on validation from this grid (one value: "
        "taken as given, without a validation fit). [] = off.",
    )
    item_item_max_items: int | None = Field(
        None,
        ge=1,
        description="EASE is a dense float32 items × items matrix: the item-item source is off above this catalog "
        "size. Unset: the size whose matrix fits in 40% of the memory available when the step starts.",
    )
    item_item_shares: list[float] = Field(
        [0.0, 0.25, 0.5, 0.75, 1.0],
        description="Shares of EASE items in the pool (0: the Two Tower's alone, 1: EASE's alone); the one whose "
        "merged order has the best validation NDCG@10 is used at every phase.",
    )
    als_rank: int = Field(
        0,
        ge=0,
        description="Spark ALS (implicit, this rank) fitted on each phase's fit rows gives every candidate its ALS "
        "score and rank as ranker features (0 = off: on Last.fm the ranker with them lost to the pool on the "
        "holdout lists, and they cost minutes per phase there).",
    )
    als_reg_param: float = Field(0.1, gt=0)
    als_alpha: float = Field(1.0, gt=0)
    als_max_iter: int = Field(15, ge=1)


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
    from recsys_assets.serving.candidates import build_item_index

    with state.build_folder(context) as build:
        info = build_item_index(item_embeddings.path, two_tower_model, mds_splits.path, build, **config.model_dump())
    k, queries = info["k"], max(1, info["sample_queries"])
    recall = info[f"recall@{k}"]
    context.log.info(
        f"HNSW over {info['num_items']} items: recall@{k} {recall:.4f} vs exact on {info['sample_queries']} queries"
    )
    return dg.Output(
        PublishedFolder(str(build)),
        metadata={
            "num_items": info["num_items"],
            "build_seconds": float(info["build_seconds"]),
            "index_bytes": int(info["index_bytes"]),
            f"hnsw_recall_at_{k}": float(recall),
            "exact_ms_per_query": float(1000 * info["exact_seconds"] / queries),
            "hnsw_ms_per_query": float(1000 * info["hnsw_seconds"] / queries),
        },
    )


@dg.asset(
    group_name=RETRIEVAL_GROUP,
    kinds={"pytorch", "parquet"},
    tags={"stage": "retrieval"},
    description="Top-K items per query from the Two Tower merged with the EASE item-item source (the items seen "
    "before the query excluded; item_item_lambdas: [] for the Two Tower alone), at each phase (recsys_assets.data."
    "phases), each from the fits of that phase: 'ranker' (the ranker window's rows; fits on the train rows before "
    "it: the ranker's training lists), 'validation' (train-only fits: the holdout lists) and 'test' (the served "
    "model, refit on train+validation; every user). Parquet: candidates (phase, query_id, user, item, "
    "retrieval_score, retrieval_rank, item_item_score, item_item_rank, pool_rank, source), training_pool (the "
    "query's item when it was not retrieved, random negatives), queries (the query states); fit_positions.npz.",
)
def retrieval_candidates(
    context: dg.AssetExecutionContext,
    config: RetrievalConfig,
    two_tower_model: TrainedModel,
    item_index: PublishedFolder,
    mds_splits: PublishedFolder,
    spark: SparkResource,
    state: StateResource,
) -> dg.Output[CandidateSet]:
    from recsys_assets.serving.candidates import generate_candidates

    run_id = two_tower_model.mlflow_run_id
    with state.build_folder(context) as build:
        info = generate_candidates(
            two_tower_model,
            item_index.path,
            mds_splits.path,
            build,
            two_tower_run_id=run_id,
            session=spark.spark_session if config.als_rank else None,
            log=context.log.info,
            **config.model_dump(),
        )
    k = info["k"]
    metadata = {
        "k": int(k),
        "index": config.index,
        "two_tower_run_id": run_id,
        "candidate_rows": info["candidate_rows"],
    }
    for phase, st in info["phases"].items():
        metadata[f"{phase}_queries"] = st["queries"]
        metadata[f"{phase}_retrieval_hr_at_{k}"] = float(st[f"hr@{k}"])  # the merged pool's recall
        for source in ("two_tower", "item_item"):
            if f"{source}_hr@{k}" in st:
                metadata[f"{phase}_{source}_hr_at_{k}"] = float(st[f"{source}_hr@{k}"])
    if info.get("item_item_share") is not None:
        metadata["item_item_lambda"] = float(info["item_item_lambda"])
        metadata["item_item_share"] = float(info["item_item_share"])
        metadata["pool_order_validation_ndcg@10"] = dg.MetadataValue.json(info["pool_order_validation_ndcg@10"])
    return dg.Output(CandidateSet(str(build), two_tower_run_id=run_id, table="candidates.parquet"), metadata=metadata)


retrieval_assets = [item_index, retrieval_candidates]
