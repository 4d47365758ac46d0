"""`make ui`: the Dagster UI (`dagster dev`) and the MLflow UI on the same local state, stopped together.

Both servers run in process groups of their own, and each spawns helpers (the Dagster daemon and code server,
MLflow's workers). On Ctrl-C or SIGTERM, or when the parent (`make`) dies, every process of both trees gets
SIGTERM, and SIGKILL after `stop_timeout` seconds: nothing is left running.

    python -m recsys_assets.ui [--dagster-port 3000] [--mlflow-port 5000] [--host 127.0.0.1]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from recsys_assets.training.launch import process_table

STOP_TIMEOUT_S = 6.0  # the bound is 10 s from the signal to no process left


def descendants(root_pid: int) -> set[int]:
    """Every process below `root_pid` (children, grandchildren, ...)."""
    children: dict[int, list[int]] = {}
    for pid, ppid, _ in process_table():
        children.setdefault(ppid, []).append(pid)
    found, stack = set(), [root_pid]
    while stack:
        for pid in children.get(stack.pop(), []):
            if pid not in found:
                found.add(pid)
                stack.append(pid)
    return found


def session_members(session_ids: set[int]) -> set[int]:
    """Processes in these sessions: each server leads one, and helpers that outlive their parent stay in it."""
    out = subprocess.run(["ps", "-A", "-o", "pid=,sid="], capture_output=True, text=True, check=True).stdout
    rows = (line.split() for line in out.splitlines())
    return {int(pid) for pid, sid in rows if int(sid) in session_ids}


def _signal_all(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _alive(pids: set[int]) -> set[int]:
    running = {pid for pid, _, _ in process_table()}
    return pids & running


def stop_servers(procs: list[subprocess.Popen], stop_timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM to every process of the servers' trees, then SIGKILL to whatever is left after `stop_timeout`."""
    tree = session_members({p.pid for p in procs}) | {p.pid for p in procs}
    for p in procs:
        tree |= descendants(p.pid)
    _signal_all(tree, signal.SIGTERM)
    deadline = time.monotonic() + stop_timeout
    while time.monotonic() < deadline:
        for p in procs:
            p.poll()  # reap, so a finished server does not linger as a zombie
        if not _alive(tree):
            return
        time.sleep(0.2)
    _signal_all(_alive(tree), signal.SIGKILL)
    for p in procs:
        p.wait()


def serve(dagster_port: int, mlflow_port: int, host: str, tracking_uri: str, workspace: str) -> int:
    bin_dir = Path(sys.executable).parent
    commands = [
        [
            str(bin_dir / "mlflow"),
            "ui",
            "--backend-store-uri",
            tracking_uri,
            "--host",
            host,
            "--port",
            str(mlflow_port),
        ],
        [str(bin_dir / "dagster"), "dev", "-w", workspace, "--host", host, "--port", str(dagster_port)],
    ]
    procs = [subprocess.Popen(cmd, start_new_session=True) for cmd in commands]
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    parent = os.getppid()
    print(f"Dagster UI http://{host}:{dagster_port}  MLflow UI http://{host}:{mlflow_port}  (Ctrl-C stops both)")
    # a server that exits ends the session too; so does the death of the parent (`make` killed with SIGTERM)
    while not stop.wait(0.5):
        if os.getppid() != parent or any(p.poll() is not None for p in procs):
            break
    stop_servers(procs)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Dagster UI and MLflow UI on the local state, stopped together.")
    ap.add_argument("--dagster-port", type=int, default=3000)
    ap.add_argument("--mlflow-port", type=int, default=5000)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--workspace", default="workspace.yaml")
    ap.add_argument(
        "--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///.recsys_state/mlflow/mlflow.db")
    )
    args = ap.parse_args(argv)
    return serve(args.dagster_port, args.mlflow_port, args.host, args.tracking_uri, args.workspace)


if __name__ == "__main__":
    sys.exit(main())
