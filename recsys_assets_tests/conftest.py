"""Shared fixtures: one SparkSession for the whole test session, the shared data folder, MovieLens inputs,
and the Dagster resources the data assets need."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

# Spark's Python workers must run this interpreter (the venv with torch/streaming), not `python3` on PATH.
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)


@pytest.fixture(scope="session")
def spark():
    """The one SparkSession of the test session (local[2], no UI, 4 shuffle partitions, UTC).

    Dagster's SparkResource and any other `getOrCreate()` in this process get this same session back. Its
    `stop()` is disabled for the session's lifetime so that a module-scoped fixture that stops "its" session
    (it is this one) cannot break the tests that run after it; the real stop happens at teardown."""
    if shutil.which("java") is None:
        pytest.skip("no java on PATH: Spark cannot start")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[2]")
        .appName("recsys_assets_tests")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.driver.memory", "2g")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    session.stop = lambda: None  # type: ignore[method-assign]  # see the docstring
    yield session
    SparkSession.stop(session)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder beside the repository (``../shared/data``)."""
    return Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def ml_latest_small(shared_data: Path) -> Path:
    path = shared_data / "ml-latest-small"
    if not (path / "ratings.csv").is_file():
        pytest.skip(f"MovieLens ml-latest-small not found at {path} (expected ratings.csv there)")
    return path


@pytest.fixture(scope="session")
def lastfm(shared_data: Path) -> Path:
    path = shared_data / "hetrec2011-lastfm-2k"
    if not (path / "user_artists.dat").is_file():
        pytest.skip(f"HetRec 2011 Last.fm not found at {path} (expected beside the repository)")
    return path


@pytest.fixture(scope="session")
def pyspark_sample_ratings() -> Path:
    """pyspark's bundled ``data/mllib/als/sample_movielens_ratings.txt`` (user::item::rating::timestamp)."""
    import pyspark

    path = Path(pyspark.__file__).parent / "data" / "mllib" / "als" / "sample_movielens_ratings.txt"
    if not path.is_file():
        pytest.skip(f"pyspark's sample MovieLens file is not installed at {path}")
    return path


@pytest.fixture()
def data_resources(spark, tmp_path: Path) -> dict:
    """Resources for materializing the data assets: local Spark (the session above), a fresh state root and the
    project's I/O manager on it."""
    from recsys_assets.defs.resources import SparkResource, StateResource
    from recsys_assets.defs.storage import AssetFolderIOManager

    state = StateResource(root=str(tmp_path / "state"))
    return {
        "spark": SparkResource(master="local[2]", shuffle_partitions=4),
        "state": state,
        "io_manager": AssetFolderIOManager(state=state),
    }
