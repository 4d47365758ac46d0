"""What TorchDistributor runs in each process: the training function, with a consistent local rank setup."""
from __future__ import annotations

import os
import traceback
from pathlib import Path
from typing import Any, Callable


def run_with_consistent_local_ranks(single_machine_non_local: bool, error_dir: str | None,
                                    fn: Callable[..., Any], *args: Any) -> Any:
    """With ``local_mode=False`` each Spark task runs its own torchrun with one process, so every rank sees
    LOCAL_WORLD_SIZE=1 / LOCAL_RANK=0. When those tasks share one machine, Mosaic Streaming's shared memory
    collides unless the local values describe all processes on the machine: set them to the global ones."""
    if single_machine_non_local:
        os.environ["LOCAL_WORLD_SIZE"] = os.environ.get("WORLD_SIZE", "1")
        os.environ["LOCAL_RANK"] = os.environ.get("RANK", "0")
    if error_dir:  # lets the launcher name a rank that dies without a Python error (SIGKILL, OOM, os._exit)
        Path(error_dir, f"started{os.environ.get('RANK', '?')}").touch()
    try:
        return fn(*args)
    except BaseException as exc:
        # TorchDistributor's own error only says "view stdout logs": leave the cause where the launcher reads it.
        if error_dir:
            rank = os.environ.get("RANK", "?")
            tail = "".join(traceback.format_exception(exc)[-6:])
            Path(error_dir, f"rank{rank}.txt").write_text(f"rank {rank}: {type(exc).__name__}: {exc}\n{tail}")
        raise
