"""How large a dense items × items matrix this machine can hold: the caps of EASE (the baseline and the funnel's
item-item source) follow from the memory available when a step starts, not from a fixed catalogue size."""

from __future__ import annotations

import math
import os
from pathlib import Path

# Of the memory available when the step starts, the share one dense items × items matrix may take. The rest is
# for the process itself (torch, pandas frames, scoring blocks) and whatever runs beside it.
DENSE_MATRIX_SHARE = 0.4
FLOAT32_BYTES = 4


def available_memory_bytes() -> int:
    """Memory this process can still take: the kernel's MemAvailable, bounded by the cgroup's limit (a container)."""
    available = _meminfo_kib("MemAvailable") * 1024
    if not available:  # no /proc (macOS): half the physical memory
        available = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and used is not None:
        available = min(available, max(limit - used, 0))
    return available


def dense_item_limit(share: float = DENSE_MATRIX_SHARE, dtype_bytes: int = FLOAT32_BYTES) -> int:
    """The largest catalogue whose items × items matrix fits in `share` of the available memory."""
    return int(math.isqrt(int(share * available_memory_bytes() / dtype_bytes)))


def dense_item_refusal(num_items: int, max_items: int | None, what: str) -> str | None:
    """Why `what` (a dense items × items model) cannot run on `num_items` items, or None when it can.
    `max_items`: a fixed cap; None: `dense_item_limit()` of this machine now."""
    limit = dense_item_limit() if max_items is None else max_items
    if num_items <= limit:
        return None
    need = num_items * num_items * FLOAT32_BYTES / 2**30
    source = (
        f"{DENSE_MATRIX_SHARE:.0%} of the {available_memory_bytes() / 2**30:.1f} GiB available holds {limit} items"
        if max_items is None
        else f"max_items={max_items}"
    )
    return f"{what} set aside: {num_items} items need a {need:.1f} GiB float32 items × items matrix ({source})"


def _meminfo_kib(field: str) -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit
