"""The interaction source as an observable asset (`interaction_source`, upstream of raw_interactions): its
`DataVersion` is the size/mtime fingerprint of the configured source files, so lineage shows the file and the
new_source_data sensor (automation.py) retrains when the version changes. Also the run config file that names
the source ($RECSYS_RUN_CONFIG, default demo.yaml): read, validated and rewritten here."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import dagster as dg
import yaml

from recsys_assets.defs.constants import DATA_GROUP
from recsys_assets.defs.data_assets import RawInteractionsConfig

RUN_CONFIG_ENV = "RECSYS_RUN_CONFIG"
DEFAULT_RUN_CONFIG_FILE = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
SOURCE_ASSET = "interaction_source"
DATA_VERSION_TAG = "dagster/data_version"  # where Dagster keeps an observation's data version


def run_config_path(path: str | os.PathLike | None = None) -> Path:
    """The run config file of scheduled / sensor runs: `path`, else $RECSYS_RUN_CONFIG, else demo.yaml."""
    chosen = path if path is not None else (os.environ.get(RUN_CONFIG_ENV) or DEFAULT_RUN_CONFIG_FILE)
    return Path(chosen).expanduser()


def load_run_config(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Reads a run config file (YAML or JSON, the `dagster asset materialize -c` format). Fails loudly (at
    definitions load) if the file is missing or not a mapping, and if its raw_interactions config has keys
    RawInteractionsConfig does not know."""
    file = run_config_path(path)
    if not file.is_file():
        raise dg.DagsterInvalidDefinitionError(
            f"run config file {file} not found (set ${RUN_CONFIG_ENV} to a YAML/JSON run config file)"
        )
    loaded = yaml.safe_load(file.read_text()) or {}
    if not isinstance(loaded, dict):
        raise dg.DagsterInvalidDefinitionError(
            f"run config file {file} must hold a mapping, not {type(loaded).__name__}"
        )
    source_config_from_run_config(loaded, origin=str(file))  # validate the source part now
    return loaded


def _unknown_keys(model: type[dg.Config], values: Mapping[str, Any], where: str) -> list[str]:
    """Keys of `values` that `model` (and its nested Config fields) does not declare. dg.Config does not forbid
    extra keys when constructed in Python, so a typo would otherwise only surface when a run is launched."""
    unknown = []
    for key, value in values.items():
        field = model.model_fields.get(key)
        if field is None:
            unknown.append(f"{where}.{key}")
            continue
        sub = field.annotation
        for candidate in getattr(sub, "__args__", (sub,)):  # Optional[X] -> X
            if isinstance(candidate, type) and issubclass(candidate, dg.Config) and isinstance(value, Mapping):
                unknown += _unknown_keys(candidate, value, f"{where}.{key}")
    return unknown


def source_config_from_run_config(run_config: Mapping[str, Any], origin: str = "run config") -> RawInteractionsConfig:
    """The raw_interactions config in a run config (`ops.raw_interactions.config`); defaults if absent."""
    values = ((run_config.get("ops") or {}).get("raw_interactions") or {}).get("config") or {}
    unknown = _unknown_keys(RawInteractionsConfig, values, "ops.raw_interactions.config")
    if unknown:
        raise dg.DagsterInvalidDefinitionError(f"{origin}: unknown raw_interactions config keys {unknown}")
    return RawInteractionsConfig(**values)


def with_source_config(run_config: Mapping[str, Any] | None, source_config: RawInteractionsConfig) -> dict[str, Any]:
    """`run_config` (other ops' config kept) with raw_interactions' config replaced by `source_config`."""
    result = json.loads(json.dumps(dict(run_config or {})))  # deep copy of plain data
    raw = dg.RunConfig(ops={"raw_interactions": source_config}).to_config_dict()["ops"]["raw_interactions"]
    result.setdefault("ops", {})
    result["ops"] = dict(result["ops"] or {})
    result["ops"]["raw_interactions"] = raw
    return result


# ------------------------------------------------------------------------------------------------ observation
def watched_path(source_config: RawInteractionsConfig) -> str | None:
    """The local file or folder behind a source, or None when there is nothing to watch (synthetic)."""
    if source_config.source == "movielens":
        return source_config.movielens_path
    if source_config.source == "table":
        return source_config.table.path if source_config.table is not None else None
    return None


def _local_path(path: str) -> Path | None:
    """A local Path for `path` (plain or file://), None for other URI schemes (s3://, hdfs://, ...)."""
    parsed = urlparse(path)
    if parsed.scheme == "file":
        return Path(parsed.path)
    if parsed.scheme and len(parsed.scheme) > 1:  # "C:" drive letters are not schemes
        return None
    return Path(path).expanduser()


def _is_hidden(relative: Path) -> bool:
    # Spark/Hadoop's own convention: names starting with "_" or "." are not data (_SUCCESS, .crc, _temporary/
    # of a write in progress, rsync's .name.XXXX temporaries); readers skip them and so does the fingerprint.
    return any(part.startswith((".", "_")) for part in relative.parts)


def source_fingerprint(path: str | os.PathLike) -> tuple[str, int]:
    """(sha256 hex of the sorted (relative name, size, mtime_ns) of every data file under `path`, file count).

    `path` may be a file (its own name is the relative name) or a folder (walked recursively). Cheap: stat calls
    only, no file is read."""
    root = Path(path)
    if root.is_file():
        st = root.stat()
        entries = [(root.name, st.st_size, st.st_mtime_ns)]
    else:
        entries = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith((".", "_"))]
            for name in filenames:
                file = Path(dirpath) / name
                relative = file.relative_to(root)
                if _is_hidden(relative):
                    continue
                st = file.stat()
                entries.append((relative.as_posix(), st.st_size, st.st_mtime_ns))
        entries.sort()
    digest = hashlib.sha256(json.dumps(entries, separators=(",", ":")).encode()).hexdigest()
    return digest, len(entries)


def _version_of(*parts: Any) -> str:
    # The source kind and path are part of the version: pointing at another source counts as new data.
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:32]


@dataclasses.dataclass(frozen=True)
class SourceObservation:
    """What an observation of the source found: its data version (None: nothing to fingerprint, `note` says
    why), the number of data files and the watched path."""

    data_version: str | None
    files: int
    path: str | None
    note: str

    @property
    def watchable(self) -> bool:
        """Files that can change: a local path that exists (a generated source never changes)."""
        return self.data_version is not None and self.path is not None


def observe_source(source_config: RawInteractionsConfig) -> SourceObservation:
    """The source's data version: a hash of (kind, path, the size/mtime fingerprint of its files); a synthetic
    source's is a hash of its settings."""
    if source_config.source == "synthetic":
        spec = source_config.synthetic.model_dump()
        return SourceObservation(_version_of("synthetic", spec), 0, None, "source 'synthetic' is generated, not read")
    path = watched_path(source_config)
    if not path:
        return SourceObservation(None, 0, None, f"source '{source_config.source}' has no path configured")
    local = _local_path(path)
    if local is None:
        return SourceObservation(None, 0, path, f"{path}: only local paths (or file:// URIs) are fingerprinted")
    if not local.exists():
        return SourceObservation(None, 0, path, f"{path} does not exist (yet)")
    digest, n_files = source_fingerprint(local)
    return SourceObservation(_version_of(source_config.source, path, digest), n_files, path, f"{n_files} file(s)")


@dg.observable_source_asset(
    name=SOURCE_ASSET,
    group_name=DATA_GROUP,
    tags={"stage": "source", "dagster/kind/file": ""},  # a source asset takes its kinds as tags
    description="The files raw_interactions reads, as configured in the run config file ($RECSYS_RUN_CONFIG, "
    "default demo.yaml). Its data version is their size/mtime fingerprint; the new_source_data sensor records "
    "each new version as an observation and retrains on it.",
)
def interaction_source(context) -> dg.ObserveResult:
    observation = observe_source(source_config_from_run_config(load_run_config()))
    context.log.info(f"{SOURCE_ASSET}: {observation.note}")
    return dg.ObserveResult(
        data_version=dg.DataVersion(observation.data_version or f"unobserved: {observation.note}"),
        metadata=observation_metadata(observation),
    )


def observation_metadata(observation: SourceObservation) -> dict[str, Any]:
    return {"path": observation.path or "", "files": observation.files, "note": observation.note}


def observation_event(observation: SourceObservation) -> dg.AssetObservation:
    """The observation as an event a sensor reports (what observing the source asset records)."""
    return dg.AssetObservation(
        asset_key=SOURCE_ASSET,
        tags={DATA_VERSION_TAG: observation.data_version or ""},
        metadata=observation_metadata(observation),
    )
