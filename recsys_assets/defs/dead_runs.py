"""A run whose process is gone never blocks the next one.

A run killed with ``kill -9`` stays STARTED on the instance and keeps its training-pool slot: without the daemon's
run monitoring nothing frees it, and every later training step waits. Each run records where its orchestrating
process lives (`RUN_HOST_TAG`, `RUN_PID_TAG`); when a run starts (`StateResource` setup) and when
`recsys-assets status` runs, `release_dead_runs` marks the runs of this host whose process is gone as failed and
frees their slots. `pool_holders` says who holds a pool, for the log of a run that will wait for it."""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Callable
from pathlib import Path

import dagster as dg

from recsys_assets.defs.constants import TRAINING_POOL

RUN_HOST_TAG = "recsys/host"
RUN_PID_TAG = "recsys/pid"
RUN_PID_STARTED_TAG = "recsys/pid_started"  # the process's start time: a reused pid is not the run's process
ACTIVE = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]
FREE_A_SLOT = (
    "a run whose process is gone is released when the next run starts or by `recsys-assets status`; a live run "
    "frees its slot when it ends or is terminated (UI: Runs, Terminate)"
)


def process_started_at(pid: int) -> float | None:
    """The start time (seconds since the epoch) of a live process, None when it is gone or a zombie (Linux /proc;
    elsewhere: None only when no process has that pid)."""
    stat = Path(f"/proc/{pid}/stat")
    if not stat.parent.parent.joinpath("stat").exists():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return 0.0
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    if fields[0] in ("Z", "X"):  # exited, not yet reaped by its parent
        return None
    boot = next(
        float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
    )
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def record_run_process(instance: dg.DagsterInstance, run_id: str) -> None:
    """Tags `run_id` with this host and process (the run's orchestrator: every executor initializes resources
    there first; a later step process of the same run does not overwrite it)."""
    run = instance.get_run_by_id(run_id)
    if run is None or RUN_PID_TAG in run.tags:
        return
    pid = os.getpid()
    started = process_started_at(pid)
    instance.add_run_tags(
        run_id, {RUN_HOST_TAG: socket.gethostname(), RUN_PID_TAG: str(pid), RUN_PID_STARTED_TAG: f"{started:.2f}"}
    )


def _process_is_gone(run: dg.DagsterRun) -> bool:
    if run.tags.get(RUN_HOST_TAG) != socket.gethostname() or RUN_PID_TAG not in run.tags:
        return False  # another machine's run, or one that never recorded its process: not ours to judge
    started = process_started_at(int(run.tags[RUN_PID_TAG]))
    if started is None:
        return True
    recorded = float(run.tags.get(RUN_PID_STARTED_TAG, "0") or 0)
    return bool(recorded and started and abs(started - recorded) > 2.0)  # the pid now belongs to another process


@dataclasses.dataclass(frozen=True)
class ReleasedRun:
    run_id: str
    pid: int
    freed_slots: int


def release_dead_runs(instance: dg.DagsterInstance, log: Callable[[str], None] = print) -> list[ReleasedRun]:
    """Marks every active run of this host whose process is gone as failed and frees its pool slots."""
    released = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=ACTIVE)):
        if not _process_is_gone(run):
            continue
        storage = instance.event_log_storage
        held = 0
        if storage.supports_global_concurrency_limits:
            held = sum(
                slot.run_id == run.run_id
                for pool in storage.get_concurrency_keys()
                for slot in storage.get_concurrency_info(pool).claimed_slots
            )  # every pool, not only training's
            storage.free_concurrency_slots_for_run(run.run_id)
        pid = int(run.tags[RUN_PID_TAG])
        message = f"run {run.run_id}'s process {pid} is gone (killed?): marked failed, {held} pool slot(s) freed"
        instance.report_run_failed(run, message)
        log(message)
        released.append(ReleasedRun(run.run_id, pid, held))
    return released


def pool_holders(instance: dg.DagsterInstance, pool: str = TRAINING_POOL, *, besides: str | None = None) -> list[str]:
    """One line per slot of `pool` held by another run than `besides`: run id, step, and its process."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return []
    lines = []
    for slot in storage.get_concurrency_info(pool).claimed_slots:
        if slot.run_id == besides:
            continue
        run = instance.get_run_by_id(slot.run_id)
        where = "" if run is None else f" (pid {run.tags.get(RUN_PID_TAG, '?')} on {run.tags.get(RUN_HOST_TAG, '?')})"
        lines.append(f"run {slot.run_id}{where}, step {slot.step_key}")
    return lines


def prepare_run(instance: dg.DagsterInstance, run_id: str, log: Callable[[str], None]) -> None:
    """At a run's start: record its process, release dead runs, and say who holds the training pool."""
    record_run_process(instance, run_id)
    release_dead_runs(instance, log)
    holders = pool_holders(instance, besides=run_id)
    if holders:
        log(
            f"the '{TRAINING_POOL}' pool is held by {'; '.join(holders)}: this run's training steps wait until it is "
            f"free ({FREE_A_SLOT})"
        )
