"""Two small assets stored by the project's I/O manager, for test_storage.py (importable by its subprocesses):
`thing` writes a text file and a Parquet table into its build folder; `reader` receives thing's value."""

from pathlib import Path

import dagster as dg
import pandas as pd

from recsys_assets.defs.resources import StateResource
from recsys_assets.defs.storage import AssetFolderIOManager
from recsys_assets.defs.types import CandidateSet, PublishedFolder


class ThingConfig(dg.Config):
    text: str = "one"
    rows: int = 3
    allocate_mb: int = 0  # memory touched inside the step, for the peak-memory metadata


@dg.asset
def thing(context: dg.AssetExecutionContext, config: ThingConfig, state: StateResource) -> dg.Output[CandidateSet]:
    with state.build_folder(context) as build:
        (build / "data.txt").write_text(config.text)
        if config.allocate_mb:
            block = bytearray(config.allocate_mb << 20)  # zero-filled: every page is resident
            del block
        (build / "part").mkdir()
        (build / "part" / "x.bin").write_bytes(config.text.encode())
        pd.DataFrame({"user": range(config.rows), "score": [0.5] * config.rows}).to_parquet(build / "table.parquet")
    return dg.Output(CandidateSet(str(build), two_tower_run_id=f"mlflow-{config.text}", table="table.parquet"))


@dg.asset
def reader(context: dg.AssetExecutionContext, thing: CandidateSet, state: StateResource) -> PublishedFolder:
    context.log.info(f"thing at {thing.path}")
    with state.build_folder(context) as build:
        text = (Path(thing.path) / "data.txt").read_text()
        (build / "seen.txt").write_text(f"{thing.path}\n{thing.two_tower_run_id}\n{thing.table}\n{text}")
    return PublishedFolder(str(build), table="missing.parquet")


def resources(state_root: str | Path, io_root: str | None = None) -> dict:
    state = StateResource(root=str(state_root))
    return {"state": state, "io_manager": AssetFolderIOManager(state=state, root=io_root)}


def materialize(
    assets, state_root, instance, text: str = "one", io_root: str | None = None, allocate_mb: int = 0, **kwargs
):
    runs_thing = thing in assets and "thing" in kwargs.get("selection", ["thing"])
    run_config = {"ops": {"thing": {"config": {"text": text, "allocate_mb": allocate_mb}}}} if runs_thing else {}
    return dg.materialize(
        assets, resources=resources(state_root, io_root), instance=instance, run_config=run_config, **kwargs
    )
