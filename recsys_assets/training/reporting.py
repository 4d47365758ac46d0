"""Progress reporting of the trainers: `ProgressReporter` (rank 0: per-epoch metrics to MLflow and/or a JSON
lines progress file), `mlflow_key` (metric names MLflow accepts), the JSON encoding of numpy / torch / Path
values and `peak_rss_mb` (this process's peak memory). No Dagster / Spark here.
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recsys_assets.training.distributed import DistEnv


def mlflow_key(name: str) -> str:
    """MLflow metric names may not contain '@': hr@10 -> hr_at_10."""
    return name.replace("@", "_at_")


class ProgressReporter:
    """Rank 0 only (others no-op): per-epoch metrics to MLflow (an existing run, via MlflowClient.log_metric)
    and/or one JSON object per line appended to `progress_file`."""

    def __init__(
        self,
        env: DistEnv,
        *,
        mlflow_tracking_uri: str | None = None,
        mlflow_run_id: str | None = None,
        progress_file: str | None = None,
        mlflow_prefix: str = "",
    ) -> None:
        self.active = env.is_main
        self.progress_file = Path(progress_file) if progress_file else None
        self.prefix = mlflow_prefix
        self.client = None
        self.run_id = mlflow_run_id
        if self.active and mlflow_tracking_uri and mlflow_run_id:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=mlflow_tracking_uri)
        if self.active and self.progress_file is not None:
            self.progress_file.parent.mkdir(parents=True, exist_ok=True)

    def event(self, record: Mapping[str, Any]) -> None:
        """Append one JSON line (rank 0, if a progress file is set)."""
        if not self.active or self.progress_file is None:
            return
        line = json.dumps({"time": time.time(), **record}, default=_json_default, sort_keys=True)
        with open(self.progress_file, "a") as f:
            f.write(line + "\n")
            f.flush()

    def log_epoch(self, epoch: int, metrics: Mapping[str, float], **extra: Any) -> None:
        if not self.active:
            return
        if self.client is not None:
            ts = int(time.time() * 1000)
            for k, v in metrics.items():
                if v is None or not np.isfinite(v):
                    continue
                self.client.log_metric(self.run_id, self.prefix + mlflow_key(k), float(v), timestamp=ts, step=epoch)
        self.event({"event": "epoch", "epoch": epoch, "metrics": dict(metrics), **extra})


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o)}")


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
