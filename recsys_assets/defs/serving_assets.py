"""Serving stage: the champion funnel as an MLflow pyfunc model (recsys_assets.serving.online / .pyfunc),
registered as `recsys_two_stage` and served by `make serve` (`mlflow models serve`)."""

import json
from pathlib import Path

import dagster as dg
from pydantic import Field

from recsys_assets.defs.constants import SERVING_GROUP, TOP_K
from recsys_assets.defs.model_registration import register_two_stage
from recsys_assets.defs.resources import MLflowResource, StateResource
from recsys_assets.defs.types import CandidateSet, PublishedFolder, RankingData, TrainedModel

SERVE_PORT = 5001


class TwoStageModelConfig(dg.Config):
    parity_users: int = Field(
        2000,
        ge=0,
        description="Users whose online answer is compared with recommendations.parquet before registration "
        "(0 = every user); any difference fails the gate.",
    )
    min_served_holdout_ndcg: float = Field(
        0.0, ge=0.0, le=1.0, description="The served order's holdout NDCG@10 the gate requires."
    )
    seed: int = 0


def _two_tower_gate_passed(mlflow: MLflowResource, run_id: str) -> bool:
    from recsys_assets.serving import registry as R

    client, name = mlflow.client(), R.REGISTERED_MODELS["two_tower"]
    version = R.version_of_run(client, name, run_id)
    return version is not None and client.get_model_version(name, version).tags.get("gates_passed") == "True"


@dg.asset(
    group_name=SERVING_GROUP,
    kinds={"mlflow", "pytorch"},
    tags={"stage": "serving"},
    description="The served funnel as an MLflow pyfunc model: the Two Tower's query tower, the item vectors and "
    "index, EASE, the DLRM and the feature state it reads, the id maps. Registered as recsys_two_stage (champion "
    "when its gate passes: online answers equal recommendations.parquet, and the models it serves passed "
    "theirs). Serve it with `make serve`.",
)
def two_stage_model(
    context: dg.AssetExecutionContext,
    config: TwoStageModelConfig,
    recommendations: PublishedFolder,
    dlrm_model: TrainedModel,
    two_tower_model: TrainedModel,
    item_index: PublishedFolder,
    retrieval_candidates: CandidateSet,
    ranking_dataset: RankingData,
    mds_splits: PublishedFolder,
    state: StateResource,
    mlflow: MLflowResource,
) -> dg.Output[TrainedModel]:
    from recsys_assets.evaluation.gates import served_stage, two_stage_model_gate
    from recsys_assets.serving.online import bundle_with_parity
    from recsys_assets.serving.pyfunc import log_two_stage_model

    mlflow.check_reachable()
    holdout = json.loads((Path(dlrm_model.path) / "result.json").read_text())["gate"]
    runs = {"two_tower_run_id": two_tower_model.mlflow_run_id, "dlrm_run_id": dlrm_model.mlflow_run_id}
    with mlflow.asset_run(context, model="two_stage", **runs) as run, state.build_folder(context) as build:
        info, parity = bundle_with_parity(
            build,
            parity_users=config.parity_users,
            seed=config.seed,
            two_tower_root=two_tower_model,
            index_root=item_index.path,
            dataset_root=mds_splits.path,
            candidates_root=retrieval_candidates.path,
            ranking_root=ranking_dataset.path,
            dlrm_root=dlrm_model,
            recommendations_root=recommendations.path,
            served_stage=served_stage(holdout, TOP_K)[0],
            provenance=runs,
        )
        gate = two_stage_model_gate(
            parity,
            _two_tower_gate_passed(mlflow, two_tower_model.mlflow_run_id),
            holdout,
            min_served_ndcg=config.min_served_holdout_ndcg,
            k=TOP_K,
        )
        run.log_metrics({k: v for k, v in gate.metadata.items() if isinstance(v, (int, float))})
        model_info = log_two_stage_model(run.tracking_uri, run.id, build)
        version, registry = register_two_stage(context, run, model_info, build, gate)
    uri = f"models:/recsys_two_stage/{version}"
    context.log.info(
        f"online = batch for {parity['identical']} of {parity['users']} users; {uri}: {registry['registry_alias']}"
    )
    return dg.Output(
        TrainedModel(str(build), run.id, version),
        metadata={
            **run.metadata(),
            **registry,
            **gate.metadata,
            "gate_passed": gate.passed,
            "gate_problems": gate.description or "",
            "served_stage": info["served_stage"],
            "model_uri": uri,
            "serve_command": f"MLFLOW_TRACKING_URI={mlflow.resolved_tracking_uri()} mlflow models serve -m "
            f"models:/recsys_two_stage@champion --env-manager local --host 127.0.0.1 --port {SERVE_PORT}  "
            "(or: make serve)",
        },
    )


serving_assets = [two_stage_model]
