"""Operations: the `retrain_all` job, its schedule, the `new_source_data` sensor (it observes the
`interaction_source` asset of source_data.py), the instance's training pool limit and run retries (`DAGSTER_YAML`,
written by `write_dagster_yaml`). Schedule and sensor start STOPPED.

Read when the definitions load:
| env var                            | default                           | used by                             |
|------------------------------------|-----------------------------------|-------------------------------------|
| `RECSYS_RETRAIN_CRON`              | `0 3 * * 1` (Monday 03:00)        | `retrain_schedule()`                |
| `RECSYS_RETRAIN_TIMEZONE`          | `UTC`                             | `retrain_schedule()`                |
| `RECSYS_RUN_CONFIG`                | `recsys_assets/configs/demo.yaml` | run config of both; sensor's source |
| `RECSYS_NEW_DATA_INTERVAL_SECONDS` | `300`                             | `new_data_sensor()`                 |
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg

from recsys_assets.defs.data_assets import RawInteractionsConfig
from recsys_assets.defs.source_data import (
    SOURCE_ASSET,
    load_run_config,
    observation_event,
    observe_source,
    source_config_from_run_config,
    watched_path,
    with_source_config,
)

RETRAIN_CRON_ENV = "RECSYS_RETRAIN_CRON"
RETRAIN_TIMEZONE_ENV = "RECSYS_RETRAIN_TIMEZONE"
SENSOR_INTERVAL_ENV = "RECSYS_NEW_DATA_INTERVAL_SECONDS"

DEFAULT_RETRAIN_CRON = "0 3 * * 1"  # Monday 03:00
DEFAULT_TIMEZONE = "UTC"
DEFAULT_SENSOR_INTERVAL_SECONDS = 300
SOURCE_VERSION_TAG = "recsys/source_data_version"  # on a sensor run: the source's data version it trains

# Run retries of retrain_all (honoured only where the instance enables run retries, see DAGSTER_YAML):
# FROM_FAILURE re-executes the failed step and what had not run yet, reusing the versioned folders that the
# succeeded steps of the failed run already published (no second pass of Spark data preparation).
RETRAIN_MAX_RETRIES = 2
RETRAIN_RUN_TAGS = {
    "dagster/max_retries": str(RETRAIN_MAX_RETRIES),
    "dagster/retry_strategy": "FROM_FAILURE",
}

# One process and one SparkSession serve a whole run: the multiprocess default starts a Python process per step
# (torch/pyspark imports, ~4 s) and a Spark JVM per Spark step; on a chain-shaped graph it buys little overlap.
RUN_EXECUTOR = dg.in_process_executor

# ------------------------------------------------------------------------------------------------ the job
retrain_all = dg.define_asset_job(
    name="retrain_all",
    selection=dg.AssetSelection.all(),
    description="Materialize the whole graph: source -> interactions -> splits -> MDS -> Two Tower -> item "
    "embeddings and index -> retrieval candidates -> ranking dataset -> DLRM -> recommendations, and the evaluation. "
    f"Retried up to {RETRAIN_MAX_RETRIES} times from the failed step (instance run retries must be enabled).",
    tags=RETRAIN_RUN_TAGS,  # no run_tags given: Dagster appends these job tags to every run of the job
    executor_def=RUN_EXECUTOR,
)

# The source's observation alone (the UI's "Observe sources"; the sensor records the same on its ticks).
observe_source_job = dg.define_asset_job(
    name="observe_interaction_source",
    selection=dg.AssetSelection.assets(SOURCE_ASSET),
    description=f"Observe {SOURCE_ASSET}: record the data version (size/mtime fingerprint) of the source files.",
    executor_def=RUN_EXECUTOR,
)


# ------------------------------------------------------------------------------------------------ schedule
def retrain_schedule(
    cron: str | None = None,
    *,
    run_config: Mapping[str, Any] | None = None,
    execution_timezone: str | None = None,
    default_status: dg.DefaultScheduleStatus = dg.DefaultScheduleStatus.STOPPED,
    name: str = "retrain_all_schedule",
) -> dg.ScheduleDefinition:
    """The retraining schedule of `retrain_all`; arguments override the env vars of the module docstring. An
    invalid cron string fails the definitions load."""
    cron = cron or os.environ.get(RETRAIN_CRON_ENV) or DEFAULT_RETRAIN_CRON
    tz = execution_timezone or os.environ.get(RETRAIN_TIMEZONE_ENV) or DEFAULT_TIMEZONE
    config = dict(run_config) if run_config is not None else load_run_config()
    return dg.ScheduleDefinition(
        name=name,
        cron_schedule=cron,
        execution_timezone=tz,
        job=retrain_all,
        run_config=config,
        tags={"recsys/trigger": "schedule"},
        default_status=default_status,
        description=f"Retrain the whole graph on '{cron}' ({tz}); cron from ${RETRAIN_CRON_ENV}.",
    )


# ------------------------------------------------------------------------------------------------ sensor
def new_data_sensor(
    source_config: RawInteractionsConfig | None = None,
    *,
    run_config: Mapping[str, Any] | None = None,
    minimum_interval_seconds: int | None = None,
    run_on_first_tick: bool = False,
    default_status: dg.DefaultSensorStatus = dg.DefaultSensorStatus.STOPPED,
    name: str = "new_source_data",
) -> dg.SensorDefinition:
    """A sensor that observes the `interaction_source` asset and requests a `retrain_all` run when its data
    version changes.

    Source: `source_config`, else the raw_interactions config of the run config file (see the module
    docstring); its requests get that run config (or `run_config`) with that source. Each tick records the
    observation (the source asset's data version: source_data.observe_source) and compares it with the last one
    it saw (its cursor); a new version requests a run keyed by it, so one version of the data is trained once.
    The first tick only records the version unless `run_on_first_tick`."""
    if source_config is None:
        base = dict(run_config) if run_config is not None else load_run_config()
        source_config = source_config_from_run_config(base)
    else:
        base = dict(run_config) if run_config is not None else {}
    request_config = with_source_config(base, source_config)
    interval = minimum_interval_seconds
    if interval is None:
        interval = int(os.environ.get(SENSOR_INTERVAL_ENV) or DEFAULT_SENSOR_INTERVAL_SECONDS)
    path = watched_path(source_config)
    watched = f"{source_config.source} source at {path}" if path else f"{source_config.source} source"

    @dg.sensor(
        name=name,
        job=retrain_all,
        minimum_interval_seconds=interval,
        default_status=default_status,
        description=f"Observes {SOURCE_ASSET} (the {watched}) and requests retrain_all when its data version "
        "(size/mtime fingerprint) changes.",
    )
    def _sensor(context: dg.SensorEvaluationContext):
        observation = observe_source(source_config)
        if not observation.watchable:
            return dg.SkipReason(f"{observation.note}: there is no new data to watch")
        version, previous = observation.data_version, context.cursor
        if previous == version:
            return dg.SkipReason(f"no change in {observation.note} under {path} (data version {version[:12]})")
        events = [observation_event(observation)]
        if previous is None and not run_on_first_tick:
            return dg.SensorResult(
                skip_reason=dg.SkipReason(
                    f"first tick: recorded data version {version[:12]} of {observation.note} under {path}; "
                    "changes from now on request retrain_all"
                ),
                cursor=version,
                asset_events=events,
            )
        request = dg.RunRequest(
            run_key=f"source-{version}",
            run_config=request_config,
            tags={"recsys/trigger": name, SOURCE_VERSION_TAG: version},
        )
        context.log.info(f"{observation.note} under {path} changed (data version {version[:12]}): retrain_all")
        return dg.SensorResult(run_requests=[request], cursor=version, asset_events=events)

    return _sensor


# ------------------------------------------------------------------------------------------------ instance
DAGSTER_YAML = """\
# DAGSTER_HOME/dagster.yaml for recsys_assets (recsys_assets/defs/automation.py: DAGSTER_YAML).
# Storage, run launcher and run coordinator stay Dagster's defaults (SQLite under DAGSTER_HOME, queued runs).

run_retries:
  enabled: true            # the daemon (dagster dev / dagster-daemon) re-launches failed runs
  max_retries: 0           # default for every job; retrain_all opts in with its tag dagster/max_retries: "2"
  retry_on_asset_or_op_failure: true

concurrency:
  pools:
    granularity: op        # a step waits for its pool slot when it starts: enforced in every run, including
                           # `dagster asset materialize` (granularity run is enforced only by the run queue)
    default_limit: 1       # every pool without an explicit limit, so "training": one training step at a time

run_monitoring:
  enabled: true
  free_slots_after_run_end_seconds: 300   # a run that died holding the training slot gives it back
"""


def write_dagster_yaml(dagster_home: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Writes DAGSTER_YAML to <dagster_home>/dagster.yaml if it is absent or empty (or if `overwrite`)."""
    target = Path(dagster_home) / "dagster.yaml"
    target.parent.mkdir(parents=True, exist_ok=True)
    if overwrite or not target.exists() or not target.read_text().strip():
        target.write_text(DAGSTER_YAML)
    return target


# ------------------------------------------------------------------------------------------------ exports
# Built when the definitions load (load_from_defs_folder imports this module): env vars are read then.
# Call retrain_schedule(...) / new_data_sensor(...) directly for other settings.
jobs = [retrain_all, observe_source_job]
schedules = [retrain_schedule()]
sensors = [new_data_sensor()]


@dg.definitions
def operations() -> dg.Definitions:
    """The jobs, the schedule, the sensor and the run executor (one process per run, also for `dagster asset
    materialize`'s implicit job: make demo), as load_from_defs_folder collects them."""
    return dg.Definitions(jobs=jobs, schedules=schedules, sensors=sensors, executor=RUN_EXECUTOR)
