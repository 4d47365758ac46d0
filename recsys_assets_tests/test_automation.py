"""The operations layer (recsys_assets/defs/automation.py): retrain_all job, its schedule, the new_source_data
sensor, the training pool limit and the proposed dagster.yaml. Fast: no Spark session, no training, no run is
executed (schedules and sensors are evaluated, not launched)."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import dagster as dg
import pytest
import yaml

from recsys_assets.defs import automation as A
from recsys_assets.defs import source_data as SD
from recsys_assets.defs.constants import TRAINING_POOL
from recsys_assets.defs.data_assets import RawInteractionsConfig, TableSourceConfig
from recsys_assets.defs.data_checks import data_checks
from recsys_assets.defs.two_tower_assets import two_tower_model

ENV_VARS = (A.RETRAIN_CRON_ENV, A.RETRAIN_TIMEZONE_ENV, SD.RUN_CONFIG_ENV, A.SENSOR_INTERVAL_ENV)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


def _defs(schedules=None, sensors=None) -> dg.Definitions:
    """The product's definitions (every asset and check), with these schedules and sensors."""
    from recsys_assets.definitions import defs
    from recsys_assets.defs.resources import default_resources

    return dg.Definitions(
        assets=defs.assets,
        asset_checks=defs.asset_checks,
        resources=default_resources(),
        jobs=A.jobs,
        schedules=A.schedules if schedules is None else schedules,
        sensors=A.sensors if sensors is None else sensors,
    )


def _tick(sensor: dg.SensorDefinition, cursor: str | None):
    return sensor.evaluate_tick(dg.build_sensor_context(cursor=cursor))


def _movielens_folder(root: Path) -> Path:
    folder = root / "ml-test"
    folder.mkdir()
    (folder / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,100\n")
    (folder / "movies.csv").write_text("movieId,title,genres\n1,A,Drama\n")
    return folder


# ------------------------------------------------------------------------------------------------ loading
def test_objects_load_with_the_project_assets():
    defs = _defs()
    dg.Definitions.validate_loadable(defs)
    job = defs.resolve_job_def("retrain_all")
    # the whole product graph, evaluation included (the demo run config sets its settings)
    job_assets = set(job.asset_layer.asset_graph.get_all_asset_keys())
    materialized = {key for a in defs.assets if isinstance(a, dg.AssetsDefinition) for key in a.keys}
    assert job_assets == materialized | {dg.AssetKey(SD.SOURCE_ASSET)}  # the observed source: upstream, not run
    assert dg.AssetKey("evaluation") in job_assets
    # blocking data checks and the funnel's gates run inside the job too
    assert set(job.asset_layer.asset_graph.asset_check_keys) == {key for c in defs.asset_checks for key in c.check_keys}
    assert {key for c in data_checks for key in c.check_keys} <= set(job.asset_layer.asset_graph.asset_check_keys)
    assert [s.name for s in A.schedules] == ["retrain_all_schedule"]
    assert [s.name for s in A.sensors] == ["new_source_data"]
    assert all(s.job_name == "retrain_all" for s in [*A.schedules, *A.sensors])


def test_retrain_all_carries_run_retry_tags():
    job = _defs().resolve_job_def("retrain_all")
    assert job.run_tags["dagster/max_retries"] == str(A.RETRAIN_MAX_RETRIES)
    assert job.run_tags["dagster/retry_strategy"] == "FROM_FAILURE"


def test_training_pool_name_matches_the_training_asset():
    assert two_tower_model.op.pool == TRAINING_POOL


# ------------------------------------------------------------------------------------------------ schedule
def test_schedule_defaults_to_weekly_stopped_utc():
    schedule = A.retrain_schedule()
    assert schedule.cron_schedule == "0 3 * * 1"
    assert schedule.execution_timezone == "UTC"
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    assert schedule.job_name == "retrain_all"


def test_schedule_cron_from_env_and_argument(monkeypatch):
    monkeypatch.setenv(A.RETRAIN_CRON_ENV, "30 1 * * *")
    monkeypatch.setenv(A.RETRAIN_TIMEZONE_ENV, "Europe/Berlin")
    schedule = A.retrain_schedule()
    assert schedule.cron_schedule == "30 1 * * *"
    assert schedule.execution_timezone == "Europe/Berlin"
    assert A.retrain_schedule("0 0 1 * *").cron_schedule == "0 0 1 * *"  # the argument wins over the env var


def test_schedule_refuses_an_invalid_cron(monkeypatch):
    monkeypatch.setenv(A.RETRAIN_CRON_ENV, "every monday")
    with pytest.raises(dg.DagsterInvalidDefinitionError):
        A.retrain_schedule()


def test_schedule_evaluation_requests_retrain_all_with_the_demo_run_config():
    schedule = A.retrain_schedule()
    when = datetime.datetime(2025, 1, 6, 3, 0, tzinfo=datetime.UTC)
    data = schedule.evaluate_tick(dg.build_schedule_context(scheduled_execution_time=when))
    assert len(data.run_requests) == 1
    request = data.run_requests[0]
    assert request.run_config == yaml.safe_load(SD.DEFAULT_RUN_CONFIG_FILE.read_text())
    assert request.tags["recsys/trigger"] == "schedule"
    dg.validate_run_config(_defs(schedules=[schedule]).resolve_job_def("retrain_all"), request.run_config)


def test_run_config_file_from_env(tmp_path, monkeypatch):
    data = _movielens_folder(tmp_path)
    config_file = tmp_path / "prod.yaml"
    config_file.write_text(
        yaml.safe_dump(
            {
                "ops": {
                    "raw_interactions": {"config": {"source": "movielens", "movielens_path": str(data)}},
                    "two_tower_model": {"config": {"epochs": 3}},
                }
            }
        )
    )
    monkeypatch.setenv(SD.RUN_CONFIG_ENV, str(config_file))
    request = A.retrain_schedule().evaluate_tick(dg.build_schedule_context()).run_requests[0]
    assert request.run_config["ops"]["raw_interactions"]["config"]["movielens_path"] == str(data)
    sensor = A.new_data_sensor()
    first = _tick(sensor, None)
    assert first.cursor is not None and not first.run_requests  # it watches the file's movielens folder


def test_run_config_file_with_unknown_source_keys_fails_loudly(tmp_path, monkeypatch):
    config_file = tmp_path / "typo.yaml"
    config_file.write_text(yaml.safe_dump({"ops": {"raw_interactions": {"config": {"movielens_pth": "/x"}}}}))
    monkeypatch.setenv(SD.RUN_CONFIG_ENV, str(config_file))
    with pytest.raises(dg.DagsterInvalidDefinitionError, match="movielens_pth"):
        A.retrain_schedule()
    monkeypatch.setenv(SD.RUN_CONFIG_ENV, str(tmp_path / "missing.yaml"))
    with pytest.raises(dg.DagsterInvalidDefinitionError, match="not found"):
        A.new_data_sensor()


# ------------------------------------------------------------------------------------------------ sensor
def test_sensor_first_tick_records_then_skips_then_requests_on_change(tmp_path):
    folder = _movielens_folder(tmp_path)
    source = RawInteractionsConfig(source="movielens", movielens_path=str(folder))
    sensor = A.new_data_sensor(source)
    assert sensor.default_status == dg.DefaultSensorStatus.STOPPED
    assert sensor.job_name == "retrain_all"

    first = _tick(sensor, None)
    assert first.run_requests == [] and "first tick" in first.skip_message
    assert first.cursor
    # the tick records the source asset's observation: its data version is the cursor
    [observed] = first.asset_events
    assert observed.asset_key == dg.AssetKey(SD.SOURCE_ASSET)
    assert observed.tags[SD.DATA_VERSION_TAG] == first.cursor == SD.observe_source(source).data_version

    same = _tick(sensor, first.cursor)
    assert same.run_requests == [] and "no change" in same.skip_message

    # Spark/Hadoop markers and hidden temporaries are not data
    (folder / "_SUCCESS").write_text("")
    (folder / ".ratings.csv.part").write_text("partial")
    (folder / "_temporary").mkdir()
    (folder / "_temporary" / "part-0").write_text("partial")
    assert _tick(sensor, first.cursor).run_requests == []

    (folder / "tags.csv").write_text("userId,movieId,tag,timestamp\n")
    changed = _tick(sensor, first.cursor)
    assert len(changed.run_requests) == 1
    request = changed.run_requests[0]
    assert changed.cursor != first.cursor
    assert request.run_key == f"source-{changed.cursor}"
    assert request.run_config == {
        "ops": {
            "raw_interactions": {
                "config": {
                    "source": "movielens",
                    "movielens_path": str(folder),
                    "synthetic": {"size": "small", "seed": 0},
                    "bad_lines": "fail",
                }
            }
        }
    }
    assert request.tags[A.SOURCE_VERSION_TAG] == changed.cursor
    assert [e.tags[SD.DATA_VERSION_TAG] for e in changed.asset_events] == [changed.cursor]
    dg.validate_run_config(_defs(sensors=[sensor]).resolve_job_def("retrain_all"), request.run_config)

    # a modified file (same name and size, new mtime) is a new version too
    st = (folder / "ratings.csv").stat()
    os.utime(folder / "ratings.csv", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    modified = _tick(sensor, changed.cursor)
    assert len(modified.run_requests) == 1
    assert modified.run_requests[0].run_key == f"source-{modified.cursor}" != request.run_key
    assert _tick(sensor, modified.cursor).run_requests == []


def test_sensor_watches_a_single_table_file_and_keeps_other_run_config(tmp_path):
    table = tmp_path / "events.parquet"
    table.write_bytes(b"v1")
    source = RawInteractionsConfig(source="table", table=TableSourceConfig(path=str(table), user_column="uid"))
    base = {"ops": {"two_tower_model": {"config": {"epochs": 2}}}}
    sensor = A.new_data_sensor(source, run_config=base, run_on_first_tick=True)

    first = _tick(sensor, None)  # run_on_first_tick: the first tick already requests a run
    assert len(first.run_requests) == 1
    table.write_bytes(b"version 2")
    second = _tick(sensor, first.cursor)
    assert len(second.run_requests) == 1 and second.cursor != first.cursor
    config = second.run_requests[0].run_config
    assert config["ops"]["two_tower_model"] == {"config": {"epochs": 2}}
    raw = config["ops"]["raw_interactions"]["config"]
    assert raw["source"] == "table" and raw["table"]["path"] == str(table) and raw["table"]["user_column"] == "uid"
    assert base == {"ops": {"two_tower_model": {"config": {"epochs": 2}}}}  # the caller's dict is not modified


def test_fingerprint_covers_names_sizes_and_mtimes(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.csv").write_text("1")
    digest, n = SD.source_fingerprint(tmp_path)
    assert n == 1
    assert SD.source_fingerprint(tmp_path) == (digest, 1)
    (tmp_path / "a" / "x.csv").write_text("12")
    assert SD.source_fingerprint(tmp_path)[0] != digest


@pytest.mark.parametrize(
    "source, reason",
    [
        (RawInteractionsConfig(source="synthetic"), "synthetic"),
        (RawInteractionsConfig(source="movielens"), "no path"),
        (RawInteractionsConfig(source="movielens", movielens_path="/nonexistent/ml-1m"), "does not exist"),
        (RawInteractionsConfig(source="table", table=TableSourceConfig(path="s3://bucket/events")), "local"),
    ],
)
def test_sensor_skips_with_a_reason_when_there_is_nothing_to_watch(source, reason):
    result = _tick(A.new_data_sensor(source, run_on_first_tick=True), None)
    assert result.run_requests == []
    assert reason in result.skip_message
    assert result.cursor is None


def test_the_source_is_an_observed_asset_upstream_of_raw_interactions(tmp_path, monkeypatch):
    from recsys_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    source_key = dg.AssetKey(SD.SOURCE_ASSET)
    assert graph.get(source_key).is_observable and not graph.get(source_key).is_materializable
    assert graph.get(dg.AssetKey("raw_interactions")).parent_keys == {source_key}

    folder = _movielens_folder(tmp_path)
    run_config = {"ops": {"raw_interactions": {"config": {"source": "movielens", "movielens_path": str(folder)}}}}
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(run_config))
    monkeypatch.setenv(SD.RUN_CONFIG_ENV, str(config_file))
    observe = defs.resolve_job_def("observe_interaction_source")
    with dg.instance_for_test() as instance:
        assert observe.execute_in_process(instance=instance).success
        record = instance.get_latest_data_version_record(source_key)
        expected = SD.observe_source(RawInteractionsConfig(source="movielens", movielens_path=str(folder)))
        assert record.asset_observation.data_version == expected.data_version
        assert record.asset_observation.metadata["files"].value == 2  # ratings.csv and movies.csv
        (folder / "tags.csv").write_text("userId,movieId,tag,timestamp\n")
        assert observe.execute_in_process(instance=instance).success
        assert instance.get_latest_data_version_record(source_key).asset_observation.data_version not in (
            None,
            expected.data_version,
        )


def test_sensor_interval_from_argument_env_and_default(monkeypatch, tmp_path):
    source = RawInteractionsConfig(source="synthetic")
    assert A.new_data_sensor(source).minimum_interval_seconds == A.DEFAULT_SENSOR_INTERVAL_SECONDS
    monkeypatch.setenv(A.SENSOR_INTERVAL_ENV, "60")
    assert A.new_data_sensor(source).minimum_interval_seconds == 60
    assert A.new_data_sensor(source, minimum_interval_seconds=15).minimum_interval_seconds == 15


def test_default_sensor_watches_the_demo_config():
    # demo.yaml is synthetic: the default sensor loads and skips with a reason
    result = _tick(A.new_data_sensor(), None)
    assert result.run_requests == [] and "synthetic" in result.skip_message


# ------------------------------------------------------------------------------------------------ instance
def _ensure_training_pool_limit(instance: dg.DagsterInstance, limit: int = 1, pool: str = TRAINING_POOL) -> bool:
    """(How a deployment would pin the pool on an existing instance; `make demo` writes dagster.yaml instead.)
    Sets an explicit limit of `limit` slots on the training pool (the same as
    `dagster instance concurrency set training 1`, or the UI's Concurrency page). Idempotent.

    Returns True when the instance's pool limit is now `limit`; False when the instance's storage has no
    concurrency slots (an in-memory instance such as `DagsterInstance.ephemeral()`, which enforces no pools)."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return False
    current = {p.name: p for p in storage.get_pool_limits()}.get(pool)
    if current is None or current.limit != limit or current.from_default:
        storage.set_concurrency_slots(pool, limit)
    return True


def test_ensure_training_pool_limit_on_a_persistent_instance():
    with dg.instance_for_test() as instance:
        storage = instance.event_log_storage
        assert _ensure_training_pool_limit(instance) is True
        assert storage.get_concurrency_info(TRAINING_POOL).slot_count == 1
        assert _ensure_training_pool_limit(instance) is True  # idempotent
        assert storage.get_concurrency_info(TRAINING_POOL).slot_count == 1
        # one slot: a second run's training step waits until the first frees it
        assert storage.claim_concurrency_slot(TRAINING_POOL, "run-1", "two_tower_model").is_claimed
        assert not storage.claim_concurrency_slot(TRAINING_POOL, "run-2", "two_tower_model").is_claimed
        storage.free_concurrency_slots_for_run("run-1")
        assert storage.claim_concurrency_slot(TRAINING_POOL, "run-2", "two_tower_model").is_claimed
        assert _ensure_training_pool_limit(instance, limit=2) is True
        assert storage.get_concurrency_info(TRAINING_POOL).slot_count == 2


def test_ensure_training_pool_limit_on_an_in_memory_instance_reports_no_support():
    assert _ensure_training_pool_limit(dg.DagsterInstance.ephemeral()) is False


def test_dagster_yaml_enables_run_retries_and_limits_the_training_pool(tmp_path):
    settings = yaml.safe_load(A.DAGSTER_YAML)
    with dg.instance_for_test(overrides=settings) as instance:
        assert instance.run_retries_enabled and instance.run_retries_max_retries == 0
        pools = instance.get_concurrency_config().pool_config
        assert pools.default_pool_limit == 1 and pools.pool_granularity.value == "op"
        assert instance.run_monitoring_enabled
        # the default limit applies to the training pool without any CLI step
        instance.event_log_storage.initialize_concurrency_limit_to_default(TRAINING_POOL)
        assert instance.event_log_storage.get_concurrency_info(TRAINING_POOL).slot_count == 1

    written = A.write_dagster_yaml(tmp_path / "home")
    assert written.read_text() == A.DAGSTER_YAML
    written.write_text("telemetry:\n  enabled: false\n")
    A.write_dagster_yaml(tmp_path / "home")  # an existing, non-empty file is kept
    assert "telemetry" in written.read_text()
