"""`serving.retrieval.item_ranks` (the retrieval_rank of every candidate pair) equals a brute-force count of the
non-excluded catalogue items scoring strictly higher, with ties, exclusions, padding and blocks of any size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys_assets.serving.retrieval import QueryStates, item_ranks


def _states(exclude: list[list[int]]) -> QueryStates:
    q = len(exclude)
    indptr = np.zeros(q + 1, dtype=np.int64)
    np.cumsum([len(e) for e in exclude], out=indptr[1:])
    zeros = np.zeros(q, dtype=np.int64)
    return QueryStates(
        phase="test",
        users=np.arange(q, dtype=np.int64),
        targets=zeros,
        timestamps=zeros,
        history=np.full((q, 1), -1, dtype=np.int32),
        history_len=zeros.astype(np.int32),
        exclude_indptr=indptr,
        exclude_indices=np.asarray([i for e in exclude for i in sorted(e)], dtype=np.int64),
        positions=zeros + 1,
        query_ids=np.arange(q, dtype=np.int64),
    )


@pytest.mark.parametrize("batch_size", [None, 1, 3])
def test_item_ranks_count_the_strictly_higher_non_excluded_items(batch_size):
    rng = np.random.default_rng(0)
    n_items, dim, q = 50, 4, 7
    # integer-valued vectors: many exact score ties
    qv = torch.as_tensor(rng.integers(-2, 3, (q, dim)), dtype=torch.float32)
    iv = torch.as_tensor(rng.integers(-2, 3, (n_items, dim)), dtype=torch.float32)
    exclude = [sorted(set(rng.integers(0, n_items, rng.integers(0, 10)).tolist())) for _ in range(q)]
    items = rng.integers(0, n_items, (q, 6))
    items[0, 2] = -1  # padding
    items[1, :2] = exclude[1][:2] if len(exclude[1]) >= 2 else items[1, :2]  # excluded items keep a rank
    got = item_ranks(qv, iv, _states(exclude), items, batch_size=batch_size)
    scores = (qv @ iv.T).numpy()
    for r in range(q):
        allowed = np.ones(n_items, dtype=bool)
        allowed[exclude[r]] = False
        for c, item in enumerate(items[r]):
            want = -1 if item < 0 else int((scores[r][allowed] > scores[r, item]).sum())
            assert got[r, c] == want, (r, c, item)
    assert (got[0, 2] == -1) and len({tuple(row) for row in scores.round(6)}) > 1
