"""The locked install (scripts/bootstrap.sh, uv.lock): the lock matches pyproject.toml, a stale one is refused, and
each clone has its own environment, so two clones used at once each run their own code in the training ranks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BOOTSTRAP = ["bash", "scripts/bootstrap.sh"]

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git to list the clone's files")


def _copy_of_this_checkout(dest: Path) -> Path:
    """The files a clone of this working tree has (tracked, plus untracked ones git does not ignore)."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, text=True, check=True
    )
    for name in filter(None, listed.stdout.split("\0")):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def test_the_lock_matches_pyproject_and_a_stale_lock_is_refused(tmp_path: Path):
    checked = subprocess.run([*BOOTSTRAP, "--check-lock"], cwd=REPO, capture_output=True, text=True)
    assert checked.returncode == 0, f"uv.lock is stale: run `bash scripts/bootstrap.sh --lock`\n{checked.stderr}"
    # the same check on a copy whose pyproject.toml gained a dependency the lock does not have
    for name in ("pyproject.toml", "uv.lock", "README.md", "scripts/bootstrap.sh"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, tmp_path / name)
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('    "tqdm",\n', '    "tqdm",\n    "six",\n', 1))
    stale = subprocess.run([*BOOTSTRAP, "--check-lock"], cwd=tmp_path, capture_output=True, text=True)
    assert stale.returncode != 0
    assert "lock" in stale.stderr.lower(), stale.stderr


WHO_RUNS = """
import json
from pyspark.sql import SparkSession
from recsys_assets.training.launch import rank_environment, run_distributed
spark = SparkSession.builder.master("local[2]").config("spark.ui.enabled", "false").getOrCreate()
print(json.dumps(run_distributed(rank_environment, session=spark, num_processes=2, on_progress=lambda r: None)))
"""


@pytest.mark.multiprocess
def test_two_clones_at_once_each_run_their_own_code_in_the_training_ranks(tmp_path: Path):
    clones = {name: _copy_of_this_checkout(tmp_path / name) for name in ("a", "b")}
    (clones["b"] / "recsys_assets" / "_planted_marker").write_text("b")  # only clone b has it
    for name, clone in clones.items():
        t0 = time.monotonic()
        setup = subprocess.run(BOOTSTRAP, cwd=clone, capture_output=True, text=True, timeout=900)
        assert setup.returncode == 0, setup.stderr[-3000:]
        assert Path(setup.stdout.strip().splitlines()[-1]) == clone / ".venv"
        print(f"clone {name}: environment in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    # both at once, each with its own interpreter and Spark driver
    running = {
        name: subprocess.Popen(
            [str(clone / ".venv/bin/python"), "-c", WHO_RUNS],
            cwd=clone,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={"PATH": "/usr/bin:/bin", "PYSPARK_PYTHON": str(clone / ".venv/bin/python")},
        )
        for name, clone in clones.items()
    }
    import json

    for name, proc in running.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        rank = json.loads(out.strip().splitlines()[-1])
        assert rank["world_size"] == 2
        assert Path(rank["package"]) == clones[name] / "recsys_assets"
        assert Path(rank["python"]).parent.parent == clones[name] / ".venv"
        assert (Path(rank["package"]) / "_planted_marker").exists() == (name == "b")


def test_bytecode_of_other_sources_is_not_linked_into_an_environment(tmp_path: Path):
    # a seed compiled against another copy of the sources (uv's cache rebuilt) would be stale on every import
    import importlib.util
    import py_compile

    spec = importlib.util.spec_from_file_location("link_bytecode", REPO / "scripts" / "link_bytecode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    seed, site = tmp_path / "seed", tmp_path / "site"
    for name in ("same", "other"):
        source = seed / "pkg" / f"{name}.py"
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_text(f"X = {name!r}\n")
        py_compile.compile(str(source), cfile=str(seed / "pkg" / "__pycache__" / f"{name}.cpython-311.pyc"))
        (site / "pkg").mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, site / "pkg" / f"{name}.py")  # same mtime and size
    stamp = (site / "pkg" / "other.py").stat().st_mtime + 100
    os.utime(site / "pkg" / "other.py", (stamp, stamp))  # another copy of the source
    # a module this environment lacks: neither linked nor counted stale (that would force a recompile per clone)
    shutil.copy2(
        seed / "pkg" / "__pycache__" / "same.cpython-311.pyc", seed / "pkg" / "__pycache__" / "gone.cpython-311.pyc"
    )

    assert module.link_bytecode(str(seed), str(site), match_sources=True) == 1
    linked = sorted(p.name for p in (site / "pkg" / "__pycache__").iterdir())
    assert linked == ["same.cpython-311.pyc"]
    assert module.link_bytecode(str(seed), str(tmp_path / "copy"), match_sources=False) == 0  # seed refresh
    assert len(list((tmp_path / "copy" / "pkg" / "__pycache__").iterdir())) == 3
