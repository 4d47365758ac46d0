"""The online funnel as an MLflow pyfunc model: `TwoStageModel` wraps serving.online.TwoStageScorer, and
`log_two_stage_model` logs it with its bundle folder as an artifact, this package as its code and the serving
requirements only (no Spark, no Dagster). Served by `mlflow models serve` (`make serve`).

A request is a table (JSON ``dataframe_records`` / ``dataframe_split``) of rows with ``user_id`` and the optional
``recent_items``, ``k`` and ``exclude_seen``; a request the model cannot answer gets MLflow's 400 with a message
naming the field."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

import mlflow.pyfunc

BUNDLE_ARTIFACT = "bundle"
# what serving imports (recsys_assets itself travels as the model's code)
SERVING_DISTRIBUTIONS = ("torch", "torchrec", "numpy", "pandas", "pyarrow", "faiss-cpu", "mlflow")
FBGEMM_DISTRIBUTIONS = ("fbgemm-gpu-cpu", "fbgemm-gpu")


def serving_requirements() -> list[str]:
    """Pinned requirements of the served model: the installed versions of what serving imports."""
    pins = []
    for name in (*SERVING_DISTRIBUTIONS, *FBGEMM_DISTRIBUTIONS):
        try:
            pins.append(f"{name}=={importlib.metadata.version(name).split('+')[0]}")
        except importlib.metadata.PackageNotFoundError:
            continue  # one fbgemm variant is installed
    return pins


class TwoStageModel(mlflow.pyfunc.PythonModel):
    """pyfunc: a request table → one row per (user, rank) (serving.online.ANSWER_COLUMNS). `predict` has no type
    hints on purpose: with them MLflow would parse requests into typed objects instead of a table (it warns)."""

    def load_context(self, context) -> None:
        from recsys_assets.serving.online import MicroBatcher, TwoStageScorer

        self.scorer = TwoStageScorer(context.artifacts[BUNDLE_ARTIFACT])
        self.batcher = MicroBatcher(self.scorer)  # the server's concurrent requests, scored together

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        from recsys_assets.serving.online import RequestError

        try:
            requests = self.scorer.parse(model_input)
        except RequestError as exc:  # a 400 that names the field, not a 500 with a stack trace
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        return self.batcher.recommend(requests)


def log_two_stage_model(tracking_uri: str, run_id: str, bundle: Path):
    """Logs the pyfunc model (artifact ``model``) into MLflow run `run_id`; returns MLflow's ModelInfo."""
    import recsys_assets

    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=TwoStageModel(),
            artifacts={BUNDLE_ARTIFACT: str(bundle)},
            code_paths=[str(Path(recsys_assets.__file__).parent)],
            pip_requirements=serving_requirements(),
        )
