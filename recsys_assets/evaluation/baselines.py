"""Reference baselines for the evaluation protocol, and a small tuner.

Each baseline has ``fit(task) -> self`` and ``score(users) -> torch.Tensor [len(users), num_items]``, so a
fitted baseline's ``score`` is a `score_fn` for `recsys_assets.evaluation.evaluate`.

Run ``python -m recsys_assets.evaluation.baselines --help`` for the reference numbers on MovieLens.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd
import torch

from recsys_assets.data.schema import ITEM, USER
from recsys_assets.evaluation.protocol import (
    DEFAULT_KS,
    EvalResult,
    EvalTask,
    evaluate,
    index_interactions,
    leave_last_out_splits,
)

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import SparkSession


class Baseline(Protocol):
    def fit(self, task: EvalTask) -> Baseline: ...

    def score(self, users: np.ndarray) -> torch.Tensor: ...


def _require_fitted(obj: object, attr: str) -> None:
    if getattr(obj, attr, None) is None:
        raise RuntimeError(f"{type(obj).__name__} is not fitted: call fit(task) first")


def _as_users(users: np.ndarray | Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(users, dtype=np.int64), device=device)


class MostPopular:
    """Score = number of fit interactions of the item (the same for every user)."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.popularity_: torch.Tensor | None = None

    def fit(self, task: EvalTask) -> MostPopular:
        self.popularity_ = torch.as_tensor(task.item_counts(), dtype=torch.float64, device=self.device)
        return self

    def score(self, users: np.ndarray) -> torch.Tensor:
        """A read-only broadcast view [len(users), num_items] (in-place writes to it raise)."""
        _require_fitted(self, "popularity_")
        assert self.popularity_ is not None
        return self.popularity_.unsqueeze(0).expand(len(users), -1)


class LastItemMarkov:
    """First-order Markov chain on the users' chronological fit sequences.

    Score of item b for a user = number of times (over all users) item b directly followed the user's last
    fit item, + `tie_break` x popularity / max popularity (so popular items win among equal counts, and users
    without fit history get plain popularity).
    """

    def __init__(self, tie_break: float = 0.001, device: str | torch.device = "cpu") -> None:
        self.tie_break = tie_break
        self.device = torch.device(device)
        self.base_: torch.Tensor | None = None

    def fit(self, task: EvalTask) -> LastItemMarkov:
        n = task.num_items
        seq = task.seq_items
        owner = np.repeat(np.arange(task.num_users, dtype=np.int64), np.diff(task.seq_indptr))
        same_user = owner[1:] == owner[:-1]
        a, b = seq[:-1][same_user], seq[1:][same_user]
        codes, counts = np.unique(a * n + b, return_counts=True)  # sorted by (a, b)
        rows = codes // n
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
        self.trans_indptr_ = indptr
        self.trans_indices_ = codes % n
        self.trans_counts_ = counts.astype(np.float64)
        self.last_items_ = task.last_items

        pop = task.item_counts().astype(np.float64)
        top = pop.max() if len(pop) else 0.0
        base = self.tie_break * pop / top if top > 0 else np.zeros_like(pop)
        self.base_ = torch.as_tensor(base, dtype=torch.float64, device=self.device)
        return self

    def score(self, users: np.ndarray) -> torch.Tensor:
        _require_fitted(self, "base_")
        assert self.base_ is not None
        users = np.asarray(users, dtype=np.int64)
        scores = self.base_.unsqueeze(0).repeat(len(users), 1)
        last = self.last_items_[users]
        rows_with = np.flatnonzero(last >= 0)
        starts = self.trans_indptr_[last[rows_with]]
        lengths = self.trans_indptr_[last[rows_with] + 1] - starts
        total = int(lengths.sum())
        if total:
            seg = np.zeros(len(lengths) + 1, dtype=np.int64)
            np.cumsum(lengths, out=seg[1:])
            offsets = np.repeat(starts - seg[:-1], lengths) + np.arange(total, dtype=np.int64)
            rows = torch.as_tensor(np.repeat(rows_with, lengths), device=self.device)
            cols = torch.as_tensor(self.trans_indices_[offsets], device=self.device)
            vals = torch.as_tensor(self.trans_counts_[offsets], device=self.device)
            scores[rows, cols] += vals  # (row, col) pairs are distinct
        return scores


class EASE:
    """EASE (Steck 2019), closed form: B = I - P diagMat(1 / diag(P)), P = (X^T X + lambda I)^-1, with X the
    binary user x item matrix of the fit data; scores = X_u B. Dense item x item: refuses above `max_items`.

    `solver`: "gram" inverts the n x n Gram matrix (O(n^3)); "woodbury" inverts a U x U matrix instead
    (O(U n^2), same result up to rounding, needs the dense U x n matrix); "auto" takes woodbury when
    2 U <= n."""

    def __init__(
        self,
        lam: float = 500.0,
        *,
        max_items: int = 20_000,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float64,
        solver: str = "auto",
    ) -> None:
        if lam <= 0:
            raise ValueError("lam must be positive")
        if solver not in ("auto", "gram", "woodbury"):
            raise ValueError(f"solver must be 'auto', 'gram' or 'woodbury', got {solver!r}")
        self.solver = solver
        self.lam = float(lam)
        self.max_items = max_items
        self.device = torch.device(device)
        self.dtype = dtype
        self.B_: torch.Tensor | None = None

    def fit(self, task: EvalTask) -> EASE:
        n = task.num_items
        if n > self.max_items:
            raise ValueError(
                f"EASE needs a dense {n} x {n} item-item matrix; refusing above max_items={self.max_items} "
                f"items (raise max_items if you have the memory: ~{3 * n * n * 8 / 2**30:.1f} GiB in float64)"
            )
        self.B_ = None
        indptr, indices = task.user_items_indptr, task.user_items_indices
        use_woodbury = self.solver == "woodbury" or (self.solver == "auto" and 2 * task.num_users <= n)
        if use_woodbury:
            # Few users: Woodbury, P = (I - X^T (lambda I_U + X X^T)^-1 X) / lambda costs O(U n^2), not O(n^3).
            x = self._rows(indptr, indices, np.arange(task.num_users), n)
            k = x @ x.T
            k.diagonal().add_(self.lam)
            k_inv_x = torch.cholesky_solve(x, torch.linalg.cholesky(k))
            p = torch.mm(x.T, k_inv_x).neg_()
            del x, k, k_inv_x
            p.diagonal().add_(1.0)
            p.div_(self.lam)
        else:
            gram = torch.zeros((n, n), dtype=self.dtype, device=self.device)
            chunk = max(1, (1 << 25) // max(n, 1))  # users per dense block (~32M entries)
            for start in range(0, task.num_users, chunk):
                x = self._rows(indptr, indices, np.arange(start, min(start + chunk, task.num_users)), n)
                gram.addmm_(x.T, x)
            gram.diagonal().add_(self.lam)
            chol = torch.linalg.cholesky(gram)
            del gram
            p = torch.cholesky_inverse(chol)
            del chol
        p.div_(-p.diagonal().clone().unsqueeze(0))  # B_ij = -P_ij / P_jj
        p.diagonal().zero_()
        self.B_ = p
        self._indptr, self._indices, self._n = indptr, indices, n
        return self

    def _rows(self, indptr: np.ndarray, indices: np.ndarray, users: np.ndarray, n: int) -> torch.Tensor:
        starts = indptr[users]
        lengths = indptr[users + 1] - starts
        seg = np.zeros(len(users) + 1, dtype=np.int64)
        np.cumsum(lengths, out=seg[1:])
        offsets = np.repeat(starts - seg[:-1], lengths) + np.arange(seg[-1], dtype=np.int64)
        x = torch.zeros((len(users), n), dtype=self.dtype, device=self.device)
        rows = torch.as_tensor(np.repeat(np.arange(len(users)), lengths), device=self.device)
        cols = torch.as_tensor(indices[offsets], device=self.device)
        x[rows, cols] = 1.0
        return x

    def score(self, users: np.ndarray) -> torch.Tensor:
        _require_fitted(self, "B_")
        assert self.B_ is not None
        x = self._rows(self._indptr, self._indices, np.asarray(users, dtype=np.int64), self._n)
        return x @ self.B_


class SparkALS:
    """pyspark.ml ALS with implicit feedback (confidence = number of fit interactions of the pair).

    Scores = user factors @ item factors; items without factors (never in the fit data) score -inf, users
    without factors get all-zero scores (before that -inf). Takes an existing SparkSession.
    """

    def __init__(
        self,
        spark: SparkSession,
        *,
        rank: int = 64,
        reg_param: float = 0.1,
        alpha: float = 1.0,
        max_iter: int = 15,
        seed: int = 0,
        num_blocks: int | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.spark = spark
        self.rank = rank
        self.reg_param = reg_param
        self.alpha = alpha
        self.max_iter = max_iter
        self.seed = seed
        self.num_blocks = num_blocks
        self.device = torch.device(device)
        self.user_factors_: torch.Tensor | None = None
        self.item_factors_: torch.Tensor | None = None
        self.item_offset_: torch.Tensor | None = None

    def fit(self, task: EvalTask) -> SparkALS:
        from pyspark.ml.recommendation import ALS

        pairs = task.fit.groupby([USER, ITEM], sort=True).size().reset_index(name="rating")
        pdf = pd.DataFrame(
            {
                USER: pairs[USER].to_numpy(dtype=np.int32),
                ITEM: pairs[ITEM].to_numpy(dtype=np.int32),
                "rating": pairs["rating"].to_numpy(dtype=np.float32),
            }
        )
        sdf = self.spark.createDataFrame(pdf, schema=f"{USER} int, {ITEM} int, rating float")
        kwargs: dict[str, Any] = {}
        if self.num_blocks is not None:
            kwargs.update(numUserBlocks=self.num_blocks, numItemBlocks=self.num_blocks)
        als = ALS(
            rank=self.rank,
            maxIter=self.max_iter,
            regParam=self.reg_param,
            alpha=self.alpha,
            implicitPrefs=True,
            seed=self.seed,
            userCol=USER,
            itemCol=ITEM,
            ratingCol="rating",
            **kwargs,
        )
        model = als.fit(sdf)
        users = self._factors(model.userFactors, task.num_users)
        items = self._factors(model.itemFactors, task.num_items)
        seen = np.zeros(task.num_items, dtype=bool)
        seen[model.itemFactors.select("id").toPandas()["id"].to_numpy()] = True
        self.user_factors_ = torch.as_tensor(users, device=self.device)
        self.item_factors_ = torch.as_tensor(items, device=self.device)
        offset = np.where(seen, 0.0, -np.inf).astype(np.float32)
        self.item_offset_ = torch.as_tensor(offset, device=self.device)
        return self

    def _factors(self, frame: Any, n: int) -> np.ndarray:
        pdf = frame.toPandas()
        out = np.zeros((n, self.rank), dtype=np.float32)
        if len(pdf):
            out[pdf["id"].to_numpy()] = np.stack(pdf["features"].to_numpy()).astype(np.float32)
        return out

    def score(self, users: np.ndarray) -> torch.Tensor:
        _require_fitted(self, "user_factors_")
        assert self.user_factors_ is not None and self.item_factors_ is not None
        assert self.item_offset_ is not None
        u = self.user_factors_[_as_users(users, self.device)]
        return u @ self.item_factors_.T + self.item_offset_


@dataclasses.dataclass(frozen=True)
class TuneResult:
    """Chosen settings (best validation metric, first in grid order on ties) and the two reports."""

    params: dict[str, Any]
    validation: EvalResult
    test: EvalResult
    trials: list[tuple[dict[str, Any], EvalResult]]


def _grid_points(grid: Mapping[str, Sequence[Any]] | Iterable[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    if grid is None:
        return [{}]
    if isinstance(grid, Mapping):
        keys = list(grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    points = [dict(p) for p in grid]
    return points or [{}]


def tune(
    baseline_factory: Callable[..., Baseline],
    grid: Mapping[str, Sequence[Any]] | Iterable[Mapping[str, Any]] | None,
    splits: pd.DataFrame,
    *,
    num_users: int | None = None,
    num_items: int | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    metric: str = "ndcg@10",
    batch_size: int = 1024,
    log: Callable[[str], None] | None = None,
) -> TuneResult:
    """Choose settings on the validation phase by `metric`, refit them on train + validation, report test.

    `grid` is either {param: [values]} (cartesian product) or a list of {param: value} dicts;
    `baseline_factory(**params)` must return an unfitted baseline.
    """
    val_task = EvalTask.from_splits(splits, "validation", num_users=num_users, num_items=num_items)
    test_task = EvalTask.from_splits(splits, "test", num_users=val_task.num_users, num_items=val_task.num_items)
    trials: list[tuple[dict[str, Any], EvalResult]] = []
    best: tuple[dict[str, Any], EvalResult] | None = None
    for params in _grid_points(grid):
        model = baseline_factory(**params).fit(val_task)
        result = evaluate(model.score, val_task, ks=ks, batch_size=batch_size)
        if metric not in result:
            raise ValueError(f"metric {metric!r} not among {list(result)}; add its cut-off to ks")
        trials.append((params, result))
        if log is not None:
            log(f"validation {params}: {result}")
        if best is None or result[metric] > best[1][metric]:
            best = (params, result)
        del model
    assert best is not None
    model = baseline_factory(**best[0]).fit(test_task)
    test = evaluate(model.score, test_task, ks=ks, batch_size=batch_size)
    return TuneResult(params=best[0], validation=best[1], test=test, trials=trials)


# --------------------------------------------------------------------------------------------------- CLI
def _default_ratings() -> Path:
    return Path(__file__).resolve().parents[3] / "shared/data/ml-latest-small/ratings.csv"


def load_movielens_splits(path: str | Path) -> tuple[pd.DataFrame, int, int]:
    """MovieLens ratings.csv -> (splits table, num_users, num_items): every rating is an interaction."""
    raw = pd.read_csv(path)
    df, num_users, num_items = index_interactions(raw, user_col="userId", item_col="movieId", time_col="timestamp")
    return leave_last_out_splits(df), num_users, num_items


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Reference baselines on a MovieLens ratings.csv (test phase).")
    parser.add_argument("--ratings", type=Path, default=_default_ratings())
    parser.add_argument("--baselines", default="pop,markov,ease", help="comma list of pop,markov,ease,als")
    parser.add_argument("--ease-lambda", type=float, default=50.0)
    parser.add_argument("--tune-ease", action="store_true", help="choose lambda from 50/200/500/1000")
    args = parser.parse_args(argv)

    splits, num_users, num_items = load_movielens_splits(args.ratings)
    print(
        f"{args.ratings}: {len(splits)} interactions, {num_users} users, {num_items} items, "
        f"{splits['split'].value_counts().to_dict()}"
    )
    test_task = EvalTask.from_splits(splits, "test", num_users=num_users, num_items=num_items)

    def report(name: str, result: EvalResult, seconds: float) -> None:
        m = result.metrics
        print(
            f"{name:<40} HR@10 {m['hr@10']:.4f}  NDCG@10 {m['ndcg@10']:.4f}  HR@100 {m['hr@100']:.4f}  "
            f"(n={result.n_users}, {seconds:.1f}s)",
            flush=True,
        )

    spark = None
    try:
        for name in [b.strip() for b in args.baselines.split(",") if b.strip()]:
            t0 = time.perf_counter()
            if name == "pop":
                model: Baseline = MostPopular().fit(test_task)
                report("MostPopular", evaluate(model.score, test_task), time.perf_counter() - t0)
            elif name == "markov":
                model = LastItemMarkov().fit(test_task)
                report("LastItemMarkov", evaluate(model.score, test_task), time.perf_counter() - t0)
            elif name == "ease" and args.tune_ease:
                tuned = tune(
                    EASE, {"lam": [50.0, 200.0, 500.0, 1000.0]}, splits, num_users=num_users, num_items=num_items
                )
                for params, res in tuned.trials:
                    print(f"  validation EASE {params}: {res}")
                report(f"EASE (tuned: {tuned.params})", tuned.test, time.perf_counter() - t0)
            elif name == "ease":
                model = EASE(lam=args.ease_lambda).fit(test_task)
                report(
                    f"EASE (lambda={args.ease_lambda:g})", evaluate(model.score, test_task), time.perf_counter() - t0
                )
            elif name == "als":
                from pyspark.sql import SparkSession

                if spark is None:
                    spark = (
                        SparkSession.builder.master("local[2]")
                        .appName("recsys-eval-baselines")
                        .config("spark.ui.enabled", "false")
                        .config("spark.ui.showConsoleProgress", "false")
                        .config("spark.driver.memory", "4g")
                        .getOrCreate()
                    )
                    spark.sparkContext.setLogLevel("ERROR")
                model = SparkALS(spark, rank=64, reg_param=0.1, alpha=1.0, max_iter=15, seed=0).fit(test_task)
                report(
                    "SparkALS (rank 64, reg 0.1, alpha 1)", evaluate(model.score, test_task), time.perf_counter() - t0
                )
            else:
                parser.error(f"unknown baseline {name!r}")
    finally:
        if spark is not None:
            spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
