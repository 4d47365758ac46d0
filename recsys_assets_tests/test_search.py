"""The settings search (recsys_assets.training.search): failing and overlong trials are recorded and skipped, the
wall-clock budget stops new trials, a launch past a trial's limit is killed; the DLRM's trials never score test
pairs; and a Two Tower search with 2 trials through Dagster records nested MLflow runs under the asset's run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from recsys_assets.training.search import Choice, FloatRange, IntRange, SearchBudget, search_settings

SPACE = {"x": FloatRange(0.0, 1.0), "k": IntRange(1, 3), "flag": Choice((True, False))}


def test_a_failing_trial_is_recorded_and_skipped():
    def objective(params, trial):
        if trial.number == 1:
            raise RuntimeError("boom in trial 1")
        return params["x"]

    result = search_settings(
        objective, SPACE, SearchBudget(trials=3, seed=0), metric="score", baseline={"x": 0.25}, log=lambda _: None
    )
    states = [(t.number, t.state) for t in result.trials]
    assert states == [(0, "COMPLETE"), (1, "FAIL"), (2, "COMPLETE")]
    failed = result.trials[1]
    assert failed.value is None and failed.error == "RuntimeError: boom in trial 1"
    assert result.trials[0].params["x"] == 0.25  # the first trial is the configured settings
    done = [t for t in result.trials if t.state == "COMPLETE"]
    best = max(done, key=lambda t: t.value)
    assert result.best_params == best.params and result.best_value == best.value == best.params["x"]
    assert result.settings == result.best_params
    table = result.markdown()
    assert "| 1 | FAIL |" in table and "RuntimeError: boom in trial 1" in table


class FakeClock:
    """The search's clock, advanced by the objectives: trials "take" exact times, whatever the machine's load."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def spend(self, seconds: float) -> None:
        self.now += seconds


def test_a_trial_past_its_time_is_failed_and_the_budget_stops_new_trials():
    clock, limits = FakeClock(), []

    def objective(params, trial):
        limits.append(trial.timeout_seconds)
        clock.spend(0.5 if trial.number == 0 else 0.25)
        return params["x"]

    result = search_settings(
        objective,
        SPACE,
        SearchBudget(trials=2, timeout_seconds=60, trial_timeout_seconds=0.25),
        metric="score",
        log=lambda _: None,
        clock=clock,
    )
    assert [t.state for t in result.trials] == ["FAIL", "COMPLETE"]
    assert "ran 0.5 s, past its limit of 0.2 s" in result.trials[0].error  # 0.25 printed to one decimal
    assert [t.seconds for t in result.trials] == [0.5, 0.25]  # a trial at its limit exactly is not past it
    assert result.best_params == result.trials[1].params
    assert limits == [0.25, 0.25]  # the objective is told its limit (to stop its training)

    # no trial starts once the budget is spent, and none is given more than what is left of it
    clock, limits = FakeClock(), []
    short = search_settings(
        lambda params, trial: (limits.append(trial.timeout_seconds), clock.spend(0.25), 1.0)[-1],
        SPACE,
        SearchBudget(trials=100, timeout_seconds=1.0, trial_timeout_seconds=10),
        metric="score",
        log=lambda _: None,
        clock=clock,
    )
    assert [t.state for t in short.trials] == ["COMPLETE"] * 4
    assert limits == [1.0, 0.75, 0.5, 0.25]


def test_no_successful_trial_keeps_the_configured_settings():
    def objective(params, trial):
        raise ValueError("bad settings")

    result = search_settings(objective, SPACE, SearchBudget(trials=2), metric="score", log=lambda _: None)
    assert [t.state for t in result.trials] == ["FAIL", "FAIL"]
    assert result.best_params is None and result.best_value is None and result.settings == {}


@pytest.mark.multiprocess
def test_a_trial_launch_past_its_limit_is_killed_and_the_search_goes_on(spark):
    """The trial's limit reaches the launcher, which kills the training processes (TimeoutError)."""
    from recsys_assets.defs.resources import SparkResource, TorchDistributorResource

    resource = TorchDistributorResource(spark=SparkResource(master="local[2]"), num_processes=2, timeout_seconds=600)

    def objective(params, trial):
        if trial.number == 0:  # "training" that would run 10 minutes
            resource.run(None, time.sleep, 600, on_progress=print, timeout_seconds=trial.timeout_seconds)
        return 1.0

    start = time.monotonic()
    result = search_settings(
        objective, SPACE, SearchBudget(trials=2, trial_timeout_seconds=5), metric="score", log=lambda _: None
    )
    assert time.monotonic() - start < 90
    assert [t.state for t in result.trials] == ["FAIL", "COMPLETE"]
    assert result.trials[0].error.startswith("TimeoutError: distributed training exceeded timeout_seconds=5")


# ------------------------------------------------------------------------------------------------------- DLRM
LAYOUT = ({"name": "item", "table": "item", "num_embeddings": 30},)


@pytest.fixture(scope="module")
def dlrm_pairs(tmp_path_factory) -> Path:
    """Label = the item id is even: MDS training pairs, holdout and test lists (Parquet)."""
    from recsys_assets.data.blocks import BlockLayout, write_blocks

    root = tmp_path_factory.mktemp("search_pairs")
    rng = np.random.default_rng(0)
    item, dense = rng.integers(0, 30, 900), rng.normal(size=(900, 2)).astype(np.float32)
    label = (item % 2 == 0).astype(np.float32)
    layout = BlockLayout.of({"label": ("float32", 0), "dense": ("float32", 2), "item": ("int32", 0)})
    write_blocks(root / "train", {"label": label[:600], "dense": dense[:600], "item": item[:600]}, layout)
    for name, rows in (("holdout", slice(600, 750)), ("test", slice(750, 900))):
        pd.DataFrame(
            {
                "label": label[rows],
                "dense": list(dense[rows]),
                "item": item[rows],
                "query_id": np.arange(150) // 10,
            }
        ).to_parquet(root / f"{name}.parquet")
    return root


def test_dlrm_trials_score_the_holdout_lists_only(dlrm_pairs, tmp_path):
    from recsys_assets.training.dlrm import DLRMTrainConfig
    from recsys_assets.training.search import search_dlrm

    baseline = {"epochs": 1, "bottom_layer_sizes": [16, 8], "embedding_dim": 8, "use_item_id": True}

    def make_config(settings, **fields):
        # the layout is fixed here; the asset's make_config turns the feature switches into one
        values = dict(
            train_mds=(str(dlrm_pairs / "train"),),
            layout=LAYOUT,
            dense_in_features=2,
            eval_sets={"holdout": str(dlrm_pairs / "holdout.parquet")},
            final_sets={"test": str(dlrm_pairs / "test.parquet")},
            selection_set="holdout",
            batch_size=64,
            epochs=1,
            embedding_dim=8,
            bottom_layer_sizes=(16, 8),
        )
        trained = {"sparse_lr", "dense_lr", "embedding_dim", "bottom_layer_sizes", "weight_decay", "epochs"}
        values.update({k: v for k, v in settings.items() if k in trained})
        return DLRMTrainConfig(**values, **fields)

    launched = []

    def launch(fn, config, progress_file=None, timeout_seconds=None):
        launched.append((config, timeout_seconds))
        return fn(config)  # in this process (one rank)

    result = search_dlrm(
        launch, make_config, SearchBudget(trials=2, trial_timeout_seconds=120), baseline=baseline, work_dir=tmp_path
    )
    assert [t.state for t in result.trials] == ["COMPLETE", "COMPLETE"], result.markdown()
    assert result.metric == "holdout_ndcg@10"
    for config, timeout in launched:
        assert set(config.eval_sets) == {"holdout"} and config.final_sets == {} and config.checkpoint_dir is None
        assert config.bottom_layer_sizes[-1] == config.embedding_dim  # follows the searched width
        assert 0 < timeout <= 120
    assert result.trials[0].params["embedding_dim"] == 8 and result.trials[0].params["use_item_id"] is True
    assert result.settings["bottom_layer_sizes"] == [16, result.settings["embedding_dim"]]
    saved = json.loads((tmp_path / "search.json").read_text())
    assert saved["best_value"] == result.best_value and len(saved["trials"]) == 2


# --------------------------------------------------------------------------------------- through Dagster
def _metadata(result, key: str) -> dict:
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == key]
    return {k: v.value for k, v in event.materialization.metadata.items()}


@pytest.mark.multiprocess  # TorchDistributor with 2 processes
def test_two_tower_search_through_dagster_records_nested_mlflow_runs(spark, tmp_path):
    from mlflow.tracking import MlflowClient
    from training_resources import training_resources

    from recsys_assets.defs.data_assets import data_assets
    from recsys_assets.defs.two_tower_assets import two_tower_model

    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    result = dg.materialize(
        [*data_assets, two_tower_model],
        resources=training_resources(tmp_path, tracking),
        run_config={
            "ops": {
                "raw_interactions": {"config": {"synthetic": {"size": "tiny"}}},
                "two_tower_model": {
                    "config": {
                        "epochs": 1,
                        "refit_on_validation": False,
                        "search_trials": 2,
                        "search_timeout_seconds": 600,
                        "search_trial_timeout_seconds": 300,
                    }
                },
            }
        },
    )
    assert result.success
    md = _metadata(result, "two_tower_model")
    parent = md["mlflow_run_id"]
    client = MlflowClient(tracking_uri=tracking)
    trials = client.search_runs(
        [client.get_run(parent).info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'"
    )
    assert len(trials) == 2
    for run in trials:
        assert run.info.status == "FINISHED"
        assert "search_validation_ndcg_at_10" in run.data.metrics
        assert "validation_ndcg_at_10" in run.data.metrics  # the trial's epochs were reported to its own run
        assert not any(k.startswith(("test_", "refit_")) for k in run.data.metrics)  # no test data in a trial
        assert {"sparse_lr", "embedding_dim", "temperature", "max_history", "epochs"} <= set(run.data.params)
    # metadata: the trial table, the chosen settings and their score; the fit trained the chosen settings
    assert md["search_trials"].count("| COMPLETE |") == 2
    assert {run.info.run_id for run in trials} <= {
        line.split(" | ")[5] for line in md["search_trials"].splitlines()[2:]
    }
    chosen = md["chosen_settings"]
    assert {"sparse_lr", "dense_lr", "embedding_dim", "num_uniform_negatives", "weight_decay"} <= set(chosen)
    assert md["search_best_validation_ndcg@10"] == max(r.data.metrics["search_validation_ndcg_at_10"] for r in trials)
    params = client.get_run(parent).data.params
    assert params["embedding_dim"] == str(chosen["embedding_dim"]) and float(params["sparse_lr"]) == chosen["sparse_lr"]
    assert (Path(md["path"]) / "search" / "search.json").is_file()
