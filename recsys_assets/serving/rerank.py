"""The second stage: the DLRM re-ranks each user's Two Tower candidates (the test-phase pairs of a ranking
dataset folder) and keeps the top K."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from recsys_assets.evaluation.report import CANDIDATE_SCORES_FILE
from recsys_assets.serving.source_ids import publish_recommendations
from recsys_assets.training.model_files import load_dlrm_model

SERVED_STAGES = ("dlrm", "retrieval")
# pairs scored per DLRM forward pass
SCORE_BATCH_SIZE = 8192
RECOMMENDATION_COLUMNS = [
    "user",
    "rank",
    "item",
    "dlrm_score",
    "retrieval_score",
    "retrieval_rank",
    "pool_rank",
    "served_stage",
    "two_tower_run_id",
    "dlrm_run_id",
]


def dlrm_scores(dlrm_root, pairs_path: str | Path, batch_size: int = SCORE_BATCH_SIZE) -> np.ndarray:
    """float32 DLRM logits of every pair of a Parquet pairs table, in its row order."""
    from recsys_assets.data.pairs import load_pair_set
    from recsys_assets.models.dlrm import DLRMScorer

    model, layout, cfg = load_dlrm_model(dlrm_root)
    pairs = load_pair_set(pairs_path, layout, cfg.dense_in_features)
    scorer = DLRMScorer(model, layout, cfg)
    parts = [scorer(pairs.rows(s, min(s + batch_size, pairs.n))).numpy() for s in range(0, pairs.n, batch_size)]
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)


def recommend(
    dlrm_root,
    ranking_root: str | Path,
    out_dir: Path,
    *,
    dataset_root: str | Path,
    top_k: int,
    served: str,
    two_tower_run_id: str,
    dlrm_run_id: str,
) -> pd.DataFrame:
    """Top `top_k` per user over the test candidates, in the `served` order: "dlrm" (DLRM score; ties: the pool
    rank) or "retrieval" (the pool rank). Writes recommendations.parquet (RECOMMENDATION_COLUMNS led by the
    source's user_id, item_id, title, categories of `dataset_root`: source_ids.publish_recommendations, with
    popular.parquet) and candidate_scores.parquet (every candidate with both orders' scores, for the evaluation
    of each stage); returns the recommendations."""
    if served not in SERVED_STAGES:
        raise ValueError(f"served must be one of {SERVED_STAGES}, got {served!r}")
    test = Path(ranking_root) / "test.parquet"
    recs = pd.read_parquet(test, columns=["user", "item", "retrieval_score", "retrieval_rank", "pool_rank"])
    recs["dlrm_score"] = dlrm_scores(dlrm_root, test)
    recs.to_parquet(Path(out_dir) / CANDIDATE_SCORES_FILE, index=False)
    order = (["dlrm_score", "pool_rank"], [False, True]) if served == "dlrm" else (["pool_rank"], [True])
    recs = recs.sort_values(["user", *order[0]], ascending=[True, *order[1]], kind="stable")
    recs["rank"] = recs.groupby("user").cumcount().astype(np.int32)
    top = recs[recs["rank"] < top_k].reset_index(drop=True)
    top["served_stage"] = served
    top["two_tower_run_id"] = two_tower_run_id
    top["dlrm_run_id"] = dlrm_run_id
    top = top[RECOMMENDATION_COLUMNS]
    return publish_recommendations(top, dataset_root, out_dir)
