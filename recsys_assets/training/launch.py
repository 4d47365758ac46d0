"""Launching distributed training through PySpark's TorchDistributor: the driver side (`run_distributed`: progress,
timeout, failed ranks, rank 0's result) and the wrapper every process runs."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULT_FILE = "result.pkl"
# The launcher wakes this often to forward progress lines and check the timeout.
POLL_SECONDS = 1.0
# After a timeout kill, how long to wait for TorchDistributor's thread to notice before raising.
KILL_GRACE_SECONDS = 30
# Lines of TorchDistributor's (long) error output kept when no rank left an error file.
FAILURE_LINES = 25


def default_process_count(use_gpu: bool) -> int:
    """What trains fastest here: one process per visible GPU with `use_gpu`; on CPU, one process whose torch
    threads use every core. Two gloo processes on 2 cores pay an all-to-all and an all-reduce per step and train
    the Two Tower 2.5x slower than one process with 2 threads (benchmarks/train_two_tower.py)."""
    if use_gpu:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("TorchDistributorResource: use_gpu=True but torch sees no CUDA device")
        return torch.cuda.device_count()
    return 1


def run_distributed(
    fn: Callable[..., Any],
    *args: Any,
    session,
    num_processes: int,
    local_mode: bool = True,
    use_gpu: bool = False,
    timeout_seconds: float = 3600,
    single_machine: bool = True,
    progress_file: str | Path | None = None,
    on_progress: Callable[[dict], None] | None = None,
) -> Any:
    """Runs ``fn(*args)`` on `num_processes` ranks through TorchDistributor (`session`: the active SparkSession)
    and returns rank 0's result.

    JSON lines the ranks append to `progress_file` go to `on_progress` (default: printed). Past
    `timeout_seconds` the whole process tree is killed and TimeoutError raised; a failed rank raises a
    RuntimeError naming it. ``single_machine`` (with ``local_mode=False``): see `run_with_consistent_local_ranks`."""
    from pyspark.ml.torch.distributor import TorchDistributor

    distributor = TorchDistributor(num_processes=num_processes, local_mode=local_mode, use_gpu=use_gpu)
    fix_local = (not local_mode) and single_machine
    error_dir = Path(tempfile.mkdtemp(prefix="recsys-rank-errors-"))
    outcome: dict = {}

    def target():
        try:
            outcome["result"] = distributor.run(run_with_consistent_local_ranks, fix_local, str(error_dir), fn, *args)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="torch-distributor", daemon=True)
    forward = _ProgressForwarder(progress_file, on_progress or (lambda rec: print(json.dumps(rec))))
    start = time.monotonic()
    thread.start()
    while thread.is_alive():
        thread.join(timeout=POLL_SECONDS)
        forward()
        if time.monotonic() - start > timeout_seconds and thread.is_alive():
            kill_training_processes()
            session.sparkContext.cancelAllJobs()
            thread.join(timeout=KILL_GRACE_SECONDS)
            raise TimeoutError(f"distributed training exceeded timeout_seconds={timeout_seconds}; processes killed")
    forward()
    if "error" in outcome:
        causes = _rank_failures(error_dir) or summarize_failure(outcome["error"])
        raise RuntimeError(f"distributed training failed: {causes}") from outcome["error"]
    handed_over = error_dir / RESULT_FILE
    if handed_over.exists():  # rank 0's result (see run_with_consistent_local_ranks); a temp file of this call
        with open(handed_over, "rb") as fh:
            result = pickle.load(fh)
        shutil.rmtree(error_dir, ignore_errors=True)
        return result
    return outcome["result"]


class _ProgressForwarder:
    """Hands the complete JSON lines appended to `path` since the last call to `on_record`."""

    def __init__(self, path: str | Path | None, on_record: Callable[[dict], None]):
        self.path, self.on_record, self.offset = path, on_record, 0

    def __call__(self) -> None:
        if self.path is None or not Path(self.path).exists():
            return
        with open(self.path) as fh:
            fh.seek(self.offset)
            for line in fh:
                if line.endswith("\n"):
                    self.offset += len(line)
                    try:
                        self.on_record(json.loads(line))
                    except json.JSONDecodeError:
                        pass


def _rank_failures(error_dir: Path) -> str:
    """The errors the ranks left in `error_dir`, led by the ranks that died without one."""
    files = sorted(error_dir.glob("rank*.txt"))
    causes = "\n".join(p.read_text() for p in files)
    # A rank killed (SIGKILL, OOM, os._exit) writes no error file; the others then fail in a collective
    # ("Connection reset by peer"), which would hide it: name the ranks that died first.
    errored = {p.stem[len("rank") :] for p in files}
    done = {p.name[len("done") :] for p in error_dir.glob("done*")}
    silent = sorted(
        p.name[len("started") :] for p in error_dir.glob("started*") if p.name[len("started") :] not in errored | done
    )
    if silent:
        died = (
            f"rank(s) {', '.join(silent)} ended without a Python error (killed, out of memory or "
            f"os._exit; once one rank dies, torchrun also terminates the others)"
        )
        causes = f"{died}; errors of the other ranks:\n{causes}" if causes else died
    return causes


def summarize_failure(exc: BaseException) -> str:
    """TorchDistributor's error carries 100 lines of output; keep the lines that say what went wrong."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    keep = [
        line for line in lines if any(k in line for k in ("Error", "error", "exit code", "failed", "Traceback", "rank"))
    ]
    return "\n".join((keep or lines)[-FAILURE_LINES:])


def run_with_consistent_local_ranks(
    single_machine_non_local: bool, error_dir: str | None, fn: Callable[..., Any], *args: Any
) -> Any:
    """With ``local_mode=False`` each Spark task runs its own torchrun with one process, so every rank sees
    LOCAL_WORLD_SIZE=1 / LOCAL_RANK=0. When those tasks share one machine, Mosaic Streaming's shared memory
    collides unless the local values describe all processes on the machine: set them to the global ones."""
    if single_machine_non_local:
        os.environ["LOCAL_WORLD_SIZE"] = os.environ.get("WORLD_SIZE", "1")
        os.environ["LOCAL_RANK"] = os.environ.get("RANK", "0")
    rank = os.environ.get("RANK", "?")
    # error_dir is the launcher's folder; on another machine of a cluster it does not exist: skip the markers
    shared = bool(error_dir) and os.path.isdir(error_dir)
    if shared:  # lets the launcher name a rank that dies without a Python error (SIGKILL, OOM, os._exit)
        Path(error_dir, f"started{rank}").touch()
    try:
        result = fn(*args)
        if not shared:
            return result
        # TorchDistributor (local mode) has EVERY rank pickle its return value into one shared file: with large
        # results (state dicts) the concurrent writes interleave and the file does not unpickle. Rank 0 hands
        # its result over through its own file (written, then renamed), every rank returns None.
        if rank == "0":
            tmp = Path(error_dir, f".{RESULT_FILE}.tmp")
            with open(tmp, "wb") as fh:
                pickle.dump(result, fh, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, Path(error_dir, RESULT_FILE))
        Path(error_dir, f"done{rank}").touch()
        return None
    except BaseException as exc:
        # TorchDistributor's own error only says "view stdout logs": leave the cause where the launcher reads it.
        if shared:
            tail = "".join(traceback.format_exception(exc)[-6:])
            Path(error_dir, f"rank{rank}.txt").write_text(f"rank {rank}: {type(exc).__name__}: {exc}\n{tail}")
        raise


def rank_environment() -> dict[str, Any]:
    """What a rank runs with: world size, torch threads, its interpreter and the recsys_assets code it imported.
    Run through `run_distributed`, it shows what a launch really started (each clone's own code, the threads)."""
    import torch

    import recsys_assets

    return {
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "torch_threads": torch.get_num_threads(),
        "python": sys.executable,
        "package": str(Path(recsys_assets.__file__).resolve().parent),
    }


def process_table() -> list[tuple[int, int, str]]:
    out = subprocess.run(["ps", "-A", "-o", "pid=,ppid=,comm="], capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2:
            rows.append((int(parts[0]), int(parts[1]), parts[2] if len(parts) > 2 else ""))
    return rows


def kill_training_processes(root_pid: int | None = None, *, spare_jvm: bool = True) -> list[int]:
    """SIGKILLs every descendant of `root_pid` (default: this process) except the Spark JVM unless not
    `spare_jvm` (torchrun and its workers sit in their own process groups, so killing one group is not enough).
    Returns the pids signalled."""
    root_pid = root_pid or os.getpid()
    table = process_table()
    children: dict[int, list[tuple[int, str]]] = {}
    for pid, ppid, comm in table:
        children.setdefault(ppid, []).append((pid, comm))
    victims, stack = [], [root_pid]
    while stack:
        for pid, comm in children.get(stack.pop(), []):
            if spare_jvm and "java" in comm:
                continue  # the Spark JVM stays
            victims.append(pid)
            stack.append(pid)
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return victims
