"""Operations: the `retrain_all` job, its schedule, the `new_source_data` sensor, the instance's training pool
limit and run retries (`DAGSTER_YAML`, written by `write_dagster_yaml`). Schedule and sensor start STOPPED.

Read when the definitions load:
| env var                            | default                           | used by                             |
|------------------------------------|-----------------------------------|-------------------------------------|
| `RECSYS_RETRAIN_CRON`              | `0 3 * * 1` (Monday 03:00)        | `retrain_schedule()`                |
| `RECSYS_RETRAIN_TIMEZONE`          | `UTC`                             | `retrain_schedule()`                |
| `RECSYS_RUN_CONFIG`                | `recsys_assets/configs/demo.yaml` | run config of both; sensor's source |
| `RECSYS_NEW_DATA_INTERVAL_SECONDS` | `300`                             | `new_data_sensor()`                 |
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import dagster as dg
import yaml

from recsys_assets.defs.data_assets import RawInteractionsConfig

RETRAIN_CRON_ENV = "RECSYS_RETRAIN_CRON"
RETRAIN_TIMEZONE_ENV = "RECSYS_RETRAIN_TIMEZONE"
RUN_CONFIG_ENV = "RECSYS_RUN_CONFIG"
SENSOR_INTERVAL_ENV = "RECSYS_NEW_DATA_INTERVAL_SECONDS"

DEFAULT_RETRAIN_CRON = "0 3 * * 1"  # Monday 03:00
DEFAULT_TIMEZONE = "UTC"
DEFAULT_SENSOR_INTERVAL_SECONDS = 300
DEFAULT_RUN_CONFIG_FILE = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"

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


# ------------------------------------------------------------------------------------------------ run config
def run_config_path(path: str | os.PathLike | None = None) -> Path:
    """The run config file of scheduled / sensor runs: `path`, else $RECSYS_RUN_CONFIG, else demo.yaml."""
    chosen = path if path is not None else (os.environ.get(RUN_CONFIG_ENV) or DEFAULT_RUN_CONFIG_FILE)
    return Path(chosen).expanduser()


def load_run_config(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Reads a run config file (YAML or JSON, the `dagster asset materialize -c` format). Fails loudly (at
    definitions load) if the file is missing or not a mapping, and if its raw_interactions config has keys
    RawInteractionsConfig does not know."""
    file = run_config_path(path)
    if not file.is_file():
        raise dg.DagsterInvalidDefinitionError(
            f"run config file {file} not found (set ${RUN_CONFIG_ENV} to a YAML/JSON run config file)"
        )
    loaded = yaml.safe_load(file.read_text()) or {}
    if not isinstance(loaded, dict):
        raise dg.DagsterInvalidDefinitionError(
            f"run config file {file} must hold a mapping, not {type(loaded).__name__}"
        )
    source_config_from_run_config(loaded, origin=str(file))  # validate the source part now
    return loaded


def _unknown_keys(model: type[dg.Config], values: Mapping[str, Any], where: str) -> list[str]:
    """Keys of `values` that `model` (and its nested Config fields) does not declare. dg.Config does not forbid
    extra keys when constructed in Python, so a typo would otherwise only surface when a run is launched."""
    unknown = []
    for key, value in values.items():
        field = model.model_fields.get(key)
        if field is None:
            unknown.append(f"{where}.{key}")
            continue
        sub = field.annotation
        for candidate in getattr(sub, "__args__", (sub,)):  # Optional[X] -> X
            if isinstance(candidate, type) and issubclass(candidate, dg.Config) and isinstance(value, Mapping):
                unknown += _unknown_keys(candidate, value, f"{where}.{key}")
    return unknown


def source_config_from_run_config(run_config: Mapping[str, Any], origin: str = "run config") -> RawInteractionsConfig:
    """The raw_interactions config in a run config (`ops.raw_interactions.config`); defaults if absent."""
    values = ((run_config.get("ops") or {}).get("raw_interactions") or {}).get("config") or {}
    unknown = _unknown_keys(RawInteractionsConfig, values, "ops.raw_interactions.config")
    if unknown:
        raise dg.DagsterInvalidDefinitionError(f"{origin}: unknown raw_interactions config keys {unknown}")
    return RawInteractionsConfig(**values)


def with_source_config(run_config: Mapping[str, Any] | None, source_config: RawInteractionsConfig) -> dict[str, Any]:
    """`run_config` (other ops' config kept) with raw_interactions' config replaced by `source_config`."""
    result = json.loads(json.dumps(dict(run_config or {})))  # deep copy of plain data
    raw = dg.RunConfig(ops={"raw_interactions": source_config}).to_config_dict()["ops"]["raw_interactions"]
    result.setdefault("ops", {})
    result["ops"] = dict(result["ops"] or {})
    result["ops"]["raw_interactions"] = raw
    return result


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
def watched_path(source_config: RawInteractionsConfig) -> str | None:
    """The local file or folder behind a source, or None when there is nothing to watch (synthetic)."""
    if source_config.source == "movielens":
        return source_config.movielens_path
    if source_config.source == "table":
        return source_config.table.path if source_config.table is not None else None
    return None


def _local_path(path: str) -> Path | None:
    """A local Path for `path` (plain or file://), None for other URI schemes (s3://, hdfs://, ...)."""
    parsed = urlparse(path)
    if parsed.scheme == "file":
        return Path(parsed.path)
    if parsed.scheme and len(parsed.scheme) > 1:  # "C:" drive letters are not schemes
        return None
    return Path(path).expanduser()


def _is_hidden(relative: Path) -> bool:
    # Spark/Hadoop's own convention: names starting with "_" or "." are not data (_SUCCESS, .crc, _temporary/
    # of a write in progress, rsync's .name.XXXX temporaries); readers skip them and so does the fingerprint.
    return any(part.startswith((".", "_")) for part in relative.parts)


def source_fingerprint(path: str | os.PathLike) -> tuple[str, int]:
    """(sha256 hex of the sorted (relative name, size, mtime_ns) of every data file under `path`, file count).

    `path` may be a file (its own name is the relative name) or a folder (walked recursively). Cheap: stat calls
    only, no file is read."""
    root = Path(path)
    if root.is_file():
        st = root.stat()
        entries = [(root.name, st.st_size, st.st_mtime_ns)]
    else:
        entries = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith((".", "_"))]
            for name in filenames:
                file = Path(dirpath) / name
                relative = file.relative_to(root)
                if _is_hidden(relative):
                    continue
                st = file.stat()
                entries.append((relative.as_posix(), st.st_size, st.st_mtime_ns))
        entries.sort()
    digest = hashlib.sha256(json.dumps(entries, separators=(",", ":")).encode()).hexdigest()
    return digest, len(entries)


def _fingerprint_key(source_config: RawInteractionsConfig, path: str, files_digest: str) -> str:
    # The source kind and path are part of the key: pointing the sensor at another source counts as new data.
    blob = json.dumps([source_config.source, path, files_digest]).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def new_data_sensor(
    source_config: RawInteractionsConfig | None = None,
    *,
    run_config: Mapping[str, Any] | None = None,
    minimum_interval_seconds: int | None = None,
    run_on_first_tick: bool = False,
    default_status: dg.DefaultSensorStatus = dg.DefaultSensorStatus.STOPPED,
    name: str = "new_source_data",
) -> dg.SensorDefinition:
    """A sensor that requests a `retrain_all` run when the files of the watched source change.

    Source: `source_config`, else the raw_interactions config of the run config file (see the module
    docstring); its requests get that run config (or `run_config`) with that source. Only local movielens / table
    paths are watched. A changed size/mtime fingerprint (names starting with "_" or "." ignored) requests a run
    keyed by the fingerprint, so one version of the data is trained once; the first tick only records it unless
    `run_on_first_tick`."""
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
        description=f"Requests retrain_all when the files of the {watched} change (size/mtime fingerprint).",
    )
    def _sensor(context: dg.SensorEvaluationContext):
        if source_config.source == "synthetic":
            return dg.SkipReason("source 'synthetic' is generated, not read: there is no new data to watch")
        if not path:
            return dg.SkipReason(f"source '{source_config.source}' has no path configured: nothing to watch")
        local = _local_path(path)
        if local is None:
            return dg.SkipReason(f"{path}: only local paths (or file:// URIs) are watched")
        if not local.exists():
            return dg.SkipReason(f"{path} does not exist (yet)")
        files_digest, n_files = source_fingerprint(local)
        fingerprint = _fingerprint_key(source_config, path, files_digest)
        previous = context.cursor
        if previous == fingerprint:
            return dg.SkipReason(f"no change in {n_files} file(s) under {path} (fingerprint {fingerprint[:12]})")
        request = dg.RunRequest(
            run_key=f"source-{fingerprint}",
            run_config=request_config,
            tags={"recsys/trigger": name, "recsys/source_fingerprint": fingerprint},
        )
        if previous is None and not run_on_first_tick:
            return dg.SensorResult(
                skip_reason=dg.SkipReason(
                    f"first tick: recorded fingerprint {fingerprint[:12]} of {n_files} file(s) under {path}; "
                    "changes from now on request retrain_all"
                ),
                cursor=fingerprint,
            )
        context.log.info(f"{n_files} file(s) under {path} changed (fingerprint {fingerprint[:12]}): retrain_all")
        return dg.SensorResult(run_requests=[request], cursor=fingerprint)

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
# Built when the definitions load (recsys_assets.definitions imports this module): env vars are read then.
# Call retrain_schedule(...) / new_data_sensor(...) directly for other settings.
jobs = [retrain_all]
schedules = [retrain_schedule()]
sensors = [new_data_sensor()]
