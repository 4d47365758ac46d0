"""The code location: every asset, check, resource, job and schedule of recsys_assets."""

import dagster as dg

from recsys_assets.defs.automation import RUN_EXECUTOR, jobs, schedules, sensors
from recsys_assets.defs.data_assets import data_assets
from recsys_assets.defs.data_checks import data_checks
from recsys_assets.defs.evaluation_assets import evaluation_assets, funnel_checks
from recsys_assets.defs.ranking_assets import ranking_assets
from recsys_assets.defs.resources import MLflowResource, SparkResource, StateResource, TorchDistributorResource
from recsys_assets.defs.retrieval_assets import retrieval_assets
from recsys_assets.defs.source_data import interaction_source
from recsys_assets.defs.two_tower_assets import two_tower_assets


def default_resources() -> dict:
    """Embedded defaults: local Spark, CPU/gloo TorchDistributor with 2 processes, MLflow on a SQLite file and
    files under $RECSYS_STATE_DIR (else ./.recsys_state). Scale out by configuring these, not by code."""
    # configured at launch, so run config under `resources: spark:` / `state:` also reaches the resources that
    # depend on them
    spark, state = SparkResource.configure_at_launch(), StateResource.configure_at_launch()
    return {
        "spark": spark,
        "state": state,
        "torch_distributor": TorchDistributorResource(spark=spark),
        "mlflow": MLflowResource(state=state),
    }


defs = dg.Definitions(
    assets=[
        interaction_source,
        *data_assets,
        *two_tower_assets,
        *retrieval_assets,
        *ranking_assets,
        *evaluation_assets,
    ],
    asset_checks=[*data_checks, *funnel_checks],
    resources=default_resources(),
    jobs=jobs,
    schedules=schedules,
    sensors=sensors,
    executor=RUN_EXECUTOR,  # also `dagster asset materialize`'s implicit job (make demo)
)
