"""Hard-link (else copy) every __pycache__/*.pyc under SRC into the same place under DST; print how many were
left out as stale.

Usage: python scripts/link_bytecode.py SRC DST [--match-sources]

With --match-sources (seed -> a new environment), a timestamp-based .pyc is linked only where DST holds its
source with the mtime and size that its header records. A seed compiled against another copy of the sources (uv's
cache rebuilt or moved) would otherwise be linked in, found stale on every import and, where
PYTHONDONTWRITEBYTECODE is set, recompiled in memory by every process.
"""

from __future__ import annotations

import os
import shutil
import struct
import sys


def matches_source(pyc: str, source: str) -> bool:
    """Whether the .pyc's header records `source`'s (an existing file's) mtime and size (hash-based .pyc files
    are kept)."""
    stat = os.stat(source)
    with open(pyc, "rb") as f:
        header = f.read(16)
    if len(header) < 16:
        return False
    flags, mtime, size = struct.unpack("<III", header[4:16])
    if flags != 0:  # hash-based: checked (or not) by the interpreter itself
        return True
    return mtime == int(stat.st_mtime) & 0xFFFFFFFF and size == stat.st_size & 0xFFFFFFFF


def link_bytecode(src: str, dst: str, match_sources: bool) -> int:
    stale = 0
    for folder, _, files in os.walk(src):
        if os.path.basename(folder) != "__pycache__":
            continue
        target = os.path.join(dst, os.path.relpath(folder, src))
        for name in files:
            out = os.path.join(target, name)
            if not name.endswith(".pyc") or os.path.exists(out):
                continue
            source = os.path.join(os.path.dirname(target), name.split(".")[0] + ".py")
            if match_sources:
                if not os.path.exists(source):
                    continue  # a module this environment lacks: nothing to link, nothing stale
                if not matches_source(os.path.join(folder, name), source):
                    stale += 1
                    continue
            os.makedirs(target, exist_ok=True)
            try:
                os.link(os.path.join(folder, name), out)
            except OSError:
                shutil.copy2(os.path.join(folder, name), out)
    return stale


if __name__ == "__main__":
    print(link_bytecode(sys.argv[1], sys.argv[2], "--match-sources" in sys.argv[3:]))
