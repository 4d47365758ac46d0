"""Batches from MDS blocks (data/blocks.py) for the trainers: whole blocks become tensors with numpy / torch
operations, never a Python loop over rows. No Dagster / Spark here.

- Shuffle at two levels: the blocks of an epoch in Streaming's shuffle order (``py1e``, seeded by seed and
  epoch), and a seeded permutation of the rows inside each block (seed, epoch, block id).
- Ranks: rank r of W reads blocks r, r + W, r + 2W, ... of the epoch's order, so no two ranks share a row.
  Every rank plans the epoch from the block sizes in layout.json, without reading a block: each rank keeps its
  blocks' rows up to the shortest rank's total, and the longer ranks' tails are shared out equally. Every rank
  so reads the same number of rows (all of them but the total mod W) and steps with the same batch sizes,
  without any collective call.
- DataLoader workers decode and permute blocks ahead of the training step (`prefetch_blocks` per worker);
  pinned memory when CUDA is in use.
- Mid-epoch state: the epoch and the rows each rank has read. The same world size continues at exactly the
  next row; another one (2 <-> 1) with the same number of rows left in the epoch, each rank from the matching
  point of its own new plan (not the very rows that were left).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recsys_assets.data.blocks import (
    LAYOUT_FILE,
    ROWS,
    BlockColumn,
    BlockLayout,
    LayoutMismatchError,
    read_block_sizes,
    read_layout,
)

SHUFFLE_ALGO = "py1e"  # Streaming's default shuffle: blocks move within windows of shards (download locality)
SHUFFLE_WINDOW_BLOCKS = 1 << 12

Segment = tuple[int, int, int]  # (block id, first row, end row) of the block's permuted rows


def block_dataset(folders: Sequence[str | Path], remotes: Sequence[str] | None = None):
    """A StreamingDataset over MDS block folders (one Stream each; `folders` are local caches when `remotes`
    are given: each remote's layout file is fetched into its cache first). Only its random access is used:
    the loader orders and partitions the blocks itself."""
    from recsys_assets.data.streaming_import import import_streaming

    import_streaming()
    from streaming import Stream, StreamingDataset

    folders = [str(f) for f in folders]
    if not folders:
        raise ValueError("no MDS folders to read")
    if remotes is None:
        for f in folders:
            if not (Path(f) / "index.json").exists():
                raise FileNotFoundError(f"no MDS index.json in {f}")
        pairs = [(None, f) for f in folders]
    else:
        from streaming.base.storage.download import CloudDownloader

        from recsys_assets.data.mds import streaming_remote

        if len(remotes) != len(folders):
            raise ValueError(f"{len(remotes)} remotes for {len(folders)} local cache folders")
        pairs = [(streaming_remote(r), f) for r, f in zip(remotes, folders)]
        for r, f in pairs:
            if not (Path(f) / LAYOUT_FILE).exists():
                CloudDownloader.direct_download(f"{r.rstrip('/')}/{LAYOUT_FILE}", str(Path(f) / LAYOUT_FILE))
    streams = [Stream(remote=r, local=f) for r, f in pairs]
    return StreamingDataset(streams=streams, shuffle=False, batch_size=1)


def check_layouts(folders: Sequence[str | Path], needed: Sequence[BlockColumn]) -> BlockLayout:
    """The folders' layout (their LAYOUT_FILE), refused unless it has every `needed` column as needed."""
    layouts = [read_layout(f) for f in folders]
    for f, layout in zip(folders, layouts):
        layout.require(needed, where=f"MDS folder {f}")
    return max(layouts, key=lambda lay: lay.block_rows)


def check_shard_columns(dataset: Any, layout: BlockLayout, names: Sequence[str]) -> None:
    """Every shard's index entry encodes `names` (and the row count) as `layout` says: catches data in another
    layout before a block is decoded."""
    want = {k: v for k, v in layout.mds_columns().items() if k in (ROWS, *names)}
    for shard in dataset.shards:
        found = dict(zip(shard.column_names, shard.column_encodings))
        wrong = {k: (found.get(k), v) for k, v in want.items() if found.get(k) != v}
        if wrong:
            raise LayoutMismatchError(
                f"MDS shard {shard.dirname}/{shard.split or ''}: column encodings (found, needed) {wrong}; "
                f"the data is not in the block layout {layout.format!r}: re-materialize the MDS data"
            )


def dataset_block_sizes(folders: Sequence[str | Path], dataset: Any) -> np.ndarray:
    """Every block's rows in the dataset's sample order (the folders' layout files, in stream order)."""
    sizes = [read_block_sizes(f) for f in folders]
    per_stream = np.bincount(dataset.stream_per_shard, weights=dataset.samples_per_shard, minlength=len(folders))
    for f, s, n in zip(folders, sizes, per_stream.astype(int).tolist()):
        if len(s) != n:
            raise LayoutMismatchError(f"MDS folder {f}: {LAYOUT_FILE} lists {len(s)} blocks, index.json {n}")
    return np.concatenate(sizes) if sizes else np.zeros(0, np.int64)


# ------------------------------------------------------------------------------------------------- plan
def epoch_order(block_sizes: np.ndarray, shard_sizes: np.ndarray, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The epoch's block order: Streaming's shuffle of the blocks (by shard windows), or storage order."""
    n = int(len(block_sizes))
    if not shuffle or n == 0:
        return np.arange(n)
    from recsys_assets.data.streaming_import import import_streaming

    import_streaming()
    from streaming.base.shuffle import get_shuffle

    return get_shuffle(SHUFFLE_ALGO, shard_sizes, 1, seed, epoch, SHUFFLE_WINDOW_BLOCKS)


def _segments(blocks: np.ndarray, sizes: np.ndarray, start: int, stop: int) -> list[Segment]:
    """Rows [start, stop) of the sequence of `blocks` (each block's rows in its permuted order) as segments."""
    lengths = sizes[blocks]
    ends = np.cumsum(lengths)
    begins = ends - lengths
    out = []
    for b, lo, hi in zip(blocks.tolist(), begins.tolist(), ends.tolist()):
        if hi <= start or lo >= stop:
            continue
        out.append((b, max(start, lo) - lo, min(stop, hi) - lo))
    return out


def rank_plan(order: np.ndarray, sizes: np.ndarray, rank: int, world_size: int) -> list[Segment]:
    """Rank `rank`'s rows of the epoch: its own blocks up to the shortest rank's total, then its equal share
    of the longer ranks' tails (taken in rank order). Every rank's plan holds the same number of rows."""
    own = [order[q::world_size] for q in range(world_size)]
    totals = [int(sizes[b].sum()) for b in own]
    common = min(totals)
    tails = [seg for q in range(world_size) for seg in _segments(own[q], sizes, common, totals[q])]
    share = (sum(totals) - common * world_size) // world_size
    return _segments(own[rank], sizes, 0, common) + _slice(tails, rank * share, (rank + 1) * share)


def _slice(segments: list[Segment], start: int, stop: int) -> list[Segment]:
    """Rows [start, stop) of a sequence of segments."""
    out, pos = [], 0
    for b, lo, hi in segments:
        n = hi - lo
        a, z = max(start, pos), min(stop, pos + n)
        if a < z:
            out.append((b, lo + a - pos, lo + z - pos))
        pos += n
    return out


def _rows_in(segments: list[Segment]) -> int:
    return sum(hi - lo for _, lo, hi in segments)


# ---------------------------------------------------------------------------------------------- reading
class _Blocks(torch.utils.data.Dataset):
    """(epoch, block id, first row, end row) -> those rows of the block's seeded permutation, as tensors."""

    def __init__(self, dataset: Any, layout: BlockLayout, names: Sequence[str], seed: int, shuffle: bool) -> None:
        self.dataset, self.layout, self.names, self.seed, self.shuffle = dataset, layout, list(names), seed, shuffle

    def __len__(self) -> int:
        return int(np.sum(self.dataset.samples_per_shard))

    def __getitem__(self, key: tuple[int, int, int, int]) -> dict[str, torch.Tensor]:
        epoch, block, lo, hi = key
        columns = self.layout.decode(self.dataset[block], self.names)
        if self.shuffle:
            n = len(columns[self.names[0]])
            rows = np.random.default_rng([self.seed, epoch, block]).permutation(n)[lo:hi]
            columns = {k: v[rows] for k, v in columns.items()}
        elif (lo, hi) != (0, len(columns[self.names[0]])):
            columns = {k: v[lo:hi] for k, v in columns.items()}
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in columns.items()}


class _Keys(torch.utils.data.Sampler):
    """The keys of the epoch being read (set by the loader before each iteration)."""

    def __init__(self) -> None:
        self.keys: list[tuple[int, int, int, int]] = []

    def __iter__(self) -> Iterator[tuple[int, int, int, int]]:
        return iter(list(self.keys))

    def __len__(self) -> int:
        return len(self.keys)


def _identity(x: Any) -> Any:
    return x


class BlockBatchLoader:
    """Iterate for one epoch of `batch_size`-row batches (dict name -> tensor); every rank gets the same
    number of batches of the same sizes."""

    def __init__(
        self,
        dataset: Any,
        layout: BlockLayout,
        names: Sequence[str],
        batch_size: int,
        *,
        block_sizes: np.ndarray,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        prefetch_blocks: int = 4,
        pin_memory: bool = False,
        epoch_rows: int | None = None,
    ) -> None:
        self.layout, self.names, self.batch_size = layout, list(names), int(batch_size)
        self.seed, self.shuffle, self.rank, self.world_size = int(seed), bool(shuffle), int(rank), int(world_size)
        self.block_sizes = np.asarray(block_sizes, dtype=np.int64)
        self.shard_sizes = np.asarray(dataset.samples_per_shard, dtype=np.int64)
        if len(self.block_sizes) != int(self.shard_sizes.sum()):
            raise LayoutMismatchError(
                f"{len(self.block_sizes)} block sizes for {int(self.shard_sizes.sum())} MDS samples (blocks)"
            )
        if len(self.block_sizes) < self.world_size:
            raise ValueError(
                f"the MDS data has {len(self.block_sizes)} block(s) for {self.world_size} ranks: every rank needs "
                f"one; write smaller blocks (block_rows) or train with fewer processes"
            )
        # rows per rank per epoch (epoch_rows counts all ranks), None = every row
        self.rank_rows = None if epoch_rows is None else int(epoch_rows) // self.world_size
        self.keys = _Keys()
        self.blocks = torch.utils.data.DataLoader(
            _Blocks(dataset, layout, self.names, self.seed, self.shuffle),
            sampler=self.keys,
            batch_size=None,
            collate_fn=_identity,
            num_workers=num_workers,
            prefetch_factor=prefetch_blocks if num_workers else None,
            persistent_workers=num_workers > 0,
            pin_memory=pin_memory,
        )
        self.epoch, self.rows_done, self._iterating = 0, 0, False

    @property
    def num_blocks(self) -> int:
        return len(self.block_sizes)

    def plan(self, epoch: int) -> list[Segment]:
        """This rank's rows of `epoch` (see `rank_plan`), cut at `epoch_rows`."""
        order = epoch_order(self.block_sizes, self.shard_sizes, self.seed, epoch, self.shuffle)
        segments = rank_plan(np.asarray(order), self.block_sizes, self.rank, self.world_size)
        return segments if self.rank_rows is None else _slice(segments, 0, self.rank_rows)

    def __len__(self) -> int:
        """Batches in the current epoch (from its start)."""
        return -(-_rows_in(self.plan(self.epoch)) // self.batch_size)

    # -------------------------------------------------------------------------------------------- iterate
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        segments = _slice(self.plan(self.epoch), self.rows_done, 1 << 62)  # a resumed epoch: the rows left
        self.keys.keys = [(self.epoch, b, lo, hi) for b, lo, hi in segments]
        self._iterating = True
        pending: list[dict[str, torch.Tensor]] = []
        held = 0
        for piece in self.blocks:
            pending.append(piece)
            held += _rows(piece)
            while held >= self.batch_size:
                batch, pending, held = _cut(pending, self.batch_size)
                yield self._count(batch)
        if held:
            yield self._count(_cut(pending, held)[0])
        self.epoch, self.rows_done, self._iterating = self.epoch + 1, 0, False

    def _count(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.rows_done += _rows(batch)
        return batch

    # ---------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Where the next iteration starts (an exhausted epoch's state is the next epoch's start)."""
        return {
            "epoch": self.epoch,
            "rows_done": self.rows_done,
            "world_size": self.world_size,
            "seed": self.seed,
            "blocks": self.num_blocks,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from `state` at the next iteration. A state saved by another world size continues with the
        same rows left in the epoch (each rank at the matching point of its own plan)."""
        blocks, seed = int(state.get("blocks", self.num_blocks)), int(state.get("seed", self.seed))
        if blocks != self.num_blocks or seed != self.seed:
            raise ValueError(
                f"loader state of {blocks} blocks / seed {seed} does not match this loader "
                f"({self.num_blocks} blocks, seed {self.seed})"
            )
        saved_world = int(state.get("world_size", self.world_size))
        self.epoch = int(state["epoch"])
        self.rows_done = int(state["rows_done"]) * saved_world // self.world_size


def _cut(pieces: list[dict[str, torch.Tensor]], n: int) -> tuple[dict[str, torch.Tensor], list, int]:
    """The first `n` rows of `pieces` as one batch, and the pieces left with their row count."""
    taken, rest, need = [], [], n
    for p in pieces:
        k = _rows(p)
        if need >= k:
            taken.append(p)
            need -= k
        elif need > 0:
            taken.append({name: v[:need] for name, v in p.items()})
            rest.append({name: v[need:] for name, v in p.items()})
            need = 0
        else:
            rest.append(p)
    batch = taken[0] if len(taken) == 1 else {name: torch.cat([p[name] for p in taken]) for name in taken[0]}
    return batch, rest, sum(_rows(p) for p in rest)


def _rows(batch: Mapping[str, torch.Tensor]) -> int:
    for v in batch.values():
        return int(v.shape[0])
    return 0


def open_loader(
    folders: Sequence[str | Path],
    needed: Sequence[BlockColumn],
    batch_size: int,
    *,
    seed: int,
    remotes: Sequence[str] | None = None,
    **loader_options: Any,
) -> BlockBatchLoader:
    """A BlockBatchLoader over MDS block folders (one Stream each), refused unless their layout has the
    `needed` columns (which it reads). `loader_options`: BlockBatchLoader's keywords (rank, world_size, ...)."""
    dataset = block_dataset(folders, remotes)
    layout = check_layouts(folders, needed)
    names = [c.name for c in needed]
    check_shard_columns(dataset, layout, names)
    sizes = dataset_block_sizes(folders, dataset)
    return BlockBatchLoader(dataset, layout, names, batch_size, block_sizes=sizes, seed=seed, **loader_options)


def read_blocks(
    folders: Sequence[str | Path], layout: BlockLayout | None = None, remotes: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """Every row of MDS block folders in storage order, column by column (tests and tools, not training)."""
    dataset = block_dataset(folders, remotes)
    layout = layout or read_layout(folders[0])
    parts = [layout.decode(dataset[k]) for k in range(dataset.num_samples)]
    return {n: np.concatenate([p[n] for p in parts]) for n in layout.names} if parts else {}
