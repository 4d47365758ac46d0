"""A dead run never blocks the next one (recsys_assets/defs/dead_runs.py): runs whose process is gone are marked
failed and their pool slots freed, when a run starts and when `recsys-assets status` runs; live runs, other
machines' runs and runs that recorded no process are left alone. End to end: a materialization killed with
``kill -9`` during training, then the next one on the same instance runs to the end."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import dagster as dg
import pytest
import yaml

from recsys_assets.defs import dead_runs as D
from recsys_assets.defs.constants import TRAINING_POOL

REPO = Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
    """A pid that belonged to a process which has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _add_run(instance, tags: dict[str, str]) -> str:
    run_id = str(uuid.uuid4())
    instance.add_run(
        dg.DagsterRun(job_name="retrain_all", run_id=run_id, status=dg.DagsterRunStatus.STARTED, tags=tags)
    )
    return run_id


def _tags(pid: int, host: str | None = None, started: float | None = None) -> dict[str, str]:
    started = D.process_started_at(pid) if started is None else started
    return {
        D.RUN_HOST_TAG: host or socket.gethostname(),
        D.RUN_PID_TAG: str(pid),
        D.RUN_PID_STARTED_TAG: f"{started or 0:.2f}",
    }


def test_only_runs_whose_process_is_gone_are_failed_and_their_slots_freed():
    with dg.instance_for_test() as instance:
        storage = instance.event_log_storage
        storage.set_concurrency_slots(TRAINING_POOL, 1)
        dead = _add_run(instance, _tags(_dead_pid(), started=1.0))
        alive = _add_run(instance, _tags(os.getpid()))
        elsewhere = _add_run(instance, _tags(_dead_pid(), host="another-machine", started=1.0))
        untagged = _add_run(instance, {})
        # this process's pid, but recorded with another start time: the pid was reused, the run's process is gone
        reused = _add_run(instance, _tags(os.getpid(), started=D.process_started_at(os.getpid()) - 3600))
        assert storage.claim_concurrency_slot(TRAINING_POOL, dead, "two_tower_model").is_claimed
        assert D.pool_holders(instance) == [
            f"run {dead} (pid {_tags_of(instance, dead)} on {socket.gethostname()}), step two_tower_model"
        ]

        lines = []
        released = D.release_dead_runs(instance, log=lines.append)

        assert sorted(r.run_id for r in released) == sorted([dead, reused])
        assert {r.run_id: r.freed_slots for r in released} == {dead: 1, reused: 0}
        status = {
            run_id: instance.get_run_by_id(run_id).status for run_id in (dead, alive, elsewhere, untagged, reused)
        }
        assert status[dead] == status[reused] == dg.DagsterRunStatus.FAILURE
        assert status[alive] == status[elsewhere] == status[untagged] == dg.DagsterRunStatus.STARTED
        assert storage.get_concurrency_info(TRAINING_POOL).claimed_slots == []
        assert storage.claim_concurrency_slot(TRAINING_POOL, alive, "two_tower_model").is_claimed  # the next run's
        assert any(f"run {dead}'s process" in line and "1 pool slot(s) freed" in line for line in lines)
        assert D.release_dead_runs(instance, log=lines.append) == []  # idempotent


def _tags_of(instance, run_id: str) -> str:
    return instance.get_run_by_id(run_id).tags[D.RUN_PID_TAG]


def test_a_run_records_its_process_once():
    with dg.instance_for_test() as instance:
        run_id = _add_run(instance, {})
        D.record_run_process(instance, run_id)
        tags = instance.get_run_by_id(run_id).tags
        assert (tags[D.RUN_HOST_TAG], tags[D.RUN_PID_TAG]) == (socket.gethostname(), str(os.getpid()))
        assert abs(float(tags[D.RUN_PID_STARTED_TAG]) - D.process_started_at(os.getpid())) < 0.05
        instance.add_run_tags(run_id, {D.RUN_PID_TAG: "1"})
        D.record_run_process(instance, run_id)  # a later step process of the same run keeps the orchestrator's
        assert instance.get_run_by_id(run_id).tags[D.RUN_PID_TAG] == "1"


# ------------------------------------------------------------------------------------------------ end to end
RUN_CONFIG = {
    "ops": {
        "raw_interactions": {"config": {"synthetic": {"size": "tiny"}}},
        "two_tower_model": {"config": {"epochs": 1, "patience": 1, "refit_on_validation": False}},
    }
}


def _materialize(env: dict, config: Path, select: str, **popen) -> subprocess.Popen:
    command = [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "recsys_assets.definitions"]
    return subprocess.Popen([*command, "--select", select, "-c", str(config)], cwd=REPO, env=env, **popen)


def _wait_for_step(instance_home: Path, step: str, proc: subprocess.Popen, deadline_s: float = 600) -> str:
    """The run id once `step` has started in it (polls the instance; fails if the run ends first)."""
    deadline = time.monotonic() + deadline_s
    with dg.DagsterInstance.from_config(str(instance_home)) as instance:
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the materialization ended before the training step started"
            for run in instance.get_runs():
                starts = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.STEP_START).records
                if any(record.event_log_entry.step_key == step for record in starts):
                    return run.run_id
            time.sleep(0.5)
    raise AssertionError(f"{step} did not start within {deadline_s} s")


def _kill_tree(root: int) -> None:
    """SIGKILL the process and every descendant, its Spark JVM included (kill -9 of the whole materialization)."""
    from recsys_assets.training.launch import kill_training_processes

    os.kill(root, signal.SIGSTOP)  # frozen first: it cannot react (fail its run) while its children die
    kill_training_processes(root, spare_jvm=False)
    os.kill(root, signal.SIGKILL)


@pytest.mark.multiprocess
def test_a_materialization_killed_during_training_does_not_block_the_next(tmp_path):
    from recsys_assets.defs.automation import write_dagster_yaml

    home = tmp_path / "dagster_home"
    home.mkdir()
    write_dagster_yaml(home)  # the training pool limited to one slot, as `make demo` sets it
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(RUN_CONFIG))
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "RECSYS_STATE_DIR": str(tmp_path / "state"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
    }
    first = _materialize(env, config, "*two_tower_model", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        killed_run = _wait_for_step(home, "two_tower_model", first)
    finally:
        _kill_tree(first.pid)
        first.wait()  # reaped: its pid is gone, not a zombie
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.get_run_by_id(killed_run).status == dg.DagsterRunStatus.STARTED  # nothing marked it
        holders = instance.event_log_storage.get_concurrency_info(TRAINING_POOL).claimed_slots
        assert [slot.run_id for slot in holders] == [killed_run]  # the slot the next run would wait for

    second = _materialize(env, config, "two_tower_model", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = second.communicate(timeout=900)
    assert second.returncode == 0, out[-4000:]
    assert f"run {killed_run}'s process" in out and "1 pool slot(s) freed" in out
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.get_run_by_id(killed_run).status == dg.DagsterRunStatus.FAILURE
        runs = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.SUCCESS]))
        assert len(runs) == 1 and runs[0].run_id != killed_run
        assert instance.get_latest_materialization_event(dg.AssetKey("two_tower_model")).run_id == runs[0].run_id
