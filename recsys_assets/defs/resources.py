"""Dagster resources: Spark session, local state folder (and, for training, TorchDistributor and MLflow)."""

import os
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

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
    """Where assets publish their files: versioned folders under ``<root>/assets/<asset>/<version>``.

    Default root: $RECSYS_STATE_DIR, else ``.recsys_state`` in the working directory (read when used, not at
    import). Could be any mounted path; MDS can also go to object storage (see mds remote settings)."""

    root: Optional[str] = None

    def resolved_root(self) -> Path:
        root = self.root or os.environ.get("RECSYS_STATE_DIR") or str(Path.cwd() / ".recsys_state")
        return Path(root).expanduser().resolve()

    def asset_dir(self, asset_name: str, version: str) -> Path:
        return self.resolved_root() / "assets" / asset_name / version

    def checkpoint_dir(self, context) -> Path:
        """Training checkpoints of this asset, keyed by the root run: a retry of a failed run resumes from them."""
        return self.resolved_root() / "checkpoints" / context.asset_key.to_user_string() / root_run_id(context)


def root_run_id(context) -> str:
    """The id shared by a run and its retries (re-executions)."""
    return context.run.root_run_id or context.run_id


def default_state_root() -> Path:
    return StateResource().resolved_root()


class MLflowResource(ConfigurableResource):
    """MLflow tracking for model assets (own code: dagster-mlflow is the old op-style API).

    Store: ``tracking_uri``, else $MLFLOW_TRACKING_URI (read when used), else SQLite in the local state folder. ``ui_url`` is where `make ui` serves the MLflow UI, for the links in asset metadata."""

    tracking_uri: Optional[str] = None
    experiment_name: str = "recsys_assets"
    artifact_location: Optional[str] = None
    ui_url: str = "http://127.0.0.1:5000"

    def resolved_tracking_uri(self) -> str:
        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri:
            return uri
        db = default_state_root() / "mlflow" / "mlflow.db"
        db.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{db}"

    def resolved_artifact_location(self) -> str:
        if self.artifact_location:
            return self.artifact_location
        return (default_state_root() / "mlflow" / "artifacts").as_uri()

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

    def start_run(self, run_name: str, tags: dict[str, str]) -> str:
        run = self.client().create_run(self.experiment_id(), run_name=run_name, tags=tags)
        return run.info.run_id

    def start_asset_run(self, context, **tags: Any) -> str:
        """A run for this materialization: named after the asset, tagged with the asset key, the Dagster run and
        its root run (shared by the retries of a run) plus `tags`."""
        asset = context.asset_key.to_user_string()
        return self.start_run(
            run_name=f"{asset}-{context.run_id[:8]}",
            tags={"dagster.run_id": context.run_id, "dagster.root_run_id": root_run_id(context),
                  "dagster.asset_key": asset, **{k: str(v) for k, v in tags.items()}},
        )

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        """Params of any JSON-able value (lists and dicts as JSON text)."""
        import json

        client = self.client()
        for k, v in params.items():
            client.log_param(run_id, k, json.dumps(v) if isinstance(v, (list, dict)) else v)

    def end_run(self, run_id: str, *, failed: Optional[BaseException] = None) -> None:
        client = self.client()
        if failed is not None:
            client.set_tag(run_id, "error", f"{type(failed).__name__}: {failed}"[:5000])
            client.set_terminated(run_id, status="FAILED")
        else:
            client.set_terminated(run_id, status="FINISHED")

    def run_url(self, run_id: str) -> str:
        exp_id = self.client().get_run(run_id).info.experiment_id
        return f"{self.ui_url.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}"


class TorchDistributorResource(ConfigurableResource):
    """Runs a training function in several processes through PySpark's TorchDistributor.

    ``local_mode=True`` runs torchrun on the driver; ``local_mode=False`` runs one process per Spark task on the
    executors (a real cluster, or ``local-cluster[...]`` on one machine). ``use_gpu`` selects CUDA + nccl in the
    training code and asks Spark for GPU tasks. The function must be importable by the child processes (a
    module-level function of an installed package)."""

    num_processes: int = Field(2, ge=1)
    use_gpu: bool = False
    local_mode: bool = True
    timeout_seconds: int = Field(3600, ge=1, description="A run longer than this is killed and fails.")
    single_machine: bool = Field(
        True,
        description="With local_mode=False: all executors share one machine, so ranks must share Streaming's "
        "LOCAL_WORLD_SIZE/LOCAL_RANK (each Spark task's torchrun otherwise reports 1/0).",
    )

    def validate(self) -> None:
        if self.local_mode and not self.use_gpu:
            cores = os.cpu_count() or 1
            if self.num_processes > cores:
                raise ValueError(
                    f"TorchDistributorResource: num_processes={self.num_processes} is larger than the "
                    f"{cores} CPU cores available in local mode"
                )

    def run(self, context, spark: SparkResource, fn, *args, progress_file: Optional[Path] = None,
            on_progress=None):
        """Runs ``fn(*args)`` on every rank and returns rank results (identical by contract).

        Forwards JSON lines the ranks append to `progress_file` to `on_progress` (or the Dagster log), kills the
        whole process tree and raises on timeout, and turns a failed rank into an exception naming it."""
        import json
        import threading
        import time

        from pyspark.ml.torch.distributor import TorchDistributor

        from recsys_assets.training.launch import RESULT_FILE, kill_training_processes, run_with_consistent_local_ranks

        self.validate()
        session = spark.spark_session  # TorchDistributor needs an active session
        distributor = TorchDistributor(
            num_processes=self.num_processes, local_mode=self.local_mode, use_gpu=self.use_gpu
        )
        fix_local = (not self.local_mode) and self.single_machine
        outcome: dict = {}
        import tempfile

        error_dir = tempfile.mkdtemp(prefix="recsys-rank-errors-")

        def target():
            try:
                outcome["result"] = distributor.run(run_with_consistent_local_ranks, fix_local, error_dir, fn, *args)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
                outcome["error"] = exc

        thread = threading.Thread(target=target, name="torch-distributor", daemon=True)
        start = time.monotonic()
        thread.start()
        offset = 0
        log = on_progress or (lambda rec: context.log.info(json.dumps(rec)))

        def forward_progress():
            nonlocal offset
            if progress_file is None or not Path(progress_file).exists():
                return
            with open(progress_file) as fh:
                fh.seek(offset)
                for line in fh:
                    if line.endswith("\n"):
                        offset += len(line)
                        try:
                            log(json.loads(line))
                        except json.JSONDecodeError:
                            pass

        while thread.is_alive():
            thread.join(timeout=1.0)
            forward_progress()
            if time.monotonic() - start > self.timeout_seconds and thread.is_alive():
                kill_training_processes()
                session.sparkContext.cancelAllJobs()
                thread.join(timeout=30)
                raise TimeoutError(
                    f"distributed training exceeded timeout_seconds={self.timeout_seconds}; processes killed"
                )
        forward_progress()
        if "error" in outcome:
            files = sorted(Path(error_dir).glob("rank*.txt"))
            causes = "\n".join(p.read_text() for p in files)
            # A rank killed (SIGKILL, OOM, os._exit) writes no error file; the others then fail in a collective
            # ("Connection reset by peer"), which would hide it: name the ranks that died first.
            errored = {p.stem[len("rank"):] for p in files}
            done = {p.name[len("done"):] for p in Path(error_dir).glob("done*")}
            silent = sorted(p.name[len("started"):] for p in Path(error_dir).glob("started*")
                            if p.name[len("started"):] not in errored | done)
            if silent:
                died = (f"rank(s) {', '.join(silent)} ended without a Python error (killed, out of memory or "
                        f"os._exit; once one rank dies, torchrun also terminates the others)")
                causes = f"{died}; errors of the other ranks:\n{causes}" if causes else died
            raise RuntimeError(
                f"distributed training failed: {causes or _summarize_failure(outcome['error'])}"
            ) from outcome["error"]
        handed_over = Path(error_dir) / RESULT_FILE
        if handed_over.exists():  # rank 0's result (see training/launch.py); a temp file this call created
            import pickle

            with open(handed_over, "rb") as fh:
                result = pickle.load(fh)
            shutil.rmtree(error_dir, ignore_errors=True)
            return result
        return outcome["result"]


def _summarize_failure(exc: BaseException) -> str:
    """TorchDistributor's error carries 100 lines of output; keep the lines that say what went wrong."""
    text = str(exc)
    lines = [l for l in text.splitlines() if l.strip()]
    keep = [l for l in lines if any(k in l for k in ("Error", "error", "exit code", "failed", "Traceback", "rank"))]
    return "\n".join((keep or lines)[-25:])
