"""Ranking stage: ranking_dataset (Spark → MDS: recsys_assets.data.ranking) → dlrm_model (TorchDistributor:
recsys_assets.training.runs) → recommendations (top-K re-ranked: recsys_assets.serving.rerank)."""

import dataclasses
import json
from pathlib import Path

import dagster as dg
from pydantic import Field

from recsys_assets.defs.configs import DLRMConfig, search_budget, train_config
from recsys_assets.defs.constants import RANKING_GROUP, TOP_K, TRAINING_POOL
from recsys_assets.defs.helpers import TrainedOnce, curves_metadata, launcher, training_metadata
from recsys_assets.defs.model_registration import register_dlrm, served_versions
from recsys_assets.defs.model_training import train_model_asset
from recsys_assets.defs.resources import MLflowResource, SparkResource, StateResource, TorchDistributorResource
from recsys_assets.defs.types import CandidateSet, PublishedFolder, RankingData, TrainedModel

# recommendation rows shown in the asset's metadata
PREVIEW_ROWS = 10


class RankingDataConfig(dg.Config):
    num_hard_negatives: int = Field(30, ge=0, description="Retrieved-but-not-picked candidates per training query.")
    holdout_fraction: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="Without a ranker window (interaction_splits ranker_window 0): the hashed share of users whose "
        "validation lists select the ranker's epochs and gate it (the others' train it). With a window, every "
        "user's validation list does.",
    )
    cooccurrence_window: int = Field(5, ge=1, description="History items used by the co-occurrence feature.")
    recent_fraction: float = Field(
        0.1, gt=0, le=1, description="Latest share of fit time counted as 'recent' popularity."
    )
    seed: int = 0
    mds_partitions: int = Field(2, ge=1)
    drop_later_train_items: bool = Field(
        True,
        description="A ranker-window list drops the negatives that are the user's own later train rows (they are "
        "not 'not picked'). Labels only: no feature or candidate reads them.",
    )
    window_lists_with_a_hit: bool = Field(
        True,
        description="With a ranker window, train only on the lists whose item retrieval found (the ranker only "
        "reorders the pool; an appended missed item carries the ranks of a miss). Without a window the missed "
        "validation item is appended, as before the window.",
    )


class RecommendationsConfig(dg.Config):
    top_k: int = Field(TOP_K, ge=1)


@dg.asset(
    group_name=RANKING_GROUP,
    kinds={"spark", "parquet"},
    tags={"stage": "ranking"},
    description="The ranker's labelled pairs, built in Spark, each phase from its own fit rows (recsys_assets.data."
    "phases): the ranker window's lists (candidates of the Two Tower and EASE fitted on the train rows before the "
    "window; positives = the window row's item; negatives = retrieved items the user did not pick + random items) "
    "→ MDS for training; every user's validation lists (train-only fits) → the holdout that chooses epochs, stage "
    "and gate; the test lists (features from train+validation) → Parquet for serving. Dense features from one "
    "registry (recsys_assets.data.ranker_features), their fit-row states in features/. No row at or after a "
    "query's own reaches its features or candidates.",
)
def ranking_dataset(
    context: dg.AssetExecutionContext,
    config: RankingDataConfig,
    retrieval_candidates: CandidateSet,
    mds_splits: PublishedFolder,
    spark: SparkResource,
    state: StateResource,
) -> dg.Output[RankingData]:
    from recsys_assets.data.ranking import DENSE_FEATURES, RankingDataSettings, build_ranking_dataset

    run_id = retrieval_candidates.two_tower_run_id
    with state.build_folder(context) as build:
        info = build_ranking_dataset(
            spark.spark_session,
            mds_splits.path,
            retrieval_candidates.path,
            build,
            RankingDataSettings(**config.model_dump()),
            {"two_tower_run_id": run_id},
        )
    metadata = {
        "dense_features": dg.MetadataValue.json(list(DENSE_FEATURES)),
        "table_phases": dg.MetadataValue.json(info["phases"]),
    }
    for name, rows in info["rows"].items():
        metadata[f"{name}_pairs"] = int(rows)
        metadata[f"{name}_positives"] = int(info["positives"][name])
        metadata[f"{name}_lists"] = int(info["lists"][name])
    # the test lists: what `recommendations` serves from
    return dg.Output(RankingData(str(build), run_id, table="test.parquet"), metadata=metadata)


@dg.asset(
    group_name=RANKING_GROUP,
    kinds={"pytorch", "torchrec", "mlflow"},
    tags={"stage": "ranking"},
    pool=TRAINING_POOL,
    description="DLRM ranker (TorchRec EmbeddingBagCollection + bottom MLP + pairwise dot interaction + top MLP), "
    "trained by TorchDistributor on ranking_dataset; epochs chosen on the holdout users' candidate lists "
    "(NDCG@10); AUROC / log-loss on holdout and test pairs; recorded in MLflow. With search_trials, an Optuna "
    "search chooses the settings and feature switches on the holdout lists first (each trial a nested MLflow run).",
)
def dlrm_model(
    context: dg.AssetExecutionContext,
    config: DLRMConfig,
    ranking_dataset: RankingData,
    torch_distributor: TorchDistributorResource,
    mlflow: MLflowResource,
    state: StateResource,
) -> dg.Output[TrainedModel]:
    info = json.loads((Path(ranking_dataset.path) / "meta.json").read_text())
    run_settings = dict(
        use_gpu=torch_distributor.use_gpu,
        mlflow_tracking_uri=mlflow.resolved_tracking_uri(),
        checkpoint_dir=str(state.checkpoint_dir(context)),  # a retry resumes after its last finished epoch
    )
    from recsys_assets.training.dlrm import score_final_sets

    # the fit reuses a search trial of its own settings and scores the test pairs on its weights
    trained = TrainedOnce(context.log.info, unscored=("final_sets",), complete=score_final_sets)
    recipe = DLRMRecipe(context, config, ranking_dataset, info, torch_distributor, run_settings, trained)
    return train_model_asset(context, recipe, torch_distributor, mlflow, state)


@dataclasses.dataclass(frozen=True)
class DLRMRecipe:
    """The DLRM's steps of the model-asset template (defs/model_training.py). The sparse layout follows the
    config's feature switches, so a search trial's switches choose its layout."""

    context: dg.AssetExecutionContext
    config: DLRMConfig
    ranking_dataset: RankingData
    info: dict
    torch_distributor: TorchDistributorResource
    run_settings: dict
    trained: TrainedOnce
    model: str = "dlrm"

    def settings_of(self, config: DLRMConfig) -> tuple[list, dict]:
        """The sparse layout of `config` and its training settings; a bad config fails here."""
        from recsys_assets.data.ranker_features import SPARSE_SWITCHES
        from recsys_assets.data.ranking import sparse_layout
        from recsys_assets.training.dlrm import DLRMTrainConfig
        from recsys_assets.training.runs import dlrm_data_settings

        layout = sparse_layout(self.info, {name: getattr(config, name) for name in SPARSE_SWITCHES})
        settings = {**dlrm_data_settings(self.ranking_dataset.path, self.info, layout), **self.run_settings}
        train_config(DLRMTrainConfig, config, **settings)
        return layout, settings

    def _train_config(self, config: DLRMConfig, **fields):
        from recsys_assets.training.dlrm import DLRMTrainConfig

        return train_config(DLRMTrainConfig, config, **{**self.settings_of(config)[1], **fields})

    def check_inputs(self) -> None:
        self.settings_of(self.config)

    def run_tags(self) -> dict:
        return {"two_tower_run_id": self.ranking_dataset.two_tower_run_id}

    def search(self, run, build: Path):
        from recsys_assets.training.search import MlflowTrialRuns, search_dlrm

        return search_dlrm(
            self.trained.record(launcher(self.context, self.torch_distributor, "dlrm search")),
            lambda settings, **fields: self._train_config(self.config.model_copy(update=settings), **fields),
            search_budget(self.config),
            baseline=self.config.model_dump(),
            work_dir=build / "search",
            trial_runs=MlflowTrialRuns(run.tracking_uri, run.id),
            log=self.context.log.info,
        )

    def with_settings(self, settings: dict) -> "DLRMRecipe":
        return dataclasses.replace(self, config=self.config.model_copy(update=settings))

    def data_params(self) -> dict:
        return {"data": self.ranking_dataset.path, **{f"rows_{k}": v for k, v in self.info["rows"].items()}}

    def fit(self, run, build: Path, checkpoints: Path):
        from recsys_assets.training.runs import fit_dlrm

        return fit_dlrm(
            self.trained.reuse(launcher(self.context, self.torch_distributor, "dlrm")),
            lambda **fields: self._train_config(self.config, mlflow_run_id=run.id, **fields),
            build,
            self.ranking_dataset.path,
            min_gain=self.config.gate_min_gain,
            k=TOP_K,
        )

    def final_model(self, fit):
        return fit.result.load_model()

    def log_results(self, run, fit) -> None:
        result, retrieval = fit.result, fit.gate["holdout_retrieval"]
        run.log_metrics({f"final_{name}/{k}": v for name, m in result.final_metrics.items() for k, v in m.items()})
        run.log_metrics({f"final_holdout/retrieval_{k}": v for k, v in retrieval.items()})
        if fit.curves is not None:
            run.log_artifact(fit.curves, "plots")

    def register(self, run, model_info, build: Path, fit) -> tuple[str, dict]:
        return register_dlrm(self.context, run, model_info, build, self.ranking_dataset.path, self.info, fit.gate)

    def metadata(self, fit, folder: Path, checkpoints: Path) -> dict:
        layout = self.settings_of(self.config)[0]
        return {**_fit_metadata(fit, folder), "sparse_features": dg.MetadataValue.json([f["name"] for f in layout])}


def _fit_metadata(fit, folder: Path) -> dict:
    """The ranker's metrics on every evaluation set, the Two Tower order of the holdout lists, curves."""
    result, retrieval = fit.result, fit.gate["holdout_retrieval"]
    rows = {
        **{f"{name} pairs": m for name, m in result.final_metrics.items()},
        "holdout lists: retrieval order": retrieval,
    }
    return {
        **training_metadata(result, fit.train_seconds, rows),
        f"holdout_retrieval_ndcg@{TOP_K}": float(retrieval[f"ndcg@{TOP_K}"]),
        "resumed_from_step": -1 if result.resumed_from_step is None else int(result.resumed_from_step),
        **curves_metadata(folder, {"holdout": fit.curves} if fit.curves else {}, "dlrm"),
        **{f"{name}_{k}": float(v) for name, m in result.final_metrics.items() for k, v in m.items()},
    }


@dg.asset(
    group_name=RANKING_GROUP,
    kinds={"pytorch", "parquet"},
    tags={"stage": "ranking"},
    description=f"Top-K per user (K={TOP_K}) over the retrieval candidates at the evaluation cutoff, in the order "
    "of the stage that wins on the holdout lists (the DLRM's, or the retrieval order when the ranker does not "
    "improve it; metadata says which and why): Parquet (the source's user_id, rank, item_id, title, categories, dlrm_score, retrieval_score, "
    "retrieval_rank, pool_rank, served_stage, internal user/item ids, model run ids) + popular.parquet (the lookup's fallback). "
    "Look a user up with `python -m recsys_assets.cli recommend --user <id>`.",
)
def recommendations(
    context: dg.AssetExecutionContext,
    config: RecommendationsConfig,
    dlrm_model: TrainedModel,
    ranking_dataset: RankingData,
    mds_splits: PublishedFolder,
    state: StateResource,
    mlflow: MLflowResource,
) -> dg.Output[PublishedFolder]:
    from recsys_assets.evaluation.gates import served_stage
    from recsys_assets.serving.rerank import recommend

    run_ids = {"two_tower_run_id": ranking_dataset.two_tower_run_id, "dlrm_run_id": dlrm_model.mlflow_run_id}
    served, why = served_stage(json.loads((Path(dlrm_model.path) / "result.json").read_text())["gate"], TOP_K)
    context.log.info(why)
    with state.build_folder(context) as build:
        top = recommend(
            dlrm_model,
            ranking_dataset.path,
            build,
            dataset_root=mds_splits.path,
            top_k=config.top_k,
            served=served,
            **run_ids,
        )
    return dg.Output(
        PublishedFolder(str(build), table="recommendations.parquet"),
        metadata={
            "served_stage": served,
            "served_stage_reason": why,
            "users": int(top["user"].nunique()),
            "rows": int(len(top)),
            "share_from_beyond_retrieval_top_k": float((top["retrieval_rank"] >= config.top_k).mean())
            if len(top)
            else 0.0,
            **run_ids,
            **served_versions(mlflow, ranking_dataset.two_tower_run_id, dlrm_model),
            "preview": dg.MetadataValue.md(top.head(PREVIEW_ROWS).to_markdown(index=False) if len(top) else "(empty)"),
        },
    )


ranking_assets = [ranking_dataset, dlrm_model, recommendations]
