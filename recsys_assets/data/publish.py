"""Atomic publication of asset outputs.

An asset writes into a hidden temporary folder next to its destination and publishes it with one
``os.rename`` (atomic on a POSIX filesystem), so a reader never sees a half-written MDS split, index or
table: either the previous version or the complete new one. Each materialization gets its own version folder
(downstream assets take that exact folder as their input); ``latest`` is a symlink swapped with
``os.replace`` for humans and tools outside Dagster.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def publish_folder(destination: str | Path, *, keep_versions: int = 3, point_latest: bool = True) -> Iterator[Path]:
    """Yields a temporary folder; on success renames it to `destination` and points ``latest`` at it.

    On any exception the temporary folder is removed and `destination` (if it existed) is untouched.
    For a plain output folder (not a version folder among siblings, e.g. a CLI's ``--out``) pass
    ``keep_versions=0, point_latest=False``: no ``latest`` link and no pruning of the parent folder."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = _hidden_sibling(destination, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        _swap_in(tmp, destination)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _after_publish(destination, keep_versions, point_latest)


def publish_built_folder(
    built: str | Path, destination: str | Path, *, keep_versions: int = 3, point_latest: bool = True
) -> None:
    """Publishes a folder written elsewhere (an asset's build folder) at `destination`, as `publish_folder` does:
    one rename on the same filesystem; from another one, a copy into a hidden sibling first, then the rename.
    A process killed before the rename leaves `destination` (and ``latest``) as they were."""
    built, destination = Path(built), Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    if os.stat(built).st_dev == os.stat(destination.parent).st_dev:
        _swap_in(built, destination)
    else:  # copy next to the destination, so that publishing stays one rename
        tmp = _hidden_sibling(destination, "tmp")
        try:
            shutil.copytree(built, tmp)
            _swap_in(tmp, destination)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(built, ignore_errors=True)
    _after_publish(destination, keep_versions, point_latest)


def _hidden_sibling(destination: Path, kind: str) -> Path:
    return destination.parent / f".{destination.name}.{kind}-{uuid.uuid4().hex[:8]}"


def _swap_in(tmp: Path, destination: Path) -> None:
    if destination.exists():
        # Re-materializing the same version: move the old one aside first, then swap.
        old = _hidden_sibling(destination, "old")
        os.rename(destination, old)
        os.rename(tmp, destination)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, destination)


def _after_publish(destination: Path, keep_versions: int, point_latest: bool) -> None:
    if point_latest:
        _point_latest(destination)
    _prune(destination.parent, keep_versions)


def _point_latest(destination: Path) -> None:
    link = destination.parent / "latest"
    tmp_link = destination.parent / f".latest.{uuid.uuid4().hex[:8]}"
    os.symlink(destination.name, tmp_link)
    os.replace(tmp_link, link)


def _prune(folder: Path, keep: int) -> None:
    """Keeps the newest `keep` published versions (never the one ``latest`` points at)."""
    if keep <= 0:
        return
    latest = (folder / "latest").resolve()
    versions = sorted(
        (p for p in folder.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for old in versions[keep:]:
        if old.resolve() != latest:
            shutil.rmtree(old, ignore_errors=True)


def hardlink_tree(src: str | Path, dst: str | Path) -> None:
    """Copies a published (immutable) folder by hard links: instant and no extra space."""
    shutil.copytree(src, dst, copy_function=_link_or_copy)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem
        shutil.copy2(src, dst)
