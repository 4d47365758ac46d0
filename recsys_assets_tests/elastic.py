"""Real multi-process training for tests: torch's elastic launcher (spawned processes, a file rendezvous)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def elastic_run(entrypoint: Callable[[Any], Any], config: Any, nproc: int, tmp: Path) -> dict[int, Any]:
    """`entrypoint(config)` in `nproc` spawned processes; {rank: its return value}."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    lc = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint=str(tmp / f"rdzv-{uuid.uuid4().hex[:8]}"),
        rdzv_configs={"store_type": "file"},
        start_method="spawn",
        monitor_interval=1,
        max_restarts=0,
    )
    return elastic_launch(config=lc, entrypoint=entrypoint)(config)
