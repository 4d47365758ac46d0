"""Dagster resources: Spark session, local state folder (and, for training, TorchDistributor and MLflow)."""

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import dagster as dg
from dagster import ConfigurableResource
from dagster_pyspark import LazyPySparkResource
from dagster_pyspark.resources import spark_session_from_config
from pydantic import Field


class SparkResource(LazyPySparkResource):
    """A SparkSession with local defaults that can point at a real cluster by configuration only.

    Built on dagster_pyspark's LazyPySparkResource: the session starts when first used, so assets that do not
    touch Spark do not pay the start-up. ``spark_config`` entries override the typed fields.
    Note: like PySparkResource it uses ``getOrCreate()``, so in a process that already has a session (pytest)
    start-up settings of a second resource are ignored."""

    spark_config: dict[str, Any] = Field(default_factory=dict, description="Extra Spark settings (override).")
    master: str = Field("local[*]", description="Spark master URL: local[*], local-cluster[2,1,2048], spark://...")
    app_name: str = "recsys_assets"
    driver_memory: str = "2g"
    shuffle_partitions: int = Field(8, description="spark.sql.shuffle.partitions; small data wants few.")
    ui_enabled: bool = False

    def resolved_config(self) -> dict[str, Any]:
        conf = {
            "spark.master": self.master,
            "spark.app.name": self.app_name,
            "spark.driver.memory": self.driver_memory,
            "spark.sql.shuffle.partitions": str(self.shuffle_partitions),
            "spark.ui.enabled": str(self.ui_enabled).lower(),
            "spark.sql.execution.arrow.pyspark.enabled": "true",
            "spark.sql.session.timeZone": "UTC",
        }
        conf.update(self.spark_config)
        return conf

    def _init_session(self) -> None:
        if self._spark_session is None:
            # Python workers must run this interpreter (the one with torch/streaming installed), not whatever
            # `python3` is on PATH; only the environment variable takes effect for local masters.
            if self.master.startswith("local"):
                os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
                os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
            self._spark_session = spark_session_from_config(self.resolved_config())
            self._spark_session.sparkContext.setLogLevel("ERROR")


class StateResource(ConfigurableResource):
    """The project's local state folder: asset build folders (`build_folder`) and, by default, the published
    versions ``<root>/assets/<asset>/<run id>`` (the I/O manager's root, defs/storage.py), training checkpoints,
    MLflow's SQLite store and the cache of folders read from object storage.

    Default root: $RECSYS_STATE_DIR, else ``.recsys_state`` in the working directory (read when used, not at
    import)."""

    root: str | None = None

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        """Every asset uses the state: at a run's start, release runs whose process is gone (their pool slots would
        block this run's training steps) and record this run's process (defs/dead_runs.py)."""
        from recsys_assets.defs.dead_runs import prepare_run

        if context.instance is not None and context.run_id:
            prepare_run(context.instance, context.run_id, context.log.info if context.log else print)

    def resolved_root(self) -> Path:
        root = self.root or os.environ.get("RECSYS_STATE_DIR") or str(Path.cwd() / ".recsys_state")
        return Path(root).expanduser().resolve()

    def checkpoint_dir(self, context) -> Path:
        """Training checkpoints of this asset, keyed by the root run: a retry of a failed run resumes from them."""
        return self.resolved_root() / "checkpoints" / context.asset_key.to_user_string() / root_run_id(context)

    @contextlib.contextmanager
    def checkpoints(self, context) -> Iterator[Path]:
        """`checkpoint_dir`, removed when the block succeeds (published: nothing left to resume), kept for a
        retry when it fails."""
        path = self.checkpoint_dir(context)
        yield path
        shutil.rmtree(path, ignore_errors=True)

    @contextlib.contextmanager
    def build_folder(self, context) -> Iterator[Path]:
        """A fresh, hidden folder for this materialization's files, next to where the I/O manager publishes them
        (defs/storage.py; one rename then): removed when the block raises, so a failed asset leaves nothing; on
        success the asset returns it as its value's ``path`` and the I/O manager publishes it."""
        from recsys_assets.defs.storage import reset_peak_rss

        reset_peak_rss()  # the I/O manager records the step's peak memory from here
        asset = context.asset_key.to_user_string()
        build = self.resolved_root() / "assets" / asset / f".{context.run_id}.tmp-{uuid.uuid4().hex[:8]}"
        build.mkdir(parents=True)
        try:
            yield build
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise


def root_run_id(context) -> str:
    """The id shared by a run and its retries (re-executions)."""
    return context.run.root_run_id or context.run_id


class MLflowResource(ConfigurableResource):
    """MLflow tracking for the model and evaluation assets (own code: dagster-mlflow is the old op-style API).

    Store: ``tracking_uri``, else $MLFLOW_TRACKING_URI (read when used), else SQLite under ``state``'s root, the
    same state resource the assets publish to (a nested resource: pass the instance given as "state").
    ``ui_url``: where `make ui` serves the MLflow UI, for the links in asset metadata."""

    state: StateResource
    tracking_uri: str | None = None
    experiment_name: str = "recsys_assets"
    artifact_location: str | None = None
    ui_url: str = "http://127.0.0.1:5000"

    def resolved_tracking_uri(self) -> str:
        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri:
            return uri
        db = self.state.resolved_root() / "mlflow" / "mlflow.db"
        db.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{db}"

    def resolved_artifact_location(self) -> str:
        if self.artifact_location:
            return self.artifact_location
        return (self.state.resolved_root() / "mlflow" / "artifacts").as_uri()

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.resolved_tracking_uri())

    def check_reachable(self, timeout_s: float = 5.0) -> None:
        """Fails fast (before training) if the tracking server cannot be reached."""
        uri = self.resolved_tracking_uri()
        if uri.startswith(("http://", "https://")):
            import urllib.request

            try:
                urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s)
            except Exception as exc:  # noqa: BLE001 - any failure means unreachable
                raise RuntimeError(f"MLflow tracking URI {uri!r} is unreachable: {exc}") from exc
        else:
            self.client().search_experiments(max_results=1)

    def experiment_id(self) -> str:
        client = self.client()
        exp = client.get_experiment_by_name(self.experiment_name)
        if exp is not None:
            return exp.experiment_id
        return client.create_experiment(self.experiment_name, artifact_location=self.resolved_artifact_location())

    def start_asset_run(self, context, **tags: Any) -> str:
        """A run for this materialization: named after the asset, tagged with the asset key, the Dagster run and
        its root run (shared by the retries of a run) plus `tags`."""
        asset = context.asset_key.to_user_string()
        run = self.client().create_run(
            self.experiment_id(),
            run_name=f"{asset}-{context.run_id[:8]}",
            tags={
                "dagster.run_id": context.run_id,
                "dagster.root_run_id": root_run_id(context),
                "dagster.asset_key": asset,
                **{k: str(v) for k, v in tags.items()},
            },
        )
        return run.info.run_id

    def end_run(self, run_id: str, *, failed: BaseException | None = None) -> None:
        client = self.client()
        if failed is not None:
            client.set_tag(run_id, "error", f"{type(failed).__name__}: {failed}"[:5000])
            client.set_terminated(run_id, status="FAILED")
        else:
            client.set_terminated(run_id, status="FINISHED")

    @contextlib.contextmanager
    def asset_run(self, context, **tags: Any) -> Iterator["MLflowRun"]:
        """``with mlflow.asset_run(context, **tags) as run:`` the materialization's run (`start_asset_run`),
        FINISHED when the block succeeds, FAILED with an ``error`` tag when it raises (re-raised)."""
        run = MLflowRun(self, self.start_asset_run(context, **tags))
        try:
            yield run
        except BaseException as exc:
            self.end_run(run.id, failed=exc)
            raise
        self.end_run(run.id)

    def run_url(self, run_id: str) -> str:
        exp_id = self.client().get_run(run_id).info.experiment_id
        return f"{self.ui_url.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}"


@dataclasses.dataclass(frozen=True)
class MLflowRun:
    """An open MLflow run of one materialization (`MLflowResource.asset_run`) and what assets record in it."""

    resource: MLflowResource
    id: str

    @property
    def tracking_uri(self) -> str:
        return self.resource.resolved_tracking_uri()

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Params of any JSON-able value (lists and dicts as JSON text)."""
        client = self.resource.client()
        for k, v in params.items():
            client.log_param(self.id, k, json.dumps(v) if isinstance(v, (list, dict)) else v)

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        """Metrics by name; "@" becomes "_at_" (MLflow refuses it in names: ndcg@10 -> ndcg_at_10)."""
        client = self.resource.client()
        for name, value in metrics.items():
            client.log_metric(self.id, name.replace("@", "_at_"), float(value))

    def log_artifact(self, path: str | Path, artifact_path: str = "plots") -> None:
        self.resource.client().log_artifact(self.id, str(path), artifact_path=artifact_path)

    def log_text(self, text: str, name: str) -> None:
        self.resource.client().log_text(self.id, text, name)

    def log_model(self, model):
        """The model as this run's ``model`` artifact (mlflow.pytorch); returns MLflow's ModelInfo (its
        ``model_uri`` / ``model_id`` register it: serving.registry.register_version)."""
        import importlib.metadata

        import mlflow
        import mlflow.pytorch
        import torch

        mlflow.set_tracking_uri(self.tracking_uri)
        with mlflow.start_run(run_id=self.id):
            # pickle format: the default pt2 export needs an input example this KJT-based signature cannot give;
            # explicit pip requirements skip a slow environment inference.
            return mlflow.pytorch.log_model(
                model,
                name="model",
                serialization_format="pickle",
                pip_requirements=[
                    f"torch=={torch.__version__.split('+')[0]}",
                    f"torchrec=={importlib.metadata.version('torchrec').split('+')[0]}",
                ],
            )

    def url(self) -> str:
        """The run's page in the MLflow UI."""
        return self.resource.run_url(self.id)

    def metadata(self) -> dict[str, Any]:
        """The link to the run in the MLflow UI and its id."""
        return {"mlflow_run": dg.MetadataValue.url(self.url()), "mlflow_run_id": self.id}


class TorchDistributorResource(ConfigurableResource):
    """Runs a training function in several processes through PySpark's TorchDistributor
    (`training.launch.run_distributed`).

    ``local_mode=True`` runs torchrun on the driver; ``local_mode=False`` one process per Spark task on the
    executors (a cluster, or ``local-cluster[...]``). ``use_gpu``: CUDA + nccl and GPU tasks. The function must be
    importable by the child processes (a module-level function of an installed package). ``spark``: the session
    TorchDistributor launches from (a nested resource: pass the instance given as "spark")."""

    spark: SparkResource
    num_processes: int | None = Field(
        None,
        ge=1,
        description="Training processes. Unset: what is fastest for the hardware (training.launch."
        "default_process_count): one per GPU with use_gpu, else 1 process using every CPU core as threads.",
    )
    use_gpu: bool = False
    local_mode: bool = True
    timeout_seconds: int = Field(3600, ge=1, description="A run longer than this is killed and fails.")
    single_machine: bool = Field(
        True,
        description="With local_mode=False: all executors share one machine, so ranks must share Streaming's "
        "LOCAL_WORLD_SIZE/LOCAL_RANK (each Spark task's torchrun otherwise reports 1/0).",
    )

    def process_count(self) -> int:
        """`num_processes`, else the hardware's default (one per GPU with use_gpu; 1 on CPU)."""
        from recsys_assets.training.launch import default_process_count

        return self.num_processes or default_process_count(self.use_gpu)

    def validate(self) -> None:
        if self.local_mode and not self.use_gpu:
            cores = os.cpu_count() or 1
            if self.process_count() > cores:
                raise ValueError(
                    f"TorchDistributorResource: num_processes={self.process_count()} is larger than the "
                    f"{cores} CPU cores available in local mode"
                )

    def run(
        self,
        context,
        fn,
        *args,
        progress_file: Path | None = None,
        on_progress=None,
        timeout_seconds: float | None = None,
    ):
        """``fn(*args)`` on every rank; returns rank 0's result. Progress lines go to `on_progress`, else to the
        Dagster log; timeouts and failed ranks raise (see run_distributed). `timeout_seconds` shortens the
        resource's own limit for this launch (a search trial's)."""
        from recsys_assets.training.launch import run_distributed

        self.validate()
        limit = self.timeout_seconds if timeout_seconds is None else min(self.timeout_seconds, timeout_seconds)
        return run_distributed(
            fn,
            *args,
            session=self.spark.spark_session,
            num_processes=self.process_count(),
            local_mode=self.local_mode,
            use_gpu=self.use_gpu,
            timeout_seconds=limit,
            single_machine=self.single_machine,
            progress_file=progress_file,
            on_progress=on_progress or (lambda rec: context.log.info(json.dumps(rec))),
        )


def default_resources() -> dict:
    """Embedded defaults: local Spark, TorchDistributor with the hardware's process count (1 on CPU), MLflow on a SQLite file and
    files under $RECSYS_STATE_DIR (else ./.recsys_state). Scale out by configuring these, not by code."""
    from recsys_assets.defs.storage import AssetFolderIOManager  # it depends on StateResource, defined here

    # configured at launch, so run config under `resources: spark:` / `state:` also reaches the resources that
    # depend on them
    spark, state = SparkResource.configure_at_launch(), StateResource.configure_at_launch()
    return {
        "spark": spark,
        "state": state,
        "torch_distributor": TorchDistributorResource(spark=spark),
        "mlflow": MLflowResource(state=state),
        "io_manager": AssetFolderIOManager(state=state),
    }


@dg.definitions
def resources() -> dg.Definitions:
    """The code location's resources (load_from_defs_folder collects this)."""
    return dg.Definitions(resources=default_resources())
