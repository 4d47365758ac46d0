"""Evaluation stage: every model and baseline through the one evaluator (recsys_assets.evaluation.report), and
the quality checks (recsys_assets.evaluation.gates). One quality gate blocks: the served list must beat
MostPopular on validation; a failure stops everything downstream and says why. The leak check on the ranker's
data blocks too (a correctness check, not a quality one)."""

import json
from pathlib import Path

import dagster as dg
from pydantic import Field

from recsys_assets.defs.constants import EVALUATION_GROUP, TOP_K
from recsys_assets.defs.helpers import check_result
from recsys_assets.defs.resources import MLflowResource, SparkResource, StateResource
from recsys_assets.defs.types import CandidateSet, PublishedFolder, RankingData, TrainedModel
from recsys_assets.evaluation import gates
from recsys_assets.evaluation.plots import image_markdown


class EvaluationConfig(dg.Config):
    ease: bool = Field(True, description="EASE (closed form), λ tuned on validation.")
    ease_lambdas: list[float] = Field([50.0, 200.0, 500.0, 1000.0], description="EASE λ grid (chosen on validation).")
    ease_max_items: int | None = Field(
        None,
        ge=1,
        description="EASE is closed form (a float32 items × items matrix): it steps aside above this catalog size. "
        "Unset: the size whose matrix fits in 40% of the memory available when the step starts.",
    )
    als: bool = Field(True, description="Spark ALS (implicit), tuned on validation.")
    als_ranks: list[int] = Field(
        [64, 32], description="ALS grid, tried in order (first values first): put the most promising first."
    )
    als_reg_params: list[float] = Field([0.1])
    als_alphas: list[float] = Field([1.0])
    als_max_iter: int = Field(10, ge=1)
    als_budget_seconds: float = Field(
        300.0,
        ge=0,
        description="ALS validation grid budget: a point starts only if the grid would end within it at the "
        "slowest point's pace (the first always runs); the skipped points are logged and in `grids` metadata.",
    )
    sasrec: bool = Field(
        False, description="SASRec (self-attention over each user's sequence), epochs chosen on validation; minutes."
    )
    sasrec_epochs: list[int] = Field([5, 10], description="SASRec epochs grid (chosen on validation).")


@dg.asset(
    group_name=EVALUATION_GROUP,
    kinds={"pytorch", "spark", "mlflow"},
    tags={"stage": "evaluation"},
    description="Test phase, full ranking with train and validation items excluded, one evaluator for all: "
    "retrieval HR@K, the Two Tower alone, the two-stage list (DLRM over the candidates), MostPopular, "
    "LastItemMarkov, EASE and Spark ALS (tuned on validation). Table + bar chart in metadata and MLflow.",
)
def evaluation(
    context: dg.AssetExecutionContext,
    config: EvaluationConfig,
    mds_splits: PublishedFolder,
    two_tower_model: TrainedModel,
    retrieval_candidates: CandidateSet,
    recommendations: PublishedFolder,
    spark: SparkResource,
    mlflow: MLflowResource,
    state: StateResource,
) -> dg.Output[PublishedFolder]:
    from recsys_assets.evaluation.report import evaluate_funnel, write_report
    from recsys_assets.serving.candidates import two_tower_scorer

    mlflow.check_reachable()
    report = evaluate_funnel(
        mds_splits.path,
        # the served model as a score function of the splits the report reads (once)
        lambda splits: two_tower_scorer(two_tower_model, mds_splits.path, splits),
        retrieval_candidates.path,
        recommendations.path,
        top_k=TOP_K,
        session=spark.spark_session if config.als else None,
        log=context.log.info,
        **config.model_dump(),
    )
    flat = report.flat()
    with (
        mlflow.asset_run(
            context, two_tower_run_id=two_tower_model.mlflow_run_id, dlrm_run_id=report.dlrm_run_id
        ) as run,
        state.build_folder(context) as build,
    ):
        chart = write_report(report, build, warn=context.log.warning)
        run.log_metrics(flat)
        run.log_text(report.table, "evaluation.md")
        if chart is not None:
            run.log_artifact(chart, "plots")
    context.log.info("\n" + report.table)
    metadata = {
        "mlflow_run": dg.MetadataValue.url(run.url()),
        "metrics": dg.MetadataValue.md(report.table),
        "test_users": report.test_users,
        "split": report.split,
        "served_stage": report.served_stage,
        # where the minutes went, and which grid points ran (or were skipped by a budget)
        "stage_seconds": dg.MetadataValue.json({k: round(v, 2) for k, v in report.seconds.items()}),
        "grids": dg.MetadataValue.json(report.grids),
        **flat,
    }
    if chart is not None:
        alt = f"HR@{TOP_K} and NDCG@{TOP_K}"
        metadata["chart"] = dg.MetadataValue.md(image_markdown(build / chart.name, alt))
    return dg.Output(PublishedFolder(str(build)), metadata=metadata)


# ------------------------------------------------------------------------------------------------ gates
@dg.asset_check(
    asset="dlrm_model",
    additional_ins={"mds_splits": dg.AssetIn("mds_splits"), "ranking_dataset": dg.AssetIn("ranking_dataset")},
    blocking=True,
    description=f"Gate: the list that will be served (the DLRM order, or the retrieval order when the ranker does "
    f"not improve it) beats MostPopular on the holdout users' validation rows (NDCG@{TOP_K}, one evaluator). A "
    "failure stops the recommendations and the evaluation, and says so.",
)
def served_list_beats_most_popular(
    dlrm_model: TrainedModel, mds_splits: PublishedFolder, ranking_dataset: RankingData
) -> dg.AssetCheckResult:
    gate = json.loads((Path(dlrm_model.path) / "result.json").read_text())["gate"]
    return check_result(gates.served_list_beats_most_popular(gate, ranking_dataset.path, mds_splits.path, k=TOP_K))


@dg.asset_check(
    asset="two_tower_model",
    additional_ins={"mds_splits": dg.AssetIn("mds_splits")},
    description=f"The Two Tower beats MostPopular on validation NDCG@{TOP_K} (same split, same evaluator). Not "
    "blocking: the item-item source and the ranker can still make the served list good.",
)
def two_tower_beats_most_popular(two_tower_model: TrainedModel, mds_splits: PublishedFolder) -> dg.AssetCheckResult:
    return check_result(gates.two_tower_beats_most_popular(two_tower_model.path, mds_splits.path, k=TOP_K))


@dg.asset_check(
    asset="dlrm_model",
    description=f"On the holdout users' validation lists, the DLRM order is at least as good as the retrieval "
    f"order (NDCG@{TOP_K}). Not blocking: when it fails, `recommendations` serves the retrieval order.",
)
def two_stage_at_least_two_tower(dlrm_model: TrainedModel) -> dg.AssetCheckResult:
    gate = json.loads((Path(dlrm_model.path) / "result.json").read_text())["gate"]
    return check_result(gates.two_stage_at_least_two_tower(gate, k=TOP_K))


@dg.asset_check(
    asset="ranking_dataset",
    additional_ins={"mds_splits": dg.AssetIn("mds_splits")},
    blocking=True,
    description="No test-period information in the ranker's training or holdout pairs: each is a query of a "
    "phase before test whose positive is its own row's item, at that row's time.",
)
def ranking_data_has_no_test_period(ranking_dataset: RankingData, mds_splits: PublishedFolder) -> dg.AssetCheckResult:
    return check_result(gates.ranking_data_has_no_test_period(ranking_dataset.path, mds_splits.path))


@dg.asset_check(
    asset="ranking_dataset",
    additional_ins={"mds_splits": dg.AssetIn("mds_splits"), "retrieval_candidates": dg.AssetIn("retrieval_candidates")},
    blocking=True,
    description="No query sees a row at or after its own place in the user's order: the Two Tower fit and the EASE "
    "source behind its candidates, and the state its features were computed from, were all fitted on rows "
    "before it (recsys_assets.data.phases), for every phase.",
)
def ranker_queries_see_only_earlier_rows(
    ranking_dataset: RankingData, retrieval_candidates: CandidateSet, mds_splits: PublishedFolder
) -> dg.AssetCheckResult:
    return check_result(
        gates.queries_see_only_earlier_rows(ranking_dataset.path, retrieval_candidates.path, mds_splits.path)
    )


evaluation_assets = [evaluation]
funnel_checks = [
    served_list_beats_most_popular,
    two_tower_beats_most_popular,
    two_stage_at_least_two_tower,
    ranking_data_has_no_test_period,
    ranker_queries_see_only_earlier_rows,
]
