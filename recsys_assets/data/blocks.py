"""The block layout of every MDS folder: one MDS sample holds a block of up to `block_rows` rows, column by column.

A reader then turns a whole block into tensors with a few numpy calls instead of decoding and collating one
sample per row (the row layout read ~5k rows/s; see benchmarks/data_loader.py).

Per sample: ``rows`` (int32, the rows in this block) and one ``ndarray:<dtype>`` per column holding the block's
values flattened row-major: `width` values per row for a matrix column (history, dense features), one per row
for a scalar column (width 0). The layout is written next to index.json (LAYOUT_FILE) and into the dataset's
meta.json; readers refuse a folder whose layout or columns differ from what they need (LayoutMismatchError).

No Spark here: data/mds.py writes blocks from Spark partitions, tests write them with `write_blocks`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

BLOCK_FORMAT = "mds-blocks-v1"
ROWS = "rows"
LAYOUT_FILE = "layout.json"
DEFAULT_BLOCK_ROWS = 4096
# A folder gets at least this many blocks where it has the rows (smaller blocks for small data): every rank
# of a launch needs blocks of its own, and more blocks shuffle better.
MIN_BLOCKS = 64


def block_rows_for(rows: int, block_rows: int = DEFAULT_BLOCK_ROWS, min_blocks: int = MIN_BLOCKS) -> int:
    """`block_rows`, or fewer so that `rows` fill at least `min_blocks` blocks (never below 1)."""
    return max(1, min(int(block_rows), math.ceil(int(rows) / min_blocks)))


class LayoutMismatchError(ValueError):
    """An MDS folder whose block layout is not the one a reader needs (older row layout, other columns,
    dtypes or widths)."""


@dataclasses.dataclass(frozen=True)
class BlockColumn:
    name: str
    dtype: str  # numpy dtype name: int32, int64, float32
    width: int | None = 0  # 0: one value per row; w > 0: w values per row (a [rows, w] matrix); None: any w > 0

    def accepts(self, found: BlockColumn) -> bool:
        """`found` (a written column) is this needed column: same name and dtype, and width (None: any matrix)."""
        same_width = found.width > 0 if self.width is None else found.width == self.width
        return found.name == self.name and found.dtype == self.dtype and bool(same_width)

    def describe(self) -> str:
        shape = "[*]" if self.width is None else (f"[{self.width}]" if self.width else "")
        return f"{self.name}: {self.dtype}{shape}"


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    columns: tuple[BlockColumn, ...]
    block_rows: int = DEFAULT_BLOCK_ROWS
    format: str = BLOCK_FORMAT

    def __post_init__(self) -> None:
        if self.block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, got {self.block_rows}")
        names = [c.name for c in self.columns]
        if ROWS in names or len(set(names)) != len(names):
            raise ValueError(f"block columns must be unique and not named {ROWS!r}: {names}")

    @classmethod
    def of(cls, spec: Mapping[str, tuple[str, int]], block_rows: int = DEFAULT_BLOCK_ROWS) -> BlockLayout:
        """From {name: (dtype, width)}."""
        return cls(tuple(BlockColumn(n, d, int(w)) for n, (d, w) in spec.items()), int(block_rows))

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def column(self, name: str) -> BlockColumn:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)

    def mds_columns(self) -> dict[str, str]:
        """The MDS column encodings of one block sample."""
        return {ROWS: "int32", **{c.name: f"ndarray:{c.dtype}" for c in self.columns}}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "block_rows": self.block_rows,
            "columns": [dataclasses.asdict(c) for c in self.columns],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BlockLayout:
        return cls(tuple(BlockColumn(**c) for c in d["columns"]), int(d["block_rows"]), d.get("format", ""))

    # ------------------------------------------------------------------------------------------ encode
    def arrays(self, table: Any) -> dict[str, np.ndarray]:
        """The layout's columns of `table` (a mapping or a pandas DataFrame) as typed [n] / [n, width] arrays."""
        return {c.name: self._as_column(c, table) for c in self.columns}

    def encode(self, arrays: Mapping[str, np.ndarray]) -> Iterator[dict[str, Any]]:
        """Block samples of the rows in `arrays` (name -> [n] or [n, width] array): full blocks, then the rest."""
        cols = self.arrays(arrays)
        n = len(next(iter(cols.values()))) if cols else 0
        for lo in range(0, n, self.block_rows):
            hi = min(n, lo + self.block_rows)
            yield {ROWS: hi - lo, **{k: np.ascontiguousarray(v[lo:hi]).reshape(-1) for k, v in cols.items()}}

    @staticmethod
    def _as_column(c: BlockColumn, table: Any) -> np.ndarray:
        if c.name not in table:
            raise KeyError(f"no column {c.name!r} to write (have {sorted(table)})")
        column = table[c.name]
        a = np.asarray(column.to_numpy() if hasattr(column, "to_numpy") else column)
        if a.dtype == object:  # a column of per-row arrays (pandas from Arrow lists)
            a = np.stack(a) if len(a) else np.zeros((0, c.width), dtype=c.dtype)
        want = (c.width,) if c.width else ()
        if a.shape[1:] != want:
            raise ValueError(f"column {c.describe()}: rows have shape {a.shape[1:]}, expected {want}")
        return a.astype(c.dtype, copy=False)

    # ------------------------------------------------------------------------------------------ decode
    def decode(self, sample: Mapping[str, Any], names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """One block sample -> {name: [rows] or [rows, width] array} for `names` (default all columns)."""
        rows = int(sample[ROWS])
        out = {}
        for name in names if names is not None else self.names:
            c = self.column(name)
            flat = sample[name]
            per_row = c.width or 1
            if flat.size != rows * per_row:
                raise LayoutMismatchError(
                    f"block column {c.describe()} holds {flat.size} values for {rows} rows (expected {rows * per_row})"
                )
            out[name] = flat.reshape(rows, c.width) if c.width else flat
        return out

    # ------------------------------------------------------------------------------------------- check
    def require(self, needed: Sequence[BlockColumn], where: str) -> None:
        """Refuse (LayoutMismatchError naming `where`) unless every `needed` column is here, same dtype/width."""
        if self.format != BLOCK_FORMAT:
            raise LayoutMismatchError(f"{where}: block format {self.format!r}, this reader reads {BLOCK_FORMAT!r}")
        have = {c.name: c for c in self.columns}
        bad = [
            f"{n.describe()} (found {have[n.name].describe() if n.name in have else 'nothing'})"
            for n in needed
            if n.name not in have or not n.accepts(have[n.name])
        ]
        if bad:
            raise LayoutMismatchError(
                f"{where}: the MDS block layout lacks or differs in column(s) {bad}; re-materialize the MDS data"
            )


def write_layout(folder: str | Path, layout: BlockLayout, *, block_sizes: Sequence[int]) -> None:
    """LAYOUT_FILE: the layout, the folder's rows and each block's rows in index order (index.json counts only
    blocks; readers plan equal shares of rows per rank from the sizes without reading a block)."""
    sizes = [int(n) for n in block_sizes]
    record = {**layout.to_dict(), "rows": sum(sizes), "block_sizes": sizes}
    (Path(folder) / LAYOUT_FILE).write_text(json.dumps(record))


def partition_block_sizes(rows: int, block_rows: int) -> list[int]:
    """The blocks a writer task cuts from `rows` rows: full ones, then the rest."""
    return [block_rows] * (rows // block_rows) + ([rows % block_rows] if rows % block_rows else [])


def read_block_sizes(folder: str | Path) -> np.ndarray:
    read_layout(folder)  # refuses a folder without a (readable) layout
    return np.asarray(json.loads((Path(folder) / LAYOUT_FILE).read_text())["block_sizes"], dtype=np.int64)


def read_rows(folder: str | Path) -> int:
    return int(read_block_sizes(folder).sum())


def read_layout(folder: str | Path) -> BlockLayout:
    """The layout recorded in an MDS folder. A folder without one was written in the row layout (one MDS sample
    per row) by an older version: refused with what to do."""
    path = Path(folder) / LAYOUT_FILE
    if not path.is_file():
        raise LayoutMismatchError(
            f"MDS folder {folder} has no {LAYOUT_FILE}: it was written in the row layout (one sample per row), "
            f"this reader needs the block layout {BLOCK_FORMAT!r}; re-materialize the MDS data"
        )
    try:
        return BlockLayout.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise LayoutMismatchError(f"{path}: unreadable block layout ({exc})") from exc


def write_blocks(
    out: str | Path,
    arrays: Mapping[str, np.ndarray],
    layout: BlockLayout,
    *,
    compression: str | None = "zstd",
    size_limit: int | str = "64mb",
    hashes: Sequence[str] = (),
) -> int:
    """Rows (name -> array) as MDS blocks in `out` (index.json + LAYOUT_FILE), without Spark; blocks of at most
    `layout.block_rows` rows (`block_rows_for`). Returns the number of blocks."""
    from recsys_assets.data.streaming_import import import_streaming

    import_streaming()
    from streaming import MDSWriter

    Path(out).mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {"out": str(out), "columns": layout.mds_columns(), "size_limit": size_limit}
    if compression:
        kwargs["compression"] = compression
    if hashes:
        kwargs["hashes"] = list(hashes)
    n = len(arrays[layout.columns[0].name])
    layout = dataclasses.replace(layout, block_rows=block_rows_for(n, layout.block_rows))
    sizes = []
    with MDSWriter(**kwargs) as writer:
        for sample in layout.encode(arrays):
            writer.write(sample)
            sizes.append(int(sample[ROWS]))
    write_layout(out, layout, block_sizes=sizes)
    return len(sizes)
