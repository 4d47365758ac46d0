"""Checkpoints and resume of the Two Tower trainer (recsys_assets.training.checkpoint): a rank killed mid-epoch
fails the launcher fast and a relaunch continues from the last checkpoint; checkpoints reshard 2 -> 1 and
1 -> 2 processes; an explicit resume without a checkpoint is a clear error.

One small synthetic dataset (300 users, 200 items, ~3250 train rows: 13 steps per epoch with 2 x 128 rows).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

TESTS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS_DIR))
from elastic import elastic_run  # noqa: E402
from fault_injection import train_two_tower_exiting  # noqa: E402
from synthetic_mds import write_synthetic_dataset  # noqa: E402

pytestmark = pytest.mark.timeout(600)

EVERY = 4  # checkpoint every 4 global steps (and at every epoch end)
SETTINGS = dict(
    query_encoder="bag",  # the sequence encoder's resume: test_sequence_tower.py
    eval_phase="validation",
    epochs=3,
    patience=5,
    batch_size=128,
    num_uniform_negatives=16,
    num_threads=1,
    seed=0,
    checkpoint_every_n_steps=EVERY,
    checkpoint_keep=2,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("ckpt") / "ds")


def _config(dataset, checkpoint_dir, **overrides):
    from recsys_assets.training.two_tower import TwoTowerTrainConfig

    return TwoTowerTrainConfig(
        data_root=str(dataset.root), checkpoint_dir=str(checkpoint_dir), **{**SETTINGS, **overrides}
    )


def _elastic(config, nproc: int, tmp: Path):
    """`train_two_tower` in `nproc` spawned processes; rank 0's result."""
    from recsys_assets.training.two_tower import train_two_tower

    return elastic_run(train_two_tower, config, nproc, tmp)[0]


def _steps_per_epoch(dataset, world_size: int, batch_size: int = 128) -> int:
    return math.ceil(math.ceil(dataset.meta.rows["train"] / world_size) / batch_size)


def _saved_tables(checkpoint: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """The full embedding tables stored in a DCP checkpoint folder (merged from every rank's shards)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"merged-{uuid.uuid4().hex[:8]}.pt"
    dcp_to_torch_save(str(checkpoint), str(out))
    model = torch.load(out, weights_only=False)["model"]
    prefix, suffix = "two_tower.ebc.embedding_bags.", ".weight"
    return {k[len(prefix) : -len(suffix)]: v for k, v in model.items() if k.startswith(prefix) and k.endswith(suffix)}


def _assert_rows_equal(resume_check, tables):
    assert resume_check and set(resume_check) == set(tables)
    for table, d in resume_check.items():
        assert torch.equal(tables[table][d["ids"]], d["rows"]), table


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    """An uninterrupted 2-process run (3 epochs) with checkpoints; (result, checkpoint folder)."""
    tmp = tmp_path_factory.mktemp("ckpt_reference")
    t0 = time.time()
    result = _elastic(_config(dataset, tmp / "ck"), 2, tmp)
    print(f"\nreference 2-process run: {time.time() - t0:.1f}s, {result.global_steps} steps, {result.final_metrics}")
    return result, tmp / "ck"


def _descendants_alive() -> list[tuple[int, str]]:
    """Processes below this one (the Spark JVM and its Python workers excepted), zombies excluded."""
    from recsys_assets.training.launch import process_table

    children: dict[int, list[tuple[int, str]]] = {}
    for pid, ppid, comm in process_table():
        children.setdefault(ppid, []).append((pid, comm))
    alive, stack = [], [os.getpid()]
    while stack:
        for pid, comm in children.get(stack.pop(), []):
            if "java" in comm or comm == "ps":
                continue
            try:
                state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
            except OSError:
                continue
            if state != "Z":
                alive.append((pid, comm))
                stack.append(pid)
    return alive


# --------------------------------------------------------------------------------------------------- tests
@pytest.mark.multiprocess
def test_checkpoint_folder_layout(reference, dataset):
    """Epoch-end and every-N-step checkpoints, atomic (no temp folder left), the newest `keep` kept, a
    `latest` pointer at the last one, each with one state file per rank."""
    from recsys_assets.training.checkpoint import checkpoint_name, latest_checkpoint, list_checkpoints

    result, ck = reference
    spe = _steps_per_epoch(dataset, 2)
    assert result.global_steps == 3 * spe and result.resumed_from_step is None
    names = [p.name for p in list_checkpoints(ck)]
    assert names[-1] == checkpoint_name(3 * spe) and len(names) >= 2
    assert (ck / "latest").read_text().strip() == names[-1] and latest_checkpoint(ck).name == names[-1]
    assert not [p for p in ck.iterdir() if p.name.startswith(".tmp-")]
    last = ck / names[-1]
    assert {"rank_0.pt", "rank_1.pt", "trainer_state.json", ".metadata"} <= {p.name for p in last.iterdir()}
    assert len(list(last.glob("*.distcp"))) == 2  # each rank wrote its own shards


@pytest.mark.multiprocess
def test_killed_rank_fails_fast_and_relaunch_resumes_mid_epoch(reference, dataset, spark, tmp_path, monkeypatch):
    """Rank 1 dies (os._exit) mid-epoch 1: TorchDistributorResource raises quickly, no process is left behind;
    the relaunch with the same checkpoint_dir resumes at the last checkpoint's step, covers every epoch
    exactly once and ends within noise of the uninterrupted run on the same seed."""
    from recsys_assets.defs.resources import SparkResource, TorchDistributorResource
    from recsys_assets.training.two_tower import train_two_tower

    ref, _ = reference
    spe = _steps_per_epoch(dataset, 2)
    kill_at = spe + 5  # mid-epoch 1
    expected = max(s for s in range(1, kill_at + 1) if s % EVERY == 0 or s % spe == 0)
    assert spe < expected < 2 * spe  # the last checkpoint before the kill is a mid-epoch one
    config = _config(dataset, tmp_path / "ck")
    resource = TorchDistributorResource(spark=SparkResource(master="local[2]"), num_processes=2, timeout_seconds=300)

    # torchrun's processes unpickle train_two_tower_exiting by reference: they import fault_injection from here
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])))
    before = {pid for pid, _ in _descendants_alive()}  # e.g. multiprocessing's resource tracker, long-lived
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="distributed training failed") as err:
        resource.run(None, train_two_tower_exiting, config, 1, kill_at, on_progress=lambda rec: None)
    elapsed = time.monotonic() - start
    print(f"\nkilled run failed after {elapsed:.1f}s: {str(err.value)[:600]}")
    assert elapsed < 150
    # names the killed rank (rank 0 may be listed too when torchrun's SIGTERM beats its "connection reset" error)
    assert re.search(r"rank\(s\) (0, )?1 ended without a Python error", str(err.value)), str(err.value)
    time.sleep(2)
    assert [p for p in _descendants_alive() if p[0] not in before] == []  # torchrun and both ranks are gone

    t0 = time.monotonic()
    resumed = resource.run(None, train_two_tower, config, on_progress=lambda rec: None)
    print(
        f"relaunch: {time.monotonic() - t0:.1f}s, resumed from step {resumed.resumed_from_step}, "
        f"{resumed.final_metrics} vs uninterrupted {ref.final_metrics}"
    )
    assert resumed.resumed_from_step == expected
    assert resumed.global_steps == ref.global_steps == 3 * spe
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2]
    assert all(h["samples"] == dataset.meta.rows["train"] for h in resumed.history)  # exactly once per epoch
    assert resumed.history[0]["metrics"] == pytest.approx(ref.history[0]["metrics"], abs=1e-6)
    for k in ("hr@10", "ndcg@10", "hr@100"):
        assert abs(resumed.final_metrics[k] - ref.final_metrics[k]) <= 0.02, (
            k,
            resumed.final_metrics,
            ref.final_metrics,
        )
    assert abs(resumed.history[-1]["loss"] - ref.history[-1]["loss"]) <= 0.02 * ref.history[-1]["loss"]


@pytest.mark.multiprocess
def test_two_process_checkpoint_resumes_in_one_process(reference, dataset, tmp_path):
    """2 -> 1: the last checkpoint of the 2-process run loads into one process (DCP reshards), the tables equal
    the saved ones right after loading, and training continues for a 4th epoch."""
    from recsys_assets.training.checkpoint import latest_checkpoint
    from recsys_assets.training.two_tower import train_two_tower

    ref, ck = reference
    copy = tmp_path / "ck"
    shutil.copytree(ck, copy)
    saved = _saved_tables(latest_checkpoint(copy), tmp_path)
    result = train_two_tower(_config(dataset, copy, epochs=4, resume=True))  # in this process: world size 1
    assert result.world_size == 1 and result.resumed_from_step == ref.global_steps
    _assert_rows_equal(result.resume_check, saved)
    assert result.history[:3] == ref.history  # restored trainer state
    assert len(result.history) == 4 and result.history[3]["samples"] == dataset.meta.rows["train"]
    assert result.global_steps == ref.global_steps + _steps_per_epoch(dataset, 1)
    assert math.isfinite(result.history[3]["loss"]) and result.history[3]["loss"] < result.history[0]["loss"]


@pytest.mark.multiprocess
def test_one_process_checkpoint_resumes_in_two_processes(dataset, tmp_path):
    """1 -> 2: a checkpoint written by one process loads into two, equal right after loading; training goes on."""
    from recsys_assets.training.checkpoint import latest_checkpoint
    from recsys_assets.training.two_tower import train_two_tower

    one = train_two_tower(_config(dataset, tmp_path / "ck", epochs=1, checkpoint_every_n_steps=0))
    assert one.world_size == 1 and one.global_steps == _steps_per_epoch(dataset, 1)
    saved = _saved_tables(latest_checkpoint(tmp_path / "ck"), tmp_path)
    for table, w in saved.items():  # the checkpoint holds what the run returned (1 epoch: the best is the last)
        assert torch.equal(w, one.state_dict[f"two_tower.ebc.embedding_bags.{table}.weight"])
    two = _elastic(_config(dataset, tmp_path / "ck", epochs=2, checkpoint_every_n_steps=0), 2, tmp_path)
    assert two.world_size == 2 and two.resumed_from_step == one.global_steps
    _assert_rows_equal(two.resume_check, saved)
    assert two.history[0] == one.history[0] and len(two.history) == 2
    assert two.history[1]["samples"] == dataset.meta.rows["train"]
    assert two.history[1]["loss"] < two.history[0]["loss"]


def test_explicit_resume_without_checkpoint_is_a_clear_error(dataset, tmp_path):
    """resume=True and no checkpoint folder: an error naming the path, before any model is built."""
    from recsys_assets.training.checkpoint import CheckpointNotFoundError, resolve_resume
    from recsys_assets.training.two_tower import train_two_tower

    missing = tmp_path / "no-such-checkpoints"
    progress = tmp_path / "progress.jsonl"
    start = time.monotonic()
    with pytest.raises(CheckpointNotFoundError, match="does not exist") as err:
        train_two_tower(_config(dataset, missing, resume=True, progress_file=str(progress)))
    assert str(missing) in str(err.value)
    assert time.monotonic() - start < 30 and not progress.exists()  # nothing started
    empty = tmp_path / "empty"
    (empty / ".tmp-step-000000004").mkdir(parents=True)  # a save that died half-way does not count
    with pytest.raises(CheckpointNotFoundError, match="holds no complete checkpoint") as err:
        resolve_resume(empty, True)
    assert str(empty) in str(err.value)
    assert resolve_resume(missing, "auto") is None and resolve_resume(missing, False) is None
