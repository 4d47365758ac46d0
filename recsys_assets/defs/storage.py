"""The I/O manager that owns every asset's storage: one folder per materialization, ``<root>/assets/<asset>/<run id>``.

An asset writes its files into the build folder `StateResource.build_folder` gives it and returns a typed value
(defs/types.py) whose ``path`` is that folder. `AssetFolderIOManager.handle_output` then publishes it: a rename on
a local root (data.publish: readers see the previous version or the complete new one, never a half-written one), an
upload with the completion marker written last on object storage (UPath: ``s3://``, ``gs://``, ``abfs://``, and
``file://`` to try it locally). The value itself is not pickled anywhere: the marker (`MARKER`) holds its type and
fields, and `load_input` rebuilds it from the exact folder of the upstream materialization.
"""

import dataclasses
import json
import resource
import shutil
from pathlib import Path
from typing import Any

import dagster as dg

from recsys_assets.data.publish import publish_built_folder, publish_folder
from recsys_assets.defs.resources import StateResource
from recsys_assets.defs.types import VALUE_TYPES

# Dagster's run id of an upstream output it did not produce in this run (dagster._core.execution.context.output)
UNKNOWN_RUN_ID = "__EPHEMERAL_RUN_ID"
MARKER = "_asset.json"  # the value's type and fields; written last, so a folder without it is incomplete


class AssetFolderIOManager(dg.ConfigurableIOManager):
    """Publishes each asset's build folder as ``<root>/assets/<asset>/<run id>`` and hands downstream assets the
    folder of the materialization they read.

    ``root``: a local folder (default: the state root) or an fsspec URI (``s3://bucket/prefix``, ``gs://``,
    ``abfs://``, ``file://``), read through UPath; remote folders are read through a local copy under the state
    root's ``cache/``. ``keep_versions``: published versions kept per asset on a local root (object stores: their
    lifecycle rules). Metadata: ``path``, plus ``dagster/row_count`` and ``dagster/column_schema`` of the value's
    main table (its ``table``) where the asset did not record them itself, and the step's peak memory
    (`peak_memory_metadata`)."""

    state: StateResource
    root: str | None = None
    keep_versions: int = 3

    # ---------------------------------------------------------------------------------------------- output
    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if obj is None:
            return
        built = _built_folder(context, obj)
        location = self.location(context.asset_key, context.run_id)
        try:
            metadata = parquet_footer_metadata(built, getattr(obj, "table", None), already=context.output_metadata)
            (built / MARKER).write_text(json.dumps(_describe(obj), indent=2))
            if isinstance(location, Path):
                publish_built_folder(built, location, keep_versions=self.keep_versions)
            else:
                _upload(built, location)
        finally:  # published (moved or uploaded), or failed: the build folder is not kept either way
            shutil.rmtree(built, ignore_errors=True)
        context.add_output_metadata(
            {"path": dg.MetadataValue.path(str(location)), **metadata, **peak_memory_metadata(context.output_metadata)}
        )

    # ---------------------------------------------------------------------------------------------- input
    def load_input(self, context: dg.InputContext) -> Any:
        """The value of the materialization this step reads: the upstream step's run (this run, or the parent of
        a re-execution), else the asset's latest materialization in the instance."""
        key = context.asset_key
        try:
            run_id = context.upstream_output.run_id if context.upstream_output is not None else None
        except dg.DagsterInvariantViolationError:
            run_id = None
        if run_id == UNKNOWN_RUN_ID:  # an asset materialized by an earlier run: Dagster does not say which
            run_id = None
        folder = stored_folder(context.instance, key, run_id, self.state)
        if folder is None:
            name = key.to_user_string()
            raise dg.Failure(
                f"{name} has no stored materialization{f' in run {run_id}' if run_id else ''} to read: materialize "
                f"it first (`dagster asset materialize -m recsys_assets.definitions --select {name}`)"
            )
        description = json.loads((folder / MARKER).read_text())
        return VALUE_TYPES[description["type"]](path=str(folder), **description["fields"])

    # ---------------------------------------------------------------------------------------------- paths
    def location(self, key: dg.AssetKey, run_id: str) -> Path | Any:
        """Where the materialization of `key` by `run_id` is published (a Path, or a UPath on object storage)."""
        root = as_location(self.root) if self.root else self.state.resolved_root()
        return root / "assets" / key.to_user_string() / run_id


def stored_folder(
    instance: dg.DagsterInstance, key: dg.AssetKey, run_id: str | None, state: StateResource
) -> Path | None:
    """The local folder of `key`'s materialization by `run_id` (None: its latest), found through the ``path`` the
    I/O manager recorded in the instance; None when there is no such materialization. A folder on object storage
    comes back as a local copy in the state's cache."""
    recorded = _recorded_path(instance, key, run_id)
    return None if recorded is None else local_folder(as_location(recorded), key, state)


def _recorded_path(instance: dg.DagsterInstance, key: dg.AssetKey, run_id: str | None) -> str | None:
    if run_id is None:
        event = instance.get_latest_materialization_event(key)
        materializations = [] if event is None else [event.asset_materialization]
    else:
        events = instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)
        materializations = [e.asset_materialization for e in events if e.asset_materialization.asset_key == key]
    paths = [m.metadata["path"].value for m in materializations if m is not None and "path" in m.metadata]
    return str(paths[-1]) if paths else None


def local_folder(location: Path | Any, key: dg.AssetKey, state: StateResource) -> Path:
    """A published folder as a local one: itself, or a copy of the remote folder in the state's cache. A folder
    without its marker (missing, or its run killed while uploading) is refused."""
    name = key.to_user_string()
    if not (location / MARKER).is_file():
        raise dg.Failure(
            f"{name}: the stored folder {location} is missing or incomplete (no {MARKER}; its run may have been "
            f"killed while publishing): materialize {name} again"
        )
    if isinstance(location, Path):
        return location
    cache = state.resolved_root() / "cache" / "assets" / name / location.name
    if not (cache / MARKER).is_file():
        with publish_folder(cache, point_latest=False) as tmp:
            _download(location, tmp)
    return cache


def as_location(root: str) -> Path | Any:
    """A local Path for a plain path, a UPath for a URI with a scheme (``file://`` included)."""
    if "://" not in root:
        return Path(root).expanduser().resolve()
    from upath import UPath  # universal-pathlib: a dependency of dagster (its UPathIOManager)

    return UPath(root)


def _built_folder(context: dg.OutputContext, obj: Any) -> Path:
    name = context.asset_key.to_user_string()
    if not dataclasses.is_dataclass(obj) or type(obj).__name__ not in VALUE_TYPES:
        raise TypeError(f"{name} returned {type(obj).__name__}; AssetFolderIOManager stores {sorted(VALUE_TYPES)}")
    built = Path(obj.path)
    if not built.is_dir():
        raise FileNotFoundError(f"{name}: its build folder {built} does not exist (use StateResource.build_folder)")
    return built


def _describe(obj: Any) -> dict[str, Any]:
    fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.name != "path"}
    return {"type": type(obj).__name__, "fields": fields}


def parquet_footer_metadata(folder: Path, table: str | None, *, already: Any = ()) -> dict[str, Any]:
    """``dagster/row_count`` and ``dagster/column_schema`` of the Parquet table `folder/table` (a file or a folder
    of part files), from the footers only; keys in `already` (the asset's own) are left out."""
    if not table or not (folder / table).exists():
        return {}
    import pyarrow.dataset as ds

    dataset = ds.dataset(str(folder / table), format="parquet", partitioning="hive")
    columns = [dg.TableColumn(field.name, str(field.type)) for field in dataset.schema]
    standard = {
        "dagster/row_count": dg.MetadataValue.int(dataset.count_rows()),
        "dagster/column_schema": dg.TableSchema(columns=columns),
    }
    return {k: v for k, v in standard.items() if k not in already}


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER)


def _upload(built: Path, location: Any) -> None:
    """Every file, then the marker: a reader (`load_input`) refuses the folder until the marker is there. A
    re-publication of the same run first removes the old marker, so a half-overwritten folder is refused too."""
    (location / MARKER).unlink(missing_ok=True)
    for path in _files(built):
        target = location.joinpath(*path.relative_to(built).parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.fs.put_file(str(path), target.path)
    (location / MARKER).write_bytes((built / MARKER).read_bytes())


def _download(location: Any, into: Path) -> None:
    prefix = location.path.rstrip("/") + "/"
    for remote in location.fs.find(location.path):
        relative = remote[len(prefix) :] if remote.startswith(prefix) else Path(remote).name
        target = into / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        location.fs.get_file(remote, str(target))


# ------------------------------------------------------------------------------------------------ peak memory
def reset_peak_rss() -> None:
    """Restarts this process's peak-RSS count (Linux's VmHWM), so the peak read at the end is the step's own
    (`StateResource.build_folder` calls it as a step starts). Elsewhere the count is the process's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_metadata(already: dict | None = None) -> dict[str, float]:
    """``peak_rss_mb``: this step's process since the step started (VmHWM; without /proc, since the process
    started). ``peak_child_rss_mb``: its largest finished child process (a training rank, torchrun), over the
    process's life: per step under the multiprocess executor, cumulative in one process."""
    own = _vm_hwm_mb()
    if own is None:
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    out = {"peak_rss_mb": round(own, 1), "peak_child_rss_mb": round(child, 1)}
    return {k: v for k, v in out.items() if k not in (already or {})}


def _vm_hwm_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None
