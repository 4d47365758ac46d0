"""The online funnel's speed: the registered champion (models:/recsys_two_stage@champion) behind the real
`mlflow models serve` on loopback, against the same calls in-process (`pyfunc.load_model(...).predict`), so the
HTTP overhead is visible. Bounded: a fixed number of requests per figure.

Figures: model load (server start to first answer), single-user latency p50 / p99 (sequential), requests/s with
1, 4 and 16 concurrent clients, the latency of one 100-user request; for each --workers value (uvicorn workers,
each with --threads torch threads).

Reproduce (prints the tables below):
    V=$(bash scripts/bootstrap.sh); export PYSPARK_PYTHON=$V/bin/python
    # the demo graph (make demo registers recsys_two_stage in .recsys_state)
    make demo && $V/bin/python benchmarks/serving.py
    # ml-latest-small: a quality run, then the online model on it
    $V/bin/python benchmarks/quality.py --dataset movielens --work /tmp/q-ml
    $V/bin/python benchmarks/quality.py --dataset movielens --work /tmp/q-ml --stages two_stage_model
    $V/bin/python benchmarks/serving.py --tracking-uri sqlite:////tmp/q-ml/mlflow.db
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
MODEL_URI = "models:/recsys_two_stage@champion"
LOAD_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, records: list[dict]) -> dict:
    body = json.dumps({"dataframe_records": records}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


class Server:
    """`mlflow models serve` of MODEL_URI (what `make serve` runs) with `workers` uvicorn workers."""

    def __init__(self, tracking_uri: str, workers: int, threads: int, log: Path) -> None:
        self.port = _free_port()
        bin_dir = Path(sys.executable).parent
        env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
        env["OMP_NUM_THREADS"] = str(threads)
        self.log = open(log, "w")
        cmd = [str(bin_dir / "mlflow"), "models", "serve", "-m", MODEL_URI, "--env-manager", "local"]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--workers", str(workers)]
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def first_answer(self, user) -> float:
        """Seconds from the start until a predict request is answered."""
        t0, deadline = time.perf_counter(), time.monotonic() + LOAD_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the model server exited (code {self.proc.returncode}); see {self.log.name}")
            try:
                _post(self.port, [{"user_id": user}])
                return time.perf_counter() - t0
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no answer in {LOAD_TIMEOUT_S} s; see {self.log.name}") from None
                time.sleep(0.2)

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)  # the CLI and the uvicorn workers it started
        self.proc.wait(timeout=60)
        self.log.close()


def latencies_ms(call, users: list, n: int) -> np.ndarray:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        call([{"user_id": users[i % len(users)]}])
        out.append(1000 * (time.perf_counter() - t0))
    return np.asarray(out)


def throughput(call, users: list, clients: int, n: int) -> float:
    """Requests/s of `n` single-user requests spread over `clients` concurrent clients."""

    def client(c: int) -> None:
        for i in range(c, n, clients):
            call([{"user_id": users[i % len(users)]}])

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return n / (time.perf_counter() - t0)


def measure(call, users: list, args) -> dict:
    for u in users[:10]:  # warm-up
        call([{"user_id": u}])
    lat = latencies_ms(call, users, args.requests)
    batch = [1000 * _timed(call, [{"user_id": u} for u in users[s : s + 100]]) for s in (0, 100, 200)]
    figures = {"single p50 ms": np.percentile(lat, 50), "single p99 ms": np.percentile(lat, 99)}
    for clients in (1, 4, 16):
        figures[f"req/s, {clients} clients"] = throughput(call, users, clients, args.requests)
    figures["100-user request ms"] = float(np.median(batch))
    return figures


def _timed(call, records) -> float:
    t0 = time.perf_counter()
    call(records)
    return time.perf_counter() - t0


def in_process(tracking_uri: str) -> tuple:
    import mlflow.pyfunc

    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    t0 = time.perf_counter()
    model = mlflow.pyfunc.load_model(MODEL_URI)
    return model, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_uri = os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{REPO}/.recsys_state/mlflow/mlflow.db")
    ap.add_argument("--tracking-uri", default=default_uri)
    ap.add_argument("--requests", type=int, default=400, help="Requests per figure (latency, each throughput).")
    ap.add_argument("--workers", default="1,2", help="uvicorn worker counts to compare.")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker (OMP_NUM_THREADS).")
    ap.add_argument("--log-dir", default="/tmp/recsys-serving-bench")
    args = ap.parse_args()
    from mlflow.exceptions import MlflowException

    try:
        model, load_s = in_process(args.tracking_uri)
    except MlflowException as exc:
        print(f"no {MODEL_URI} in {args.tracking_uri} ({exc.message.splitlines()[0]}): run `make demo` first")
        return 1
    import torch

    torch.set_num_threads(args.threads)  # as each server worker
    scorer = model.unwrap_python_model().scorer
    users = list(scorer.user_of_id)[:300]
    rows = {"in-process": {"load s": load_s, **measure(lambda r: model.predict(pd.DataFrame(r)), users, args)}}
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    for workers in (int(w) for w in args.workers.split(",")):
        server = Server(args.tracking_uri, workers, args.threads, Path(args.log_dir) / f"serve-{workers}.log")
        try:
            load = server.first_answer(users[0])
            rows[f"HTTP, {workers} worker(s)"] = {
                "load s": load,
                **measure(lambda r: _post(server.port, r), users, args),
            }
        finally:
            server.stop()
    table = pd.DataFrame(rows).T
    base = table.loc["in-process"]
    print(
        f"\n{MODEL_URI} on {args.tracking_uri}: {len(scorer.user_of_id)} users, {scorer.num_items} items, "
        f"pool {scorer.pool_size}, {args.requests} requests per figure, torch threads per worker {args.threads}"
    )
    print(table.to_markdown(floatfmt=".1f"))
    print("\nratio to in-process (latency: HTTP / in-process; throughput: HTTP / in-process)")
    print((table / base).to_markdown(floatfmt=".2f"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
