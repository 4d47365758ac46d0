"""What TorchDistributor runs in each process: the training function, with a consistent local rank setup."""
from __future__ import annotations

import os
from typing import Any, Callable


def run_with_consistent_local_ranks(single_machine_non_local: bool, fn: Callable[..., Any], *args: Any) -> Any:
    """With ``local_mode=False`` each Spark task runs its own torchrun with one process, so every rank sees
    LOCAL_WORLD_SIZE=1 / LOCAL_RANK=0. When those tasks share one machine, Mosaic Streaming's shared memory
    collides unless the local values describe all processes on the machine: set them to the global ones."""
    if single_machine_non_local:
        os.environ["LOCAL_WORLD_SIZE"] = os.environ.get("WORLD_SIZE", "1")
        os.environ["LOCAL_RANK"] = os.environ.get("RANK", "0")
    return fn(*args)
