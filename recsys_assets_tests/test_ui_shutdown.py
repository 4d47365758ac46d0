"""`make ui` (dagster dev + mlflow ui) stops within 10 s on Ctrl-C or SIGTERM and leaves no process behind."""

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from recsys_assets.ui import descendants

REPO = Path(__file__).resolve().parents[1]
STOP_BOUND_S = 10.0

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(400)]  # both servers and their helpers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serves(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
        return True
    except Exception:  # noqa: BLE001 - not up yet
        return False


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except (FileNotFoundError, ProcessLookupError):  # gone between listing and reading (ESRCH mid-exit)
            continue
        if "State:\tZ" not in status:  # a zombie has ended; its parent only has not reaped it yet
            alive.add(pid)
    return alive


@pytest.mark.parametrize("how", ["sigterm_to_make", "ctrl_c_to_group"])
def test_make_ui_stops_both_servers_and_every_helper(tmp_path, how):
    dagster_port, mlflow_port = _free_port(), _free_port()
    env = {
        **os.environ,
        "STATE": str(tmp_path / "state"),
        "RECSYS_STATE_DIR": str(tmp_path / "state"),
        "DAGSTER_HOME": str(tmp_path / "state" / "dagster_home"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/state/mlflow/mlflow.db",
    }
    make = subprocess.Popen(
        ["make", "--no-print-directory", "ui", f"UI_PORT={dagster_port}", f"MLFLOW_UI_PORT={mlflow_port}"],
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while not (_serves(dagster_port) and _serves(mlflow_port)):
            assert make.poll() is None, f"make ui exited early with {make.returncode}"
            assert time.monotonic() < deadline, "the UI servers did not come up in 240 s"
            time.sleep(1)
        tree = descendants(make.pid)
        assert len(tree) >= 4  # the launcher, both servers and their helpers (daemon, webserver, workers)

        start = time.monotonic()
        if how == "sigterm_to_make":
            os.kill(make.pid, signal.SIGTERM)
        else:
            os.killpg(make.pid, signal.SIGINT)  # what a terminal sends on Ctrl-C
        while (
            _alive(tree) or _listening(dagster_port) or _listening(mlflow_port)
        ) and time.monotonic() - start < STOP_BOUND_S + 5:
            time.sleep(0.2)
        took = time.monotonic() - start
        left = _alive(tree)
        assert not left, f"processes still running {took:.1f} s after the signal: {sorted(left)}"
        assert not _listening(dagster_port) and not _listening(mlflow_port)
        assert took <= STOP_BOUND_S, f"stopping took {took:.1f} s"
    finally:
        for pid in _alive(descendants(make.pid) | {make.pid}):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        make.wait(timeout=30)
