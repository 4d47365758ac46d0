"""The code location: every asset, check, resource, job and schedule of recsys_assets."""
from __future__ import annotations

import dagster as dg

from recsys_assets.defs.data_assets import data_assets
from recsys_assets.defs.data_checks import data_checks
from recsys_assets.defs.resources import SparkResource, StateResource


def default_resources() -> dict:
    """Embedded defaults: local Spark, state folder from $RECSYS_STATE_DIR (else ./.recsys_state)."""
    return {
        "spark": SparkResource(),
        "state": StateResource(),
    }


defs = dg.Definitions(
    assets=[*data_assets],
    asset_checks=[*data_checks],
    resources=default_resources(),
)
