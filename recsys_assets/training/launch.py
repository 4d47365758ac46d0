"""What TorchDistributor runs in each process: the training function, with a consistent local rank setup."""
from __future__ import annotations

import os
import signal
import subprocess
import pickle
import traceback
from pathlib import Path
from typing import Any, Callable

RESULT_FILE = "result.pkl"


def run_with_consistent_local_ranks(single_machine_non_local: bool, error_dir: str | None,
                                    fn: Callable[..., Any], *args: Any) -> Any:
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


def process_table() -> list[tuple[int, int, str]]:
    out = subprocess.run(["ps", "-A", "-o", "pid=,ppid=,comm="], capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2:
            rows.append((int(parts[0]), int(parts[1]), parts[2] if len(parts) > 2 else ""))
    return rows


def kill_training_processes(root_pid: int | None = None) -> list[int]:
    """SIGKILLs every descendant of this process except the Spark JVM (torchrun and its workers, which sit in
    their own process groups, so killing one group is not enough). Returns the pids signalled."""
    root_pid = root_pid or os.getpid()
    table = process_table()
    children: dict[int, list[tuple[int, str]]] = {}
    for pid, ppid, comm in table:
        children.setdefault(ppid, []).append((pid, comm))
    victims, stack = [], [root_pid]
    while stack:
        for pid, comm in children.get(stack.pop(), []):
            if "java" in comm:
                continue  # the Spark JVM stays
            victims.append(pid)
            stack.append(pid)
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return victims
