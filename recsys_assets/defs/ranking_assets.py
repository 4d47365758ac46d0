"""Ranking stage: ranking_dataset (Spark → MDS) → dlrm_model (TorchDistributor) → recommendations (top-10).

Thin wiring: features in recsys_assets.data.ranking, the model in recsys_assets.models.dlrm, the loop in
recsys_assets.training.dlrm."""
import dataclasses
import json
import shutil
import time
from pathlib import Path

import dagster as dg
from pydantic import Field

from recsys_assets.data import schema as S
from recsys_assets.data.errors import DataValidationError
from recsys_assets.data.publish import publish_folder
from recsys_assets.defs.configs import DLRMConfig, train_config
from recsys_assets.defs.constants import RANKING_GROUP, TOP_K, TRAINING_POOL
from recsys_assets.defs.model_assets import _log_model, metrics_markdown, progress_logger
from recsys_assets.defs.resources import MLflowResource, SparkResource, StateResource, TorchDistributorResource
from recsys_assets.defs.types import CandidateSet, PublishedFolder, RankingData, TrainedModel

class RankingDataConfig(dg.Config):
    num_hard_negatives: int = Field(30, ge=0, description="Retrieved-but-not-picked candidates per training query.")
    holdout_fraction: float = Field(0.2, gt=0, lt=1, description="Users whose validation lists select the ranker's epochs and gate it.")
    cooccurrence_window: int = Field(5, ge=1, description="History items used by the co-occurrence feature.")
    recent_fraction: float = Field(0.1, gt=0, le=1, description="Latest share of fit time counted as 'recent' popularity.")
    seed: int = 0
    mds_partitions: int = Field(2, ge=1)


def _ranking_meta(data: RankingData) -> dict:
    return json.loads((Path(data.path) / "meta.json").read_text())


@dg.asset(
    group_name=RANKING_GROUP,
    kinds={"spark", "parquet"},
    tags={"stage": "ranking"},
    description="The ranker's labelled pairs, built in Spark: validation-phase candidates of the train-only Two "
    "Tower (positives = the validation item; negatives = retrieved items the user did not pick + random items) "
    "with dense features from train rows only → MDS for training; holdout users' full candidate lists and the "
    "test-phase lists (features from train+validation) → Parquet for scoring. No test-period row reaches training.",
)
def ranking_dataset(
    context: dg.AssetExecutionContext,
    config: RankingDataConfig,
    retrieval_candidates: CandidateSet,
    mds_splits: PublishedFolder,
    spark: SparkResource,
    state: StateResource,
) -> dg.Output[RankingData]:
    from pyspark.sql import functions as F

    from recsys_assets.data import ranking as R
    from recsys_assets.models.features import FeatureSpec

    session = spark.spark_session
    paths = S.DatasetPaths(Path(mds_splits.path))
    meta = S.DatasetMeta.load(paths.meta)
    spec = FeatureSpec.from_meta(meta)
    cand_dir = Path(retrieval_candidates.path)
    splits = session.read.parquet(str(paths.splits))
    queries = session.read.parquet(str(cand_dir / "queries.parquet"))
    pairs = session.read.parquet(str(cand_dir / "candidates.parquet")).unionByName(
        session.read.parquet(str(cand_dir / "training_pool.parquet"))
    )
    item_features = session.read.parquet(str(paths.item_features))
    user_features = session.read.parquet(str(paths.user_features))
    max_categories = int(item_features.select(F.max(F.size(S.CATEGORIES))).collect()[0][0] or 0)
    kw = dict(window=config.cooccurrence_window, recent_fraction=config.recent_fraction)
    validation = R.phase_features(splits, queries, pairs, item_features, "validation", **kw)
    test = R.phase_features(splits, queries, pairs, item_features, "test", **kw).filter(F.col(R.SOURCE) == "retrieved")
    bucket = (F.abs(F.xxhash64(F.col(S.USER), F.lit(config.seed))) % 10_000) < int(config.holdout_fraction * 10_000)
    validation = validation.withColumn("_holdout", bucket)

    dest = state.asset_dir("ranking_dataset", context.run_id)
    attrs = spec.attribute_keys
    counts: dict[str, int] = {}
    with publish_folder(dest) as tmp:
        raw = tmp / "_raw"
        # materialize the sampled training pairs once: the seeded shuffle must not be recomputed per read
        R.sample_training_pairs(validation.filter(~F.col("_holdout")).drop("_holdout"), config.num_hard_negatives,
                                config.seed).write.parquet(str(raw / "train"))
        validation.filter(F.col("_holdout") & (F.col(R.SOURCE) == "retrieved")).drop("_holdout").write.parquet(
            str(raw / "holdout"))
        test.write.parquet(str(raw / "test"))
        train_raw = session.read.parquet(str(raw / "train"))
        positives = train_raw.filter(F.col(R.LABEL) > 0.5).count()
        if positives == 0:
            raise DataValidationError("ranking_dataset: no positive training pairs (no validation rows outside the holdout?)")
        stats = R.feature_stats(train_raw)
        cols = dict(user_features=user_features, attribute_columns=attrs, history_length=meta.history_length,
                    max_categories=max_categories)
        label_counts: dict[str, float] = {}
        for name in ("train", "holdout", "test"):
            R.model_columns(session.read.parquet(str(raw / name)), stats, **cols).write.parquet(str(tmp / f"{name}.parquet"))
            row = session.read.parquet(str(tmp / f"{name}.parquet")).agg(F.count(F.lit(1)), F.sum(R.LABEL)).first()
            counts[name], label_counts[name] = int(row[0]), float(row[1] or 0.0)
        R.write_pairs_to_mds(session.read.parquet(str(tmp / "train.parquet")), str(tmp / "mds" / "train"),
                             R.mds_columns(attrs), partitions=config.mds_partitions)
        shutil.rmtree(raw)
        info = {
            "dense_features": list(R.DENSE_FEATURES),
            "feature_stats": stats,
            "attribute_columns": attrs,
            "attribute_cardinalities": dict(spec.user_attributes),
            "num_users": meta.num_users,
            "num_items": meta.num_items,
            "num_categories": meta.num_categories,
            "history_length": meta.history_length,
            "max_categories": max(1, max_categories),
            "rows": counts,
            "positives": {k: int(v) for k, v in label_counts.items()},
            "two_tower_run_id": retrieval_candidates.two_tower_run_id,
            "config": config.model_dump(),
        }
        (tmp / "meta.json").write_text(json.dumps(info, indent=2))
    metadata = {"published_path": dg.MetadataValue.path(str(dest)),
                "dense_features": dg.MetadataValue.json(list(R.DENSE_FEATURES))}
    for name in counts:
        metadata[f"{name}_pairs"] = int(counts[name])
        metadata[f"{name}_positives"] = int(label_counts[name])
    return dg.Output(RankingData(str(dest), retrieval_candidates.two_tower_run_id), metadata=metadata)


def sparse_layout(info: dict, config: DLRMConfig) -> list[dict]:
    """The DLRM's sparse features over ranking_dataset's columns (item and history share the item table)."""
    layout = []
    if config.use_user_id:
        layout.append(dict(name=S.USER, table="user", num_embeddings=int(info["num_users"])))
    if config.use_item_id:
        layout.append(dict(name=S.ITEM, table="item", num_embeddings=int(info["num_items"])))
    if config.use_history:
        layout.append(dict(name=S.HISTORY, table="item", num_embeddings=int(info["num_items"]), multi_valued=True))
    if config.use_categories and int(info["num_categories"]) > 0:
        layout.append(dict(name=S.CATEGORIES, table="category", num_embeddings=int(info["num_categories"]),
                           multi_valued=True))
    if config.use_user_attributes:
        for col in info["attribute_columns"]:
            layout.append(dict(name=col, table=col, num_embeddings=int(info["attribute_cardinalities"][col])))
    if not layout:
        # a DLRM needs one sparse feature: the item id is the one every dataset has
        layout.append(dict(name=S.ITEM, table="item", num_embeddings=int(info["num_items"])))
    return layout


@dg.asset(
    group_name=RANKING_GROUP,
    kinds={"pytorch", "torchrec", "mlflow"},
    tags={"stage": "ranking"},
    pool=TRAINING_POOL,
    description="DLRM ranker (TorchRec EmbeddingBagCollection + bottom MLP + pairwise dot interaction + top MLP), "
    "trained by TorchDistributor on ranking_dataset; epochs chosen on the holdout users' candidate lists "
    "(NDCG@10); AUROC / log-loss on holdout and test pairs; recorded in MLflow.",
)
def dlrm_model(
    context: dg.AssetExecutionContext,
    config: DLRMConfig,
    ranking_dataset: RankingData,
    torch_distributor: TorchDistributorResource,
    mlflow: MLflowResource,
    spark: SparkResource,
    state: StateResource,
) -> dg.Output[TrainedModel]:
    import numpy as np
    import pandas as pd
    import torch

    from recsys_assets.evaluation.lists import compare_orders
    from recsys_assets.training.dlrm import DLRMTrainConfig, train_dlrm

    torch_distributor.validate()
    mlflow.check_reachable()
    info = _ranking_meta(ranking_dataset)
    layout = sparse_layout(info, config)
    root = Path(ranking_dataset.path)
    # a retry of a failed run (dagster/max_retries) resumes after the last finished epoch
    checkpoints = state.checkpoint_dir(context)
    run_settings = dict(
        train_mds=(str(root / "mds" / "train"),),
        layout=tuple(layout),
        dense_in_features=len(info["dense_features"]),
        eval_sets={"holdout": str(root / "holdout.parquet"), "test": str(root / "test.parquet")},
        selection_set="holdout",
        use_gpu=torch_distributor.use_gpu,
        mlflow_tracking_uri=mlflow.resolved_tracking_uri(),
        checkpoint_dir=str(checkpoints),
    )
    train_config(DLRMTrainConfig, config, **run_settings)  # bad config fails here, before a run or processes start
    run_id = mlflow.start_asset_run(context, model="dlrm", two_tower_run_id=ranking_dataset.two_tower_run_id,
                                    checkpoint_dir=checkpoints)
    client = mlflow.client()
    dest = state.asset_dir("dlrm_model", context.run_id)
    try:
        mlflow.log_params(run_id, {**config.model_dump(), "num_processes": torch_distributor.num_processes,
                                   "data": ranking_dataset.path, **{f"rows_{k}": v for k, v in info["rows"].items()}})
        with publish_folder(dest) as tmp:
            t0 = time.time()
            result = torch_distributor.run(
                context, spark, train_dlrm,
                train_config(DLRMTrainConfig, config, **run_settings, mlflow_run_id=run_id,
                             progress_file=str(tmp / "progress.jsonl")),
                progress_file=tmp / "progress.jsonl", on_progress=progress_logger(context, "dlrm"),
            )
            train_seconds = time.time() - t0
            torch.save({"state_dict": result.state_dict, "model_config": result.model_config, "layout": result.layout},
                       tmp / "model.pt")
            # the gate's evidence: on the holdout lists, the DLRM order vs the Two Tower's own order
            holdout = pd.read_parquet(root / "holdout.parquet", columns=["query_id", "label", "retrieval_score"])
            labels, qids = holdout["label"].to_numpy(), holdout["query_id"].to_numpy()
            orders = compare_orders(qids, labels, {"two_stage": result.eval_scores["holdout"],
                                                   "two_tower": holdout["retrieval_score"].to_numpy()}, (TOP_K,))
            two_stage, two_tower = orders["two_stage"], orders["two_tower"]
            gate = {"holdout_two_stage": two_stage, "holdout_two_tower": two_tower,
                    "holdout_queries": int(len(np.unique(qids))), "min_gain": config.gate_min_gain}
            (tmp / "result.json").write_text(json.dumps({
                "best_epoch": result.best_epoch, "final_metrics": result.final_metrics, "history": result.history,
                "gate": gate, "samples_per_second": result.samples_per_second}, indent=2, default=float))
            (tmp / "plan.txt").write_text(result.plan_text)
            model = result.load_model()
            _log_model(mlflow, run_id, model)
            for name, metrics in result.final_metrics.items():
                for k, v in metrics.items():
                    client.log_metric(run_id, f"final_{name}/{k}".replace("@", "_at_"), float(v))
            for k, v in two_tower.items():
                client.log_metric(run_id, f"final_holdout/two_tower_{k}".replace("@", "_at_"), float(v))
            curves = _curves(result.history, tmp / "training_curves.png")
            if curves is not None:
                from recsys_assets.defs.plots import log_png_to_mlflow

                log_png_to_mlflow(mlflow.resolved_tracking_uri(), run_id, curves)
    except BaseException as exc:
        mlflow.end_run(run_id, failed=exc)
        raise
    mlflow.end_run(run_id)
    shutil.rmtree(checkpoints, ignore_errors=True)  # published: nothing left to resume
    rows = {f"{name} pairs": m for name, m in result.final_metrics.items()}
    rows["holdout lists: Two Tower order"] = two_tower
    metadata = {
        "mlflow_run": dg.MetadataValue.url(mlflow.run_url(run_id)),
        "mlflow_run_id": run_id,
        "metrics": dg.MetadataValue.md(metrics_markdown(rows)),
        "published_path": dg.MetadataValue.path(str(dest)),
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "samples_per_second": float(result.samples_per_second),
        "train_seconds": float(train_seconds),
        "world_size": result.world_size,
        "sparse_features": dg.MetadataValue.json([f["name"] for f in layout]),
        "sharding_plan": dg.MetadataValue.md(f"```\n{result.plan_text}\n```"),
        "holdout_two_tower_ndcg@10": float(two_tower["ndcg@10"]),
        "resumed_from_step": -1 if result.resumed_from_step is None else int(result.resumed_from_step),
    }
    if (dest / "training_curves.png").exists():
        from recsys_assets.defs.plots import image_markdown

        metadata["training_curves"] = dg.MetadataValue.md(image_markdown(dest / "training_curves.png", "DLRM training"))
        metadata["training_curves_path"] = dg.MetadataValue.path(str(dest / "training_curves.png"))
    for name, metrics in result.final_metrics.items():
        for k, v in metrics.items():
            metadata[f"{name}_{k}"] = float(v)
    return dg.Output(TrainedModel(path=str(dest), mlflow_run_id=run_id), metadata=metadata)


def _curves(history: list, path: Path):
    from recsys_assets.defs.plots import training_curves_png

    flat = [{"epoch": h["epoch"], "loss": h["loss"], "metrics": h["metrics"].get("holdout", {})} for h in history]
    try:
        return training_curves_png(flat, path, title="DLRM: train loss, holdout lists")
    except Exception:  # a picture must never fail a training run
        return None


def load_dlrm_model(model: TrainedModel):
    """(unsharded DLRM, layout, DLRMModelConfig) from a published folder (weights_only)."""
    import torch

    from recsys_assets.models.dlrm import DLRMModelConfig, layout_from_dicts, load_dlrm

    blob = torch.load(Path(model.path) / "model.pt", weights_only=True)
    layout = layout_from_dicts(blob["layout"])
    cfg = DLRMModelConfig.from_dict(blob["model_config"])
    return load_dlrm(blob["state_dict"], layout, cfg), layout, cfg


class RecommendationsConfig(dg.Config):
    top_k: int = Field(10, ge=1)


@dg.asset(
    group_name=RANKING_GROUP,
    kinds={"pytorch", "parquet"},
    tags={"stage": "ranking"},
    description="Top-K per user (K=10) after the DLRM re-ranks the Two Tower's candidates at the evaluation "
    "cutoff: Parquet (user, rank, item, dlrm_score, retrieval_score, retrieval_rank, model run ids).",
)
def recommendations(
    context: dg.AssetExecutionContext,
    config: RecommendationsConfig,
    dlrm_model: TrainedModel,
    ranking_dataset: RankingData,
    state: StateResource,
) -> dg.Output[PublishedFolder]:
    import numpy as np
    import pandas as pd
    import torch

    from recsys_assets.models.dlrm import DLRMScorer
    from recsys_assets.data.pairs import load_pair_set

    model, layout, cfg = load_dlrm_model(dlrm_model)
    root = Path(ranking_dataset.path)
    pairs = load_pair_set(root / "test.parquet", layout, cfg.dense_in_features)
    scorer = DLRMScorer(model, layout, cfg)
    scores = np.concatenate([scorer(pairs.rows(s, min(s + 8192, pairs.n))).numpy() for s in range(0, pairs.n, 8192)])
    meta = pd.read_parquet(root / "test.parquet", columns=["user", "item", "retrieval_score", "retrieval_rank"])
    meta["dlrm_score"] = scores.astype(np.float32)
    meta = meta.sort_values(["user", "dlrm_score", "retrieval_rank"], ascending=[True, False, True], kind="stable")
    meta["rank"] = meta.groupby("user").cumcount().astype(np.int32)
    top = meta[meta["rank"] < config.top_k].reset_index(drop=True)
    top["two_tower_run_id"] = ranking_dataset.two_tower_run_id
    top["dlrm_run_id"] = dlrm_model.mlflow_run_id
    dest = state.asset_dir("recommendations", context.run_id)
    with publish_folder(dest) as tmp:
        top[["user", "rank", "item", "dlrm_score", "retrieval_score", "retrieval_rank", "two_tower_run_id",
             "dlrm_run_id"]].to_parquet(tmp / "recommendations.parquet", index=False)
    moved = float((top["retrieval_rank"] >= config.top_k).mean()) if len(top) else 0.0
    return dg.Output(
        PublishedFolder(str(dest)),
        metadata={
            "published_path": dg.MetadataValue.path(str(dest)),
            "users": int(top["user"].nunique()),
            "rows": int(len(top)),
            "share_from_beyond_retrieval_top_k": moved,
            "two_tower_run_id": ranking_dataset.two_tower_run_id,
            "dlrm_run_id": dlrm_model.mlflow_run_id,
            "preview": dg.MetadataValue.md(top.head(10).to_markdown(index=False) if len(top) else "(empty)"),
        },
    )


ranking_assets = [ranking_dataset, dlrm_model, recommendations]
