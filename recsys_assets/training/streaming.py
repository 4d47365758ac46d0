"""Mosaic Streaming for the trainers: `block_loader` (a BlockBatchLoader over MDS block folders, local or
cached from remotes, split over the ranks), `default_mds_cache_dir` (the local cache folder of a remote MDS
root) and `prepare_streaming` (collective: clears stale Streaming shared memory; call on every rank before a
loader). No Dagster / Spark here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from recsys_assets.training.distributed import DistEnv


def block_loader(
    folders: Sequence[str | Path],
    needed: Sequence[Any],
    batch_size: int,
    env: DistEnv,
    *,
    seed: int,
    shuffle: bool = True,
    num_workers: int = 0,
    epoch_size: int | None = None,
    remotes: Sequence[str] | None = None,
):
    """A BlockBatchLoader (training/block_loader.py) over MDS block folders (one Stream each): `needed` columns
    (data.blocks.BlockColumn) are checked against the folders' layout first. Each iteration is one epoch.

    remotes: one remote MDS folder per entry of `folders` (s3://, gs://, dbfs:/, file://); `folders` are then
        the local cache folders Streaming downloads shards into (one per node, never shared by two open
        datasets).
    epoch_size: rows per epoch over all ranks (None: every row).

    Call `prepare_streaming()` on every rank before this (it has a barrier).
    """
    from recsys_assets.training.block_loader import open_loader

    return open_loader(
        folders,
        needed,
        batch_size,
        seed=seed,
        remotes=remotes,
        shuffle=shuffle,
        rank=env.rank,
        world_size=env.world_size,
        num_workers=num_workers,
        pin_memory=env.device.type == "cuda",
        epoch_rows=epoch_size,
    )


def default_mds_cache_dir(remote: str) -> Path:
    """A local cache folder for a remote MDS root: one per remote (and user) in the system temp folder, so
    the ranks of one node share it and two remotes never mix shards."""
    import getpass
    import hashlib
    import tempfile

    digest = hashlib.sha1(remote.rstrip("/").encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"recsys-mds-cache-{getpass.getuser()}" / digest


def prepare_streaming() -> None:
    """Collective (barrier inside): remove Streaming shared memory left by dead processes."""
    from recsys_assets.data.streaming_import import import_streaming

    import_streaming()
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
