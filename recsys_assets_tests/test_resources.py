"""Resources declare what they depend on: MLflow's fallback store lives under the configured state root, set in code
or at launch, never under a fresh default one; TorchDistributor launches from the configured Spark resource."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from recsys_assets.defs.resources import MLflowResource, SparkResource, StateResource, TorchDistributorResource


@dg.asset
def mlflow_store_probe(mlflow: MLflowResource, state: StateResource) -> dg.MaterializeResult:
    """Creates the experiment in the fallback store and reports where it went (as metadata: no output)."""
    return dg.MaterializeResult(
        metadata={
            "experiment_id": mlflow.experiment_id(),
            "tracking_uri": mlflow.resolved_tracking_uri(),
            "artifacts": mlflow.resolved_artifact_location(),
            "state_root": str(state.resolved_root()),
        }
    )


@pytest.fixture
def other_state_dir(tmp_path, monkeypatch) -> Path:
    """The environment points elsewhere, so only the configured root can explain where the store lands."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("RECSYS_STATE_DIR", str(tmp_path / "from_env"))
    return tmp_path / "from_env"


def _probe(resources: dict, run_config: dict | None = None) -> dict:
    result = dg.materialize([mlflow_store_probe], resources=resources, run_config=run_config or {})
    assert result.success
    return _probe_metadata(result)


def _probe_metadata(result) -> dict:
    [event] = result.get_asset_materialization_events()
    return {k: v.value for k, v in event.materialization.metadata.items()}


def _assert_store_under(root: Path, probe: dict) -> None:
    db = root.resolve() / "mlflow" / "mlflow.db"
    assert probe["state_root"] == str(root.resolve())
    assert probe["tracking_uri"] == f"sqlite:///{db}"
    assert probe["artifacts"] == (root.resolve() / "mlflow" / "artifacts").as_uri()
    assert db.is_file()
    from mlflow.tracking import MlflowClient

    assert MlflowClient(tracking_uri=f"sqlite:///{db}").get_experiment(probe["experiment_id"]) is not None


def test_state_root_set_at_launch_is_where_the_default_definitions_put_mlflow(tmp_path, other_state_dir):
    from recsys_assets.defs.resources import default_resources

    root = tmp_path / "configured"
    probe = _probe(default_resources(), {"resources": {"state": {"config": {"root": str(root)}}}})
    _assert_store_under(root, probe)
    assert not (other_state_dir / "mlflow").exists()


def test_state_root_set_in_code_is_where_mlflow_stores(tmp_path, other_state_dir):
    state = StateResource(root=str(tmp_path / "in_code"))
    probe = _probe({"state": state, "mlflow": MLflowResource(state=state)})
    _assert_store_under(tmp_path / "in_code", probe)
    assert not (other_state_dir / "mlflow").exists()


@dg.asset
def distributor_spark_probe(torch_distributor: TorchDistributorResource, spark: SparkResource) -> dg.MaterializeResult:
    """The Spark settings TorchDistributor would launch from, next to the top-level resource's (no session starts),
    as metadata (no output: the project's I/O manager stores asset folders only)."""
    nested, top_level = torch_distributor.spark.resolved_config(), spark.resolved_config()
    return dg.MaterializeResult(metadata={"nested": dg.MetadataValue.json(nested), "top_level": top_level})


def test_spark_configured_at_launch_is_the_one_torch_distributor_launches_from():
    from recsys_assets.defs.resources import default_resources

    spark_config = {"master": "local[1]", "app_name": "configured_at_launch"}
    result = dg.materialize(
        [distributor_spark_probe],
        resources=default_resources(),
        run_config={"resources": {"spark": {"config": spark_config}}},
    )
    assert result.success
    probe = _probe_metadata(result)
    assert probe["nested"] == probe["top_level"]
    assert probe["nested"]["spark.master"] == "local[1]"
    assert probe["nested"]["spark.app.name"] == "configured_at_launch"


SESSION_SETTINGS = """
import json, sys
from recsys_assets.defs.resources import SparkResource
spark = SparkResource(
    master="local[1]", app_name="settings_probe", shuffle_partitions=3, spark_config={"spark.sql.shuffle.partitions": "5"}
).spark_session
conf = spark.conf
print(json.dumps({key: conf.get(key) for key in ("spark.master", "spark.app.name", "spark.sql.shuffle.partitions",
    "spark.sql.session.timeZone")}))
spark.stop()
"""


def test_spark_resource_settings_reach_the_session():
    """In a fresh process (pytest's session would otherwise be reused by getOrCreate): the typed fields and the
    `spark_config` overrides are the running session's settings."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", SESSION_SETTINGS], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    conf = json.loads(out.stdout.strip().splitlines()[-1])
    assert conf == {
        "spark.master": "local[1]",
        "spark.app.name": "settings_probe",
        "spark.sql.shuffle.partitions": "5",  # spark_config overrides the typed field (3)
        "spark.sql.session.timeZone": "UTC",
    }


def test_the_default_process_count_is_what_the_hardware_calls_for(monkeypatch):
    """CPU: one process (its threads use the cores); CUDA: one per GPU; an explicit count wins; use_gpu without a
    GPU is refused before anything starts."""
    import torch

    spark = SparkResource(master="local[2]")
    assert TorchDistributorResource(spark=spark).process_count() == 1
    assert TorchDistributorResource(spark=spark, num_processes=2).process_count() == 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert TorchDistributorResource(spark=spark, use_gpu=True).process_count() == 4
    assert TorchDistributorResource(spark=spark, use_gpu=True, num_processes=8).process_count() == 8
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="use_gpu=True but torch sees no CUDA device"):
        TorchDistributorResource(spark=spark, use_gpu=True).process_count()


@pytest.mark.multiprocess
def test_the_default_launch_is_one_process_using_the_cores_and_the_override_two(spark):
    """What TorchDistributor really starts: by default one rank whose torch threads are this machine's default
    (every core); with num_processes=2, two ranks of one thread each (torchrun's OMP_NUM_THREADS=1)."""
    from recsys_assets.training.launch import rank_environment

    # torch's default for a fresh process; this pytest process's own count may have been lowered by a test that
    # trained in-process with num_threads=1
    fresh = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
        capture_output=True,
        text=True,
        check=True,
        env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"},
    )
    machine_default = int(fresh.stdout.strip())
    quiet = {"on_progress": lambda record: None}
    default = TorchDistributorResource(spark=SparkResource(master="local[2]"), timeout_seconds=300)
    one = default.run(None, rank_environment, **quiet)
    assert one["world_size"] == 1 and one["torch_threads"] == machine_default
    two = TorchDistributorResource(spark=SparkResource(master="local[2]"), num_processes=2, timeout_seconds=300)
    pair = two.run(None, rank_environment, **quiet)
    assert pair["world_size"] == 2 and pair["torch_threads"] == 1
