"""What assets hand each other, through the I/O manager (defs/storage.py): the folder of a materialization, plus
the MLflow run of the model that produced it where there is one. An asset returns one with ``path`` = its build
folder; the I/O manager publishes that folder and hands downstream assets the value with ``path`` = the published
(local) folder. ``table``: the folder's main Parquet table, whose row count and schema the I/O manager records."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class PublishedFolder:
    """A data asset's output: the folder of the version it published."""

    path: str
    table: str | None = None


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """A model asset's output: its published folder, the MLflow run that recorded it and its model version."""

    path: str
    mlflow_run_id: str
    model_version: str | None = None  # its version of the registered model (defs.model_registration), when registered


@dataclasses.dataclass(frozen=True)
class CandidateSet:
    """retrieval_candidates' output: candidates / training_pool / queries Parquet and the Two Tower run behind them."""

    path: str
    two_tower_run_id: str
    table: str | None = None


@dataclasses.dataclass(frozen=True)
class RankingData:
    """ranking_dataset's output: mds/train, holdout.parquet, test.parquet, meta.json and the Two Tower run."""

    path: str
    two_tower_run_id: str
    table: str | None = None


# the types the I/O manager stores and rebuilds, by name
VALUE_TYPES = {cls.__name__: cls for cls in (PublishedFolder, TrainedModel, CandidateSet, RankingData)}
