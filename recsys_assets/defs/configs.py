"""The model assets' Dagster configs, derived from the training configs (the one declaration of each setting).

A training config (`TwoTowerTrainConfig`, `DLRMTrainConfig`) marks the fields an asset exposes with
`training.trainer_config.setting(default, help)`; `dagster_config` turns them into a `dg.Config` with the same names,
types, defaults and descriptions, plus asset-only fields. Values are validated once, by the training config
(`train_config`), before any process starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Union

import dagster as dg
import pydantic
from pydantic import Field

from recsys_assets.data.ranker_features import SPARSE_SWITCHES
from recsys_assets.training.dlrm import DLRMTrainConfig
from recsys_assets.training.search import SearchBudget
from recsys_assets.training.two_tower import TwoTowerTrainConfig


def exposed_fields(train_cls: type) -> list[dataclasses.Field]:
    """The training-config fields declared with `setting` (those with a help text)."""
    return [f for f in dataclasses.fields(train_cls) if "help" in f.metadata]


def _config_type(hint: Any) -> Any:
    """Dagster config types: tuples become lists (Dagster has no tuple config type)."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        return list[typing.get_args(hint)[0]]
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        inner = _config_type(args[0])
        return inner | None if len(args) < len(typing.get_args(hint)) else inner
    return hint


def dagster_config(name: str, train_cls: type, doc: str, **asset_fields: tuple[Any, Any]) -> type[dg.Config]:
    """A dg.Config named `name` with the exposed fields of `train_cls` and `asset_fields` (name -> (type,
    pydantic Field)), which are settings of the asset itself, not of the training run."""
    hints = typing.get_type_hints(train_cls)
    fields: dict[str, Any] = {}
    for f in exposed_fields(train_cls):
        default = list(f.default) if isinstance(f.default, tuple) else f.default
        fields[f.name] = (_config_type(hints[f.name]), Field(default, description=f.metadata["help"]))
    overlap = set(fields) & set(asset_fields)
    if overlap:
        raise ValueError(f"{name}: asset fields {sorted(overlap)} are already training settings")
    model = pydantic.create_model(name, __base__=dg.Config, **fields, **asset_fields)
    model.__doc__ = doc
    return model


def train_config(train_cls: type, config: dg.Config, **run_settings: Any):
    """The training config of an asset run: the asset config's training settings + `run_settings` (paths,
    MLflow run, processes). Validates everything (the training config's __post_init__)."""
    names = {f.name for f in exposed_fields(train_cls)}
    values = {k: v for k, v in config.model_dump().items() if k in names}
    return train_cls(**{**values, **run_settings})


def search_fields() -> dict[str, tuple[Any, Any]]:
    """The budget of a settings search on validation (training.search): asset settings of both models."""
    return {
        "search_trials": (
            int,
            Field(
                0,
                ge=0,
                description="Optuna trials choosing the settings on validation before the fit (0 = no search; the "
                "first trial is the configured settings). Each trial is a nested MLflow run.",
            ),
        ),
        "search_timeout_seconds": (
            float,
            Field(
                1800.0,
                gt=0,
                description="Wall-clock budget of the whole search: no trial starts after it and a running one is "
                "stopped.",
            ),
        ),
        "search_trial_timeout_seconds": (
            float,
            Field(
                600.0, gt=0, description="A trial running longer is stopped (its processes killed), recorded, skipped."
            ),
        ),
        "search_seed": (int, Field(0, description="Seeds the search's sampler (TPE).")),
    }


def search_budget(config: dg.Config) -> SearchBudget:
    """The search budget of a model asset's config (`search_fields`)."""
    return SearchBudget(
        trials=config.search_trials,
        timeout_seconds=config.search_timeout_seconds,
        trial_timeout_seconds=config.search_trial_timeout_seconds,
        seed=config.search_seed,
    )


TwoTowerConfig = dagster_config(
    "TwoTowerConfig",
    TwoTowerTrainConfig,
    "Two Tower settings (declared in TwoTowerTrainConfig); epochs chosen on validation, then refit on "
    "train + validation.",
    refit_on_validation=(
        bool,
        Field(True, description="Refit on train+validation for the best epoch count (the protocol's test report)."),
    ),
    **search_fields(),
)

DLRMConfig = dagster_config(
    "DLRMConfig",
    DLRMTrainConfig,
    "DLRM settings (declared in DLRMTrainConfig) and its sparse features. The dense features + category / "
    "attribute bags are the default (chosen on holdout lists); the id tables (user, item, history bag) are one "
    "switch away, and the settings search can turn them on.",
    **{name: (bool, Field(default, description=meaning)) for name, (default, meaning) in SPARSE_SWITCHES.items()},
    gate_min_gain=(
        float,
        Field(
            0.0,
            description="Quality gate: holdout NDCG@10 of the DLRM order must be >= the "
            "Two Tower order's + this (0 = at least as good; negative tolerates a loss).",
        ),
    ),
    **search_fields(),
)
