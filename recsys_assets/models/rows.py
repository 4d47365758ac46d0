"""Row-invariant products. BLAS computes a product of 1 to 3 rows with a matrix-vector kernel whose summation order
differs from the blocked kernel of larger products: a query scored alone would differ in the last bits from the
same query scored in a batch, and near-tied items could swap places between an online answer and the batch list.
The scorers therefore run every product on at least MIN_ROWS rows (measured: 4 rows and more give the same bits as
a 610-row batch on this CPU's kernels)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

MIN_ROWS = 8


def _padded(t: torch.Tensor, rows: int) -> torch.Tensor:
    """`t` with its last row repeated up to `rows` rows."""
    return torch.cat([t, t[-1:].expand(rows - t.shape[0], *t.shape[1:])])


def with_min_rows(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor | None) -> torch.Tensor:
    """fn(*tensors), computed on at least MIN_ROWS rows (the tensors share their first dimension; None passes)."""
    n = next(t.shape[0] for t in tensors if t is not None)
    if n == 0 or n >= MIN_ROWS:
        return fn(*tensors)
    return fn(*(None if t is None else _padded(t, MIN_ROWS) for t in tensors))[:n]


def batch_with_min_rows(fn: Callable[[dict], torch.Tensor], batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """fn(batch) for a dict of row-aligned tensors, computed on at least MIN_ROWS rows."""
    keys = list(batch)
    return with_min_rows(lambda *ts: fn(dict(zip(keys, ts))), *(torch.as_tensor(batch[k]) for k in keys))
