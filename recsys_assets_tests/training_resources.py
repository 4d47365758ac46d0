"""The graph's resources for tests that materialize training assets, wired the way the project wires them."""

from __future__ import annotations

from pathlib import Path


def training_resources(root: Path, tracking_uri: str | None = None) -> dict:
    """Every resource of the graph, the way the project wires them (MLflow on the state, TorchDistributor on
    Spark, the I/O manager on the state): local Spark, 2 CPU processes, state and MLflow (SQLite, by default) under
    `root`."""
    from recsys_assets.defs.resources import MLflowResource, SparkResource, StateResource, TorchDistributorResource
    from recsys_assets.defs.storage import AssetFolderIOManager

    spark, state = SparkResource(master="local[2]", shuffle_partitions=4), StateResource(root=str(root / "state"))
    return {
        "spark": spark,
        "state": state,
        "torch_distributor": TorchDistributorResource(
            spark=spark, num_processes=2, local_mode=True, timeout_seconds=600
        ),
        "mlflow": MLflowResource(
            state=state,
            tracking_uri=tracking_uri or f"sqlite:///{root}/mlflow.db",
            artifact_location=(root / "artifacts").as_uri(),
        ),
        "io_manager": AssetFolderIOManager(state=state),
    }
