"""The I/O manager that owns every asset's storage (defs/storage.py), with a real Dagster instance: one folder per
materialization, published atomically, the standard metadata, downstream assets handed the exact upstream
folder, object-storage roots through UPath, and processes killed while publishing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import pytest
import storage_assets as SA

from recsys_assets.defs.storage import MARKER, AssetFolderIOManager, stored_folder

HERE = Path(__file__).resolve().parent


def _md(result, asset: str) -> dict:
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == asset]
    return {k: v.value for k, v in event.materialization.metadata.items()}


def _instance(tmp_path: Path) -> dg.DagsterInstance:
    (tmp_path / "dagster_home").mkdir(exist_ok=True)
    return dg.DagsterInstance.local_temp(str(tmp_path / "dagster_home"))


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_each_materialization_is_one_published_folder_with_standard_metadata(tmp_path: Path):
    state = tmp_path / "state"
    result = SA.materialize([SA.thing, SA.reader], state, _instance(tmp_path))
    assert result.success
    md = _md(result, "thing")
    folder = state / "assets" / "thing" / result.run_id
    assert Path(md["path"]) == folder and (folder / "data.txt").read_text() == "one"
    assert os.readlink(state / "assets" / "thing" / "latest") == result.run_id
    assert md["dagster/row_count"] == 3
    assert [(c.name, c.type) for c in md["dagster/column_schema"].columns] == [("user", "int64"), ("score", "double")]
    # the value is stored once, as the marker of its folder: no pickle, no build folder left behind
    assert (folder / MARKER).is_file()
    assert not list(state.rglob("*.pkl")) and not list(state.rglob("storage"))
    assert _hidden(state / "assets" / "thing") == [] and _hidden(state / "assets" / "reader") == []
    # the downstream asset got the published folder and the value's fields
    seen = (Path(_md(result, "reader")["path"]) / "seen.txt").read_text().splitlines()
    assert seen == [str(folder), "mlflow-one", "table.parquet", "one"]
    # a declared table that is not there is no metadata, not an error
    assert "dagster/row_count" not in _md(result, "reader")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak-RSS reset")
def test_each_step_records_its_own_peak_memory(tmp_path: Path):
    """thing touches 400 MiB; reader, after it in the same process, starts its count afresh."""
    result = SA.materialize([SA.thing, SA.reader], tmp_path / "state", _instance(tmp_path), allocate_mb=400)
    assert result.success
    big, small = _md(result, "thing"), _md(result, "reader")
    assert big["peak_rss_mb"] - small["peak_rss_mb"] > 300, (big, small)
    assert small["peak_rss_mb"] > 0 and "peak_child_rss_mb" in small


def test_downstream_reads_the_exact_upstream_materialization_not_the_latest(tmp_path: Path):
    state, instance = tmp_path / "state", _instance(tmp_path)
    first = SA.materialize([SA.thing], state, instance, text="first")
    second = SA.materialize([SA.thing], state, instance, text="second")
    manager = AssetFolderIOManager(state=SA.resources(state)["state"])
    key = dg.AssetKey("thing")
    # a step whose upstream ran in `first` (a re-execution of that run) reads first's folder, though second is latest
    context = dg.build_input_context(
        asset_key=key, instance=instance, upstream_output=dg.build_output_context(asset_key=key, run_id=first.run_id)
    )
    value = manager.load_input(context)
    assert Path(value.path) == state / "assets" / "thing" / first.run_id
    assert value.two_tower_run_id == "mlflow-first"
    assert stored_folder(instance, key, second.run_id, manager.state) == state / "assets" / "thing" / second.run_id
    # a later run of the downstream asset alone reads the latest materialization the instance recorded
    alone = SA.materialize([SA.thing, SA.reader], state, instance, selection=["reader"])
    seen = (Path(_md(alone, "reader")["path"]) / "seen.txt").read_text().splitlines()
    assert seen[0] == str(state / "assets" / "thing" / second.run_id) and seen[-1] == "second"


def test_a_missing_upstream_is_a_clear_failure(tmp_path: Path):
    result = SA.materialize(
        [SA.thing, SA.reader], tmp_path / "state", _instance(tmp_path), selection=["reader"], raise_on_error=False
    )
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    message = str(failure.step_failure_data.error.message) + str(failure.step_failure_data.error.cause)
    assert "thing has no stored materialization to read: materialize it first" in message


def test_an_object_storage_root_uploads_and_reads_back_through_a_local_cache(tmp_path: Path):
    """A UPath root (memory://: fsspec's in-memory store, as s3:// or gs:// would be): every file is uploaded,
    the marker last; the downstream asset reads a local copy under the state's cache."""
    from upath import UPath

    state, root = tmp_path / "state", f"memory://recsys-test-{os.getpid()}/prefix"
    result = SA.materialize([SA.thing, SA.reader], state, _instance(tmp_path), text="remote", io_root=root)
    assert result.success
    md = _md(result, "thing")
    remote = UPath(root) / "assets" / "thing" / result.run_id
    assert md["path"] == str(remote) and (remote / "data.txt").read_text() == "remote"
    assert (remote / "part" / "x.bin").read_bytes() == b"remote" and (remote / MARKER).is_file()
    assert md["dagster/row_count"] == 3
    assert not (state / "assets" / "thing").exists() or _hidden(state / "assets" / "thing") == []  # build removed
    cached = state / "cache" / "assets" / "thing" / result.run_id
    reader_md = _md(result, "reader")
    lines = (UPath(reader_md["path"]) / "seen.txt").read_text().splitlines()
    assert lines == [str(cached), "mlflow-remote", "table.parquet", "remote"]
    assert (cached / "part" / "x.bin").read_bytes() == b"remote"


def test_a_champion_folder_is_found_through_the_instance(tmp_path: Path):
    from recsys_assets.defs.model_registration import champion_folder
    from recsys_assets.serving.registry import ChampionDoesNotFit

    state, instance = tmp_path / "state", _instance(tmp_path)
    result = SA.materialize([SA.thing], state, instance)
    resource = SA.resources(state)["state"]
    version = SimpleNamespace(tags={"dagster.asset_key": "thing", "dagster.run_id": result.run_id})
    assert champion_folder(instance, version, resource) == state / "assets" / "thing" / result.run_id
    unknown = SimpleNamespace(tags={"dagster.asset_key": "thing", "dagster.run_id": "not-a-run"})
    with pytest.raises(ChampionDoesNotFit, match="missing"):
        champion_folder(instance, unknown, resource)
    shutil.rmtree(state / "assets" / "thing" / result.run_id)  # pruned or deleted
    with pytest.raises(ChampionDoesNotFit, match="missing"):
        champion_folder(instance, version, resource)


# ------------------------------------------------------------------------------------------------ killed publishing
KILLED_RUN = """
import os, sys
sys.path.insert(0, {tests!r})
import dagster as dg
import storage_assets as SA
{patch}
SA.materialize([SA.thing], {state!r}, dg.DagsterInstance.local_temp({home!r}), text="half", io_root={io_root!r})
"""

# killed (os._exit: no handler runs) at the moment the local rename would publish the folder
KILL_BEFORE_RENAME = """
import recsys_assets.defs.storage as storage
storage.publish_built_folder = lambda *a, **k: os._exit(9)
"""

# killed after the first uploaded file: the remote folder is half-written and has no marker
KILL_MID_UPLOAD = """
import fsspec.implementations.local as local
real_put = local.LocalFileSystem.put_file
calls = []
def put_file(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        os._exit(9)
    return real_put(self, *args, **kwargs)
local.LocalFileSystem.put_file = put_file
"""


def _killed_run(tmp_path: Path, patch: str, io_root: str | None = None) -> None:
    script = KILLED_RUN.format(
        tests=str(HERE),
        patch=patch,
        state=str(tmp_path / "state"),
        home=str(tmp_path / "dagster_home"),
        io_root=io_root,
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr[-3000:]


def test_process_killed_while_publishing_leaves_previous_version_readable(tmp_path: Path):
    """A run killed mid-publish never touches what readers see: the previous version and `latest` stay, the
    half-written folder is hidden, and the next publication is complete and visible."""
    state, instance = tmp_path / "state", _instance(tmp_path)
    first = SA.materialize([SA.thing], state, instance, text="one")
    folder = state / "assets" / "thing"

    _killed_run(tmp_path, KILL_BEFORE_RENAME)
    assert {p.name for p in folder.iterdir() if not p.name.startswith(".")} == {"latest", first.run_id}
    assert os.readlink(folder / "latest") == first.run_id
    assert (folder / "latest" / "data.txt").read_text() == "one"
    leftovers = _hidden(folder)
    assert len(leftovers) == 1 and ".tmp-" in leftovers[0]
    assert (folder / leftovers[0] / "data.txt").read_text() == "half"  # killed after writing, before publishing
    # readers still get the previous version
    assert stored_folder(instance, dg.AssetKey("thing"), None, SA.resources(state)["state"]) == folder / first.run_id

    # the next successful publication is complete and visible
    second = SA.materialize([SA.thing], state, instance, text="two")
    assert os.readlink(folder / "latest") == second.run_id
    assert (folder / "latest" / "data.txt").read_text() == "two"
    assert (folder / "latest" / "part" / "x.bin").read_bytes() == b"two"


def test_process_killed_while_uploading_leaves_a_folder_readers_refuse(tmp_path: Path):
    """On object storage (here file://, through UPath) there is no rename: a folder killed mid-upload lacks its
    marker, readers refuse it by name, and the previous version still loads."""
    state, instance = tmp_path / "state", _instance(tmp_path)
    io_root = (tmp_path / "bucket").as_uri()
    first = SA.materialize([SA.thing], state, instance, text="one", io_root=io_root)
    _killed_run(tmp_path, KILL_MID_UPLOAD, io_root=io_root)
    versions = sorted(p.name for p in (tmp_path / "bucket" / "assets" / "thing").iterdir())
    assert len(versions) == 2 and first.run_id in versions
    [half] = [v for v in versions if v != first.run_id]
    half_folder = tmp_path / "bucket" / "assets" / "thing" / half
    assert any(half_folder.rglob("*")) and not (half_folder / MARKER).exists()

    from recsys_assets.defs.storage import as_location, local_folder

    with pytest.raises(dg.Failure, match=f"incomplete .*no {MARKER}.*materialize thing again"):
        local_folder(as_location(half_folder.as_uri()), dg.AssetKey("thing"), SA.resources(state)["state"])
    # the killed run never recorded a materialization: readers get the previous version
    previous = stored_folder(instance, dg.AssetKey("thing"), None, SA.resources(state)["state"])
    assert (previous / "data.txt").read_text() == "one"
    again = SA.materialize([SA.thing, SA.reader], state, instance, text="two", io_root=io_root)
    assert again.success
    assert (tmp_path / "bucket" / "assets" / "thing" / again.run_id / MARKER).is_file()
