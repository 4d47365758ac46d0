"""The scale-out path on one machine: Two Tower training through `TorchDistributorResource(local_mode=False)` on
a Spark ``local-cluster[2,1,2048]`` master (two real executor JVMs, one core each, so TorchDistributor's barrier
stage of 2 tasks puts one rank in each executor) gives the same metrics as a ``local_mode=True`` run (torchrun
on the driver) on the same seed and data.

Each run happens in a subprocess (`local_cluster_train.py`) with its own SparkSession: a local-cluster master
needs a fresh SparkContext, and the pytest process keeps its shared ``local[2]`` session for the other tests.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_mds import write_synthetic_dataset  # noqa: E402

pytestmark = [pytest.mark.multiprocess, pytest.mark.spark_cluster, pytest.mark.timeout(600)]

HELPER = Path(__file__).resolve().parent / "local_cluster_train.py"
SETTINGS = dict(
    epochs=4,
    early_stopping=False,  # a fixed number of epochs: both runs do the same work
    batch_size=128,
    embedding_dim=16,
    layer_sizes=[32, 16],
    num_uniform_negatives=32,
    use_user_id=False,
    seed=0,
    num_threads=1,
)


def _train(tmp: Path, data_root: Path, name: str, master: str, local_mode: bool, executors: int) -> dict:
    from recsys_assets.training.two_tower import TwoTowerTrainConfig

    cfg = TwoTowerTrainConfig(data_root=str(data_root), progress_file=str(tmp / f"{name}.progress.jsonl"), **SETTINGS)
    cfg_file, out = tmp / f"{name}.config.json", tmp / f"{name}.result.json"
    cfg_file.write_text(json.dumps(cfg.to_dict()))
    cmd = [
        sys.executable,
        str(HELPER),
        "--master",
        master,
        "--local-mode",
        str(local_mode).lower(),
        "--expect-executors",
        str(executors),
        "--config",
        str(cfg_file),
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420, cwd=tmp)
    if proc.returncode != 0:
        raise AssertionError(f"{name} run failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    result = json.loads(out.read_text())
    print(
        f"\n{name}: master {result['master']}, executors {result['executors']}, {result['seconds']:.1f}s, "
        f"final {result['final_metrics']}, losses {[round(h['loss'], 4) for h in result['history']]}"
    )
    return result


def test_local_cluster_training_matches_local_mode(tmp_path):
    if shutil.which("java") is None:
        pytest.skip("no java on PATH: Spark cannot start")
    data = write_synthetic_dataset(tmp_path / "ds")
    local = _train(tmp_path, data.root, "local_mode", "local[2]", True, 0)
    cluster = _train(tmp_path, data.root, "local_cluster", "local-cluster[2,1,2048]", False, 2)

    assert cluster["master"].startswith("local-cluster") and cluster["executors"] == 2
    assert cluster["local_mode"] is False and local["local_mode"] is True
    assert cluster["world_size"] == local["world_size"] == 2
    assert len(cluster["history"]) == len(local["history"]) == SETTINGS["epochs"]
    assert cluster["progress_events"] > 0  # rank 0's progress lines reach the driver from an executor
    # Same seed, same data, same world size -> the same run up to float noise.
    for key in ("hr@10", "ndcg@10", "hr@100"):
        assert abs(cluster["final_metrics"][key] - local["final_metrics"][key]) <= 0.03, key
    for a, b in zip(cluster["history"], local["history"]):
        assert abs(a["loss"] - b["loss"]) <= 0.02 * abs(b["loss"]) + 1e-3, (a["loss"], b["loss"])
    # and the model learned something (HR@10 of a random ranking of 200 items is ~0.05)
    assert cluster["final_metrics"]["hr@10"] > 0.15
