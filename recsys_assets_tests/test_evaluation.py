"""Tests of the evaluation protocol (recsys_assets.evaluation) and its reference baselines."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from recsys_assets.evaluation import (
    EvalTask,
    evaluate,
    index_interactions,
    leave_last_out_splits,
    metrics_from_ranks,
    ranks_from_scores,
)
from recsys_assets.evaluation.baselines import (
    EASE,
    LastItemMarkov,
    MostPopular,
    SparkALS,
    load_movielens_splits,
    tune,
)

ML_SMALL = Path(__file__).resolve().parents[2] / "shared/data/ml-latest-small"
ML_RATINGS = ML_SMALL / "ratings.csv"


def _splits(rows: list[tuple[int, int, int, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["user", "item", "timestamp", "split"])


@pytest.fixture()
def small_splits() -> pd.DataFrame:
    """3 users, 30 items. user 2 has no held-out rows (all train)."""
    return _splits(
        [
            (0, 0, 1, "train"),
            (0, 1, 2, "train"),
            (0, 2, 3, "train"),
            (0, 3, 4, "validation"),
            (0, 4, 5, "test"),
            (1, 5, 1, "train"),
            (1, 0, 2, "train"),
            (1, 6, 3, "validation"),
            (1, 7, 4, "test"),
            (2, 1, 1, "train"),
            (2, 0, 1, "train"),  # tied timestamps, listed out of item order
        ]
    )


# ------------------------------------------------------------------------------------- ranks and metrics
def test_perfect_scorer_gets_one_and_reversed_scorer_gets_zero(small_splits: pd.DataFrame) -> None:
    for phase in ("validation", "test"):
        task = EvalTask.from_splits(small_splits, phase, num_users=3, num_items=30)
        target_of = dict(zip(task.users.tolist(), task.targets.tolist()))

        def perfect(users: np.ndarray) -> torch.Tensor:
            s = torch.zeros(len(users), 30)
            for i, u in enumerate(users):
                s[i, target_of[int(u)]] = 1.0
            return s

        def reversed_(users: np.ndarray) -> torch.Tensor:
            return -perfect(users)

        good = evaluate(perfect, task)
        assert good.n_users == 2
        assert good["hr@10"] == 1.0 and good["ndcg@10"] == 1.0 and good["hr@100"] == 1.0
        assert good.ranks.tolist() == [0, 0]
        bad = evaluate(reversed_, task)
        assert bad["hr@10"] == 0.0 and bad["ndcg@10"] == 0.0
        # every non-excluded item except the target outranks it
        n_excluded = np.diff(task.exclude_indptr)
        assert bad.ranks.tolist() == (30 - 1 - n_excluded).tolist()
        assert bad["hr@100"] == 1.0


def test_ties_count_in_favour_of_the_held_out_item() -> None:
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 1.0, 1.0, 0.5], [0.0, 0.0, 0.0, 0.0]])
    ranks = ranks_from_scores(scores, np.array([2, 1, 3]), np.array([0, 0, 0, 0]), np.array([], dtype=np.int64))
    assert ranks.tolist() == [0, 1, 0]


def test_excluded_items_never_count() -> None:
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    targets = np.array([3, 3])
    # row 0: items 0, 1, 2 excluded -> nothing above the target; row 1: item 1 excluded, and the target itself
    # is listed (it is never excluded from its own ranking)
    ranks = ranks_from_scores(scores, targets, np.array([0, 3, 5]), np.array([0, 1, 2, 1, 3]))
    assert ranks.tolist() == [0, 2]
    # the input is not modified
    assert scores[0].tolist() == [5.0, 4.0, 3.0, 2.0, 1.0]


def test_ranks_accept_a_window_of_a_larger_csr_and_numpy_scores() -> None:
    indptr = np.array([0, 2, 3, 5])
    indices = np.array([0, 1, 0, 1, 2])
    scores = np.array([[4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0]])
    ranks = ranks_from_scores(scores, np.array([3, 3]), indptr[1:], indices)  # rows 1 and 2 of the CSR
    assert ranks.tolist() == [2, 1]


def test_ranks_reject_bad_inputs() -> None:
    none = np.array([0, 0])
    with pytest.raises(ValueError, match="NaN"):
        ranks_from_scores(torch.tensor([[float("nan"), 1.0]]), np.array([0]), none, np.array([], dtype=np.int64))
    with pytest.raises(ValueError, match="targets out of range"):
        ranks_from_scores(torch.zeros(1, 2), np.array([2]), none, np.array([], dtype=np.int64))
    with pytest.raises(ValueError, match="2-D"):
        ranks_from_scores(torch.zeros(2), np.array([0]), none, np.array([], dtype=np.int64))


def test_metrics_formula() -> None:
    m = metrics_from_ranks(np.array([0, 1, 9, 10, 150]), ks=(1, 10, 100))
    assert m["hr@1"] == pytest.approx(1 / 5)
    assert m["hr@10"] == pytest.approx(3 / 5)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(11)) / 5)
    assert m["hr@100"] == pytest.approx(4 / 5)
    assert m["ndcg@100"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(11) + 1 / math.log2(12)) / 5)
    assert list(m) == ["hr@1", "ndcg@1", "hr@10", "ndcg@10", "hr@100", "ndcg@100"]


def test_evaluate_is_independent_of_batch_size_and_checks_shapes(small_splits: pd.DataFrame) -> None:
    task = EvalTask.from_splits(small_splits, "test", num_users=3, num_items=30)
    rng = np.random.default_rng(0)
    table = rng.normal(size=(3, 30))
    one = evaluate(lambda u: table[u], task, batch_size=1)
    many = evaluate(lambda u: torch.from_numpy(table[u]), task, batch_size=64)
    assert one.ranks.tolist() == many.ranks.tolist()
    assert dict(one) == dict(many)
    with pytest.raises(ValueError, match="shape"):
        evaluate(lambda u: np.zeros((len(u), 29)), task)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ranks_on_cuda_match_cpu() -> None:
    rng = np.random.default_rng(1)
    scores = torch.from_numpy(rng.normal(size=(64, 500)).astype(np.float32))
    targets = rng.integers(0, 500, size=64)
    indptr = np.arange(0, 65 * 7, 7)[:65]
    indices = rng.integers(0, 500, size=int(indptr[-1]))
    cpu = ranks_from_scores(scores, targets, indptr, indices)
    gpu = ranks_from_scores(scores.cuda(), targets, indptr, indices)
    assert gpu.device.type == "cuda"
    assert gpu.cpu().tolist() == cpu.tolist()


# --------------------------------------------------------------------------------------------- the task
def test_task_fit_data_and_exclusions_follow_the_phase(small_splits: pd.DataFrame) -> None:
    val = EvalTask.from_splits(small_splits, "validation", num_users=3, num_items=30)
    assert val.users.tolist() == [0, 1] and val.targets.tolist() == [3, 6]
    assert val.exclude_indices[val.exclude_indptr[0] : val.exclude_indptr[1]].tolist() == [0, 1, 2]
    assert val.exclude_indices[val.exclude_indptr[1] : val.exclude_indptr[2]].tolist() == [0, 5]
    assert set(val.fit.columns) == {"user", "item", "timestamp"} and len(val.fit) == 7

    test = EvalTask.from_splits(small_splits, "test", num_users=3, num_items=30)
    assert test.users.tolist() == [0, 1] and test.targets.tolist() == [4, 7]
    assert test.exclude_indices[test.exclude_indptr[0] : test.exclude_indptr[1]].tolist() == [0, 1, 2, 3]
    assert test.exclude_indices[test.exclude_indptr[1] : test.exclude_indptr[2]].tolist() == [0, 5, 6]
    # chronological sequences, ordered by (timestamp, item); user 1's train items 5 (t=1) then 0 (t=2)
    assert test.sequence(1).tolist() == [5, 0, 6]
    assert test.sequence(2).tolist() == [0, 1]
    assert test.last_items.tolist() == [3, 6, 1]
    assert test.item_counts()[0] == 3


def test_task_rejects_two_held_out_rows_per_user() -> None:
    bad = _splits([(0, 0, 1, "train"), (0, 1, 2, "test"), (0, 2, 3, "test")])
    with pytest.raises(ValueError, match="more than one test row"):
        EvalTask.from_splits(bad, "test")
    with pytest.raises(ValueError, match="phase"):
        EvalTask.from_splits(bad, "train")


def test_leave_last_out_splits_orders_by_timestamp_then_item() -> None:
    raw = pd.DataFrame(
        {
            "user": [0, 0, 0, 0, 1, 1, 2, 2, 2],
            "item": [9, 3, 5, 4, 1, 2, 7, 6, 8],
            "timestamp": [1, 5, 5, 2, 1, 2, 3, 3, 3],
        }
    )
    out = leave_last_out_splits(raw)
    got = {(u, i): s for u, i, s in out[["user", "item", "split"]].itertuples(index=False)}
    # user 0: 9 (t1), 4 (t2), 3 (t5), 5 (t5) -> the tie at t5 is broken by item: 3 validation, 5 test
    assert [got[(0, i)] for i in (9, 4, 3, 5)] == ["train", "train", "validation", "test"]
    # user 1 has < 3 interactions: all train
    assert got[(1, 1)] == got[(1, 2)] == "train"
    # user 2: all at t3 -> items 6, 7, 8
    assert [got[(2, i)] for i in (6, 7, 8)] == ["train", "validation", "test"]


def test_index_interactions_is_contiguous_and_order_preserving() -> None:
    raw = pd.DataFrame({"userId": [10, 3, 10], "movieId": [500, 7, 42], "timestamp": [1, 2, 3], "rating": [1.0, 2, 3]})
    df, n_users, n_items = index_interactions(raw, user_col="userId", item_col="movieId")
    assert (n_users, n_items) == (2, 3)
    assert df["user"].tolist() == [1, 0, 1]
    assert df["item"].tolist() == [2, 0, 1]
    assert list(df.columns) == ["user", "item", "timestamp", "rating"]


# ------------------------------------------------------------------------------------------- baselines
def test_most_popular_and_markov_scores(small_splits: pd.DataFrame) -> None:
    task = EvalTask.from_splits(small_splits, "test", num_users=3, num_items=30)
    pop = MostPopular().fit(task).score(np.array([0, 2]))
    assert pop.shape == (2, 30)
    assert pop[0, 0].item() == 3 and pop[1, 1].item() == 2 and pop[0, 29].item() == 0

    markov = LastItemMarkov().fit(task)
    s = markov.score(np.array([0, 1, 2]))
    # transitions: 0->1 (x2: users 0 and 2), 1->2, 2->3, 5->0, 0->6. User 2's last item is 1 -> item 2 count 1
    assert s[2, 2].item() == pytest.approx(1 + 0.001 * 1 / 3)
    # user 1's last item is 6: no transitions from 6 -> popularity tie-break only, item 0 (count 3) first
    assert s[1].argmax().item() == 0 and s[1, 0].item() == pytest.approx(0.001)
    # user 0's last item (3) has no successors either
    assert s[0].max().item() == pytest.approx(0.001)
    m2 = LastItemMarkov().fit(EvalTask.from_splits(small_splits, "validation", num_users=3, num_items=30))
    s2 = m2.score(np.array([2]))  # user 2, last item 1: 1 -> 2 once
    assert s2[0, 2].item() > 1.0 and s2[0, 1].item() < 1.0


def _random_splits(n_users: int, n_items: int, per_user: int, seed: int) -> pd.DataFrame:
    """Random interactions with Zipf-like item popularity (item 0 most popular), leave-last-out split."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, n_items + 1)
    rows = []
    for u in range(n_users):
        items = rng.choice(n_items, size=per_user, replace=False, p=p / p.sum())
        rows += [(u, int(i), t) for t, i in enumerate(items)]
    return leave_last_out_splits(pd.DataFrame(rows, columns=["user", "item", "timestamp"]))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-9), (torch.float32, 2e-5)])
def test_ease_solvers_agree_and_big_catalogues_are_refused(dtype: torch.dtype, tol: float) -> None:
    splits = _random_splits(n_users=30, n_items=80, per_user=12, seed=2)
    task = EvalTask.from_splits(splits, "test", num_users=30, num_items=80)
    users = np.arange(30)
    gram = EASE(lam=5.0, solver="gram", dtype=dtype).fit(task)  # in place: LAPACK potrf / potri
    wood = EASE(lam=5.0, solver="woodbury", dtype=dtype).fit(task)
    assert gram.B_.dtype == dtype and EASE().dtype == torch.float32  # float32 unless asked
    torch.testing.assert_close(wood.B_, gram.B_, rtol=tol, atol=tol)
    assert torch.all(gram.B_.diagonal() == 0)
    # B = I - P diag(1/diag(P)) with P = (X^T X + lam I)^-1, checked against a plain numpy inverse
    x = np.zeros((30, 80))
    x[task.fit["user"], task.fit["item"]] = 1.0
    p = np.linalg.inv(x.T @ x + 5.0 * np.eye(80))
    b = np.eye(80) - p / np.diag(p)[None, :]
    np.testing.assert_allclose(gram.score(users).numpy(), x @ b, atol=tol)
    with pytest.raises(ValueError, match="max_items=50"):
        EASE(max_items=50).fit(task)


def test_ease_steps_aside_when_the_memory_cannot_hold_its_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no fixed cap, the limit is what the available memory holds; the refusal names the need."""
    from recsys_assets.evaluation import memory

    splits = _random_splits(n_users=30, n_items=80, per_user=12, seed=2)
    task = EvalTask.from_splits(splits, "test", num_users=30, num_items=80)
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 4 * 80 * 80)  # room for 40% of one matrix
    assert memory.dense_item_limit() == 50
    with pytest.raises(ValueError, match=r"EASE set aside: 80 items need a .* GiB float32 .*holds 50 items"):
        EASE().fit(task)
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 2**30)
    assert memory.dense_item_refusal(80, None, "EASE") is None
    assert memory.dense_item_limit() == int((0.4 * 2**30 / 4) ** 0.5)


def test_tune_picks_the_best_validation_setting_then_refits(small_splits: pd.DataFrame) -> None:
    class SignedPopularity(MostPopular):
        def __init__(self, sign: float) -> None:
            super().__init__()
            self.sign = sign

        def score(self, users: np.ndarray) -> torch.Tensor:
            return self.sign * super().score(users)

    splits = _random_splits(n_users=40, n_items=25, per_user=10, seed=3)
    result = tune(SignedPopularity, {"sign": [-1.0, 1.0]}, splits, num_users=40, num_items=25)
    assert result.params == {"sign": 1.0}
    assert [p for p, _ in result.trials] == [{"sign": -1.0}, {"sign": 1.0}]
    assert result.trials[1][1]["ndcg@10"] > result.trials[0][1]["ndcg@10"]
    assert result.validation.phase == "validation" and result.test.phase == "test"
    direct = evaluate(
        MostPopular().fit(EvalTask.from_splits(splits, "test", num_users=40, num_items=25)).score,
        EvalTask.from_splits(splits, "test", num_users=40, num_items=25),
    )
    assert dict(result.test) == dict(direct)
    # a list-of-dicts grid works too, and ties keep the first setting
    tied = tune(SignedPopularity, [{"sign": 2.0}, {"sign": 1.0}], splits)
    assert tied.params == {"sign": 2.0}


# ------------------------------------------------------------------------------ reference numbers (ML)
@pytest.fixture(scope="module")
def ml_test_task() -> EvalTask:
    if not ML_RATINGS.exists():
        pytest.skip(f"MovieLens data not found at {ML_RATINGS} (expected ../shared/data beside the repository)")
    splits, n_users, n_items = load_movielens_splits(ML_RATINGS)
    assert (n_users, n_items, len(splits)) == (610, 9724, 100836)
    return EvalTask.from_splits(splits, "test", num_users=n_users, num_items=n_items)


def _rounded(result) -> tuple[float, float, float]:
    return (round(result["hr@10"], 4), round(result["ndcg@10"], 4), round(result["hr@100"], 4))


def test_most_popular_reproduces_the_reference_row(ml_test_task: EvalTask) -> None:
    result = evaluate(MostPopular().fit(ml_test_task).score, ml_test_task)
    assert result.n_users == 610
    assert _rounded(result) == (0.0426, 0.0194, 0.1869)


def test_last_item_markov_reproduces_the_reference_row(ml_test_task: EvalTask) -> None:
    result = evaluate(LastItemMarkov().fit(ml_test_task).score, ml_test_task)
    assert _rounded(result) == (0.0738, 0.0472, 0.2311)


def test_ease_reproduces_the_reference_row(ml_test_task: EvalTask) -> None:
    result = evaluate(EASE(lam=50.0).fit(ml_test_task).score, ml_test_task)
    assert _rounded(result) == (0.0852, 0.0411, 0.3689)


# ----------------------------------------------------------------------------------------- Spark ALS
# The `spark` fixture is the session-wide one from conftest.py.


def test_spark_als_tiny(spark) -> None:
    # two item groups {0..3} and {4..7}; item 9 is never interacted with; user 5 has no fit rows
    rows = []
    for u in range(4):
        group = range(0, 4) if u % 2 == 0 else range(4, 8)
        rows += [(u, i, t, "train") for t, i in enumerate(group)]
    rows += [(5, 8, 0, "test")]
    splits = _splits(rows)
    task = EvalTask.from_splits(splits, "test", num_users=6, num_items=10)
    model = SparkALS(spark, rank=4, reg_param=0.01, alpha=10.0, max_iter=5, seed=0, num_blocks=1).fit(task)
    s = model.score(np.array([0, 1, 5]))
    assert s.shape == (3, 10)
    assert torch.isneginf(s[:, 9]).all() and torch.isneginf(s[:, 8]).all()  # items without factors
    assert torch.all(s[2, :8] == 0)  # user without factors
    assert s[0, :4].min() > s[0, 4:8].max()  # user 0 prefers its own group
    assert s[1, 4:8].min() > s[1, :4].max()
    result = evaluate(model.score, task)
    # user 5: its target (item 8) scores -inf, the 8 items with factors score 0 and outrank it
    assert result.n_users == 1 and result.ranks.tolist() == [8]


EASE_PEAK_PROBE = """
import sys, numpy as np, pandas as pd
from pathlib import Path
from recsys_assets.evaluation.baselines import EASE, EASEGram
from recsys_assets.evaluation.protocol import EvalTask, leave_last_out_splits

def vm_hwm_kib():
    return int(next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM")).split()[1])

rng = np.random.default_rng(0)
n_users, n_items = 7000, 5000
rows = pd.DataFrame({"user": np.repeat(np.arange(n_users), 8), "item": rng.integers(0, n_items, 8 * n_users)})
rows = rows.drop_duplicates().assign(timestamp=lambda d: np.arange(len(d)))
task = EvalTask.from_splits(leave_last_out_splits(rows), "test", num_users=n_users, num_items=n_items)
gram = EASEGram(task, solver="gram")
# a small fit first: the libraries it loads and BLAS's thread buffers are not items × items matrices
small = EvalTask.from_splits(leave_last_out_splits(rows[rows["item"] < 300]), "test", num_users=n_users, num_items=300)
EASEGram(small, solver="gram").weights(50.0)
Path("/proc/self/clear_refs").write_text("5")  # the peak from here on
before = vm_hwm_kib()
b = gram.weights(50.0)
print((vm_hwm_kib() - before) * 1024 / b.numel() / b.element_size())
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak-RSS reset")
def test_ease_holds_one_items_matrix_per_lambda() -> None:
    """The Gram solver factorises, inverts and scales in place: fitting a λ raises the peak RSS by about one
    items × items matrix (the old path held the Gram, its shifted copy, the factor and the inverse)."""
    out = subprocess.run([sys.executable, "-c", EASE_PEAK_PROBE], capture_output=True, text=True, check=True)
    matrices = float(out.stdout.strip().splitlines()[-1])
    # one matrix plus block temporaries (the mirror's row block, the Gram's column blocks, allocator slack):
    # 1.3 to 1.66 in repeated runs; a second items × items matrix alive at once would make it 2 or more
    assert 0.9 <= matrices < 1.9, f"peak rose by {matrices:.2f} items × items matrices"
