"""The item-item candidate source's pool merge and its share chosen on validation targets (numpy only)."""

from __future__ import annotations

import numpy as np
import pytest

from recsys_assets.serving.item_item import choose_share, merge_pools

TT = np.array([[1, 2, 3, 4], [9, 8, 7, -1]])
II = np.array([[5, 1, 6, 7], [9, 6, -1, -1]])


def test_merge_pools_follows_the_share_and_keeps_each_item_once():
    assert merge_pools(TT, II, 4, 0.0).tolist() == [[1, 2, 3, 4], [9, 8, 7, -1]]
    assert merge_pools(TT, II, 4, 1.0).tolist() == [[5, 1, 6, 7], [9, 6, -1, -1]]
    # equal share: interleaved by rank, the first source first at equal rank, duplicates (1, 9) once
    assert merge_pools(TT, II, 4, 0.5).tolist() == [[1, 5, 2, 3], [9, 8, 6, 7]]
    # a quarter of the pool from the second source: three first-source items per second-source item
    assert merge_pools(TT, II, 4, 0.25).tolist()[0] == [1, 2, 5, 3]
    with pytest.raises(ValueError, match="share must be in"):
        merge_pools(TT, II, 4, 1.5)


def test_choose_share_takes_the_best_validation_ndcg_and_the_smaller_share_within_noise():
    # 40 queries whose target only the second source ranks first: a clear gain
    tt, ii = np.tile(TT[:1], (40, 1)), np.tile(II[:1], (40, 1))
    share, ndcg = choose_share(tt, ii, np.full(40, 5), 4, (0.0, 0.5, 1.0), cutoff=2)
    assert share == 1.0 and ndcg[0.0] == 0.0 and ndcg[1.0] == pytest.approx(1.0)
    assert ndcg[0.5] == pytest.approx(1 / np.log2(3))
    # one query, no -1 target counted: a gain on one query is within noise, the first source's pool is kept
    share, ndcg = choose_share(TT, II, np.array([5, -1]), 4, (0.0, 0.5, 1.0), cutoff=2)
    assert share == 0.0 and ndcg[1.0] == pytest.approx(1.0)
    share, _ = choose_share(TT, II, np.array([1, 9]), 4, (0.0, 0.5, 1.0), cutoff=2)
    assert share == 0.0  # the first source ranks both targets first: its pool alone is kept
    share, ndcg = choose_share(TT, II, np.array([-1, 9]), 4, (0.0, 0.5, 1.0), cutoff=2)
    assert set(ndcg.values()) == {1.0} and share == 0.0  # a tie: the smaller share
