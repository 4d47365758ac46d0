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
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd
import torch

from recsys_assets.data.schema import ITEM, USER
from recsys_assets.evaluation.memory import dense_item_refusal
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


def _csr_rows(indptr: np.ndarray, indices: np.ndarray, rows: np.ndarray, n_cols: int, like: torch.Tensor):
    """Sparse CSR [len(rows), n_cols] with a 1 at each (row, column) of the given rows of a CSR structure."""
    starts = indptr[rows]
    lengths = indptr[rows + 1] - starts
    crow = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=crow[1:])
    offsets = np.repeat(starts - crow[:-1], lengths) + np.arange(crow[-1], dtype=np.int64)
    ones = torch.ones(int(crow[-1]), dtype=like.dtype, device=like.device)
    with warnings.catch_warnings():  # "sparse CSR is in beta": CSR times dense is all we use of it
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            torch.as_tensor(crow, device=like.device),
            torch.as_tensor(indices[offsets], device=like.device),
            ones,
            size=(len(rows), n_cols),
            check_invariants=False,  # built sorted and in range above
        )


class EASEGram:
    """What every λ of one EASE fit matrix X (binary users × items) shares, built once per fit task: X as sparse
    rows, and with few users (Woodbury) X dense and K = XXᵀ. Each λ then costs one Cholesky factorisation.

    Memory: each λ holds ONE dense items × items matrix, G + λI, factorised, inverted and turned into EASE's B in
    place (LAPACK potrf / potri on CPU), rather than the Gram, its copy, the factor and the inverse side by side;
    G is rebuilt from the sparse X per λ (nnz·n multiply-adds, small next to the n³/3 of the factorisation).

    `solver`: "gram" factorises G + λI (O(n^3)); "woodbury" factorises K + λI (O(U^3 + nnz n)); "auto" takes
    woodbury when 2 U <= n."""

    def __init__(
        self,
        task: EvalTask,
        *,
        solver: str = "auto",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if solver not in ("auto", "gram", "woodbury"):
            raise ValueError(f"solver must be 'auto', 'gram' or 'woodbury', got {solver!r}")
        self.task, self.n = task, task.num_items
        self.settings = (solver, torch.device(device), dtype)
        self.woodbury = solver == "woodbury" or (solver == "auto" and 2 * task.num_users <= self.n)
        self._like = torch.empty(0, dtype=dtype, device=device)
        indptr, items = task.user_items_indptr, task.user_items_indices
        users = np.repeat(np.arange(task.num_users, dtype=np.int64), np.diff(indptr))
        order = np.argsort(items, kind="stable")  # Xᵀ's rows: the users of each item
        self._item_indptr = np.zeros(self.n + 1, dtype=np.int64)
        np.cumsum(np.bincount(items, minlength=self.n), out=self._item_indptr[1:])
        self._item_users = users[order]
        self.xt = self._item_rows(np.arange(self.n), self._like)  # sparse [n, U]
        if self.woodbury:
            self.x_dense = self.xt.to_dense().T.contiguous()  # [U, n]
            self.kernel = self.x_dense @ self.x_dense.T  # K = X Xᵀ [U, U]

    def _item_rows(self, items: np.ndarray, like: torch.Tensor) -> torch.Tensor:
        return _csr_rows(self._item_indptr, self._item_users, items, self.task.num_users, like)

    def _gram(self) -> torch.Tensor:
        """G = XᵀX by column blocks, sparse times dense: nnz·n multiply-adds where the dense product costs U·n²."""
        n, like = self.n, self._like
        gram = torch.empty((n, n), dtype=like.dtype, device=like.device)
        chunk = max(1, (1 << 21) // max(self.task.num_users, 1))  # items per dense block (~2M entries)
        for start in range(0, n, chunk):
            cols = np.arange(start, min(start + chunk, n))
            gram[:, cols[0] : cols[-1] + 1] = self.xt @ self._item_rows(cols, like).to_dense().T
        return gram

    def inverse(self, lam: float) -> torch.Tensor:
        """P = (G + λI)⁻¹, dense [n, n]: the only n × n matrix this call allocates."""
        if not self.woodbury:
            shifted = self._gram()
            shifted.diagonal().add_(lam)
            return _spd_inverse_in_place(shifted)
        # Woodbury: P = (I - Xᵀ (λ I_U + X Xᵀ)^-1 X) / λ
        shifted = self.kernel.clone()
        shifted.diagonal().add_(lam)
        k_inv_x = torch.cholesky_solve(self.x_dense, torch.linalg.cholesky(shifted))
        p = (self.xt @ k_inv_x).neg_()
        p.diagonal().add_(1.0)
        return p.div_(lam)

    def weights(self, lam: float) -> torch.Tensor:
        """EASE's B = I - P diagMat(1 / diag(P)) (zero diagonal), dense [n, n], in P's memory."""
        p = self.inverse(lam)
        p.div_(-p.diagonal().clone().unsqueeze(0))  # B_ij = -P_ij / P_jj
        p.diagonal().zero_()
        return p


def _spd_inverse_in_place(a: torch.Tensor) -> torch.Tensor:
    """The inverse of the symmetric positive definite `a`, written over it. On CPU, LAPACK's potrf and potri work
    in place (torch's cholesky / cholesky_inverse each allocate another n × n); elsewhere torch's ops."""
    if a.device.type != "cpu" or a.dtype not in (torch.float32, torch.float64):
        return torch.cholesky_inverse(torch.linalg.cholesky(a))
    from scipy.linalg import lapack

    potrf, potri = (lapack.spotrf, lapack.spotri) if a.dtype == torch.float32 else (lapack.dpotrf, lapack.dpotri)
    fortran = a.numpy().T  # the same memory, column-major; `a` is symmetric, so it is the same matrix
    _, info = potrf(fortran, lower=True, overwrite_a=True, clean=False)
    if info != 0:
        raise np.linalg.LinAlgError(f"EASE: G + λI is not positive definite (LAPACK potrf info {info})")
    _, info = potri(fortran, lower=True, overwrite_c=True)
    if info != 0:
        raise np.linalg.LinAlgError(f"EASE: G + λI is singular (LAPACK potri info {info})")
    _mirror_upper_to_lower(a)  # potri wrote the lower triangle of the column-major view: a's upper triangle
    return a


def _mirror_upper_to_lower(a: torch.Tensor, block: int = 1024) -> None:
    """a[i, j] = a[j, i] for i > j, by row blocks (a block's copy is block × n, not n × n)."""
    n = a.shape[0]
    for start in range(0, n, block):
        stop = min(start + block, n)
        a[start:stop, :stop] = torch.where(
            torch.arange(start, stop).unsqueeze(1) > torch.arange(stop).unsqueeze(0),
            a[:stop, start:stop].T,
            a[start:stop, :stop],
        )


class SharedGram:
    """One slot holding the EASEGram of the last fit task, so the EASE models of a λ grid share it; a new
    task (or settings) frees it before building the next, so two dense Gram matrices never coexist."""

    def __init__(self) -> None:
        self._gram: EASEGram | None = None

    def get(self, task: EvalTask, *, solver: str, device: torch.device, dtype: torch.dtype) -> EASEGram:
        g = self._gram
        if g is None or g.task is not task or g.settings != (solver, torch.device(device), dtype):
            self._gram = None
            self._gram = EASEGram(task, solver=solver, device=device, dtype=dtype)
        return self._gram


class EASE:
    """EASE (Steck 2019), closed form: B = I - P diagMat(1 / diag(P)), P = (X^T X + lambda I)^-1, with X the
    binary user x item matrix of the fit data; scores = X_u B. Dense item x item, float32: refuses above
    `max_items` (None: as many items as the memory available at fit time holds, evaluation.memory).

    `solver`: see EASEGram. `shared`: a SharedGram that the models of one λ grid pass around (`ease_grid`)."""

    def __init__(
        self,
        lam: float = 500.0,
        *,
        max_items: int | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        solver: str = "auto",
        shared: SharedGram | None = None,
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
        self.shared = shared
        self.B_: torch.Tensor | None = None

    def fit(self, task: EvalTask) -> EASE:
        refusal = dense_item_refusal(task.num_items, self.max_items, "EASE")
        if refusal:
            raise ValueError(refusal)
        self.B_ = None
        settings = {"solver": self.solver, "device": self.device, "dtype": self.dtype}
        gram = self.shared.get(task, **settings) if self.shared is not None else EASEGram(task, **settings)
        self.B_ = gram.weights(self.lam)
        self._task, self._like = task, self.B_[:0, :0]  # scoring rebuilds only the queried users' rows
        return self

    def score(self, users: np.ndarray) -> torch.Tensor:
        _require_fitted(self, "B_")
        t = self._task
        return self.score_rows(t.user_items_indptr, t.user_items_indices, np.asarray(users, dtype=np.int64))

    def score_rows(self, indptr: np.ndarray, indices: np.ndarray, rows: np.ndarray) -> torch.Tensor:
        """Scores of given rows of a binary query x item CSR (each query's items), e.g. a query that has seen
        more items than the fit rows hold for its user."""
        _require_fitted(self, "B_")
        assert self.B_ is not None
        rows = np.asarray(rows, dtype=np.int64)
        return _csr_rows(indptr, indices, rows, self.B_.shape[0], self._like) @ self.B_

    @classmethod
    def from_weights(cls, weights: torch.Tensor, lam: float) -> EASE:
        """A fitted EASE from its item × item weights (saved `B_`), for `score_rows` (an online scorer)."""
        model = cls(lam, max_items=weights.shape[0], dtype=weights.dtype)
        model.B_, model._like = weights, weights[:0, :0]
        return model


def ease_grid(**settings: Any) -> Callable[..., EASE]:
    """An EASE factory for `tune` (`ease_grid()(lam=...)`) whose models share one EASEGram per fit task: the
    λ grid builds X and XᵀX once for validation and once for test, not once per λ."""
    shared = SharedGram()
    return lambda **params: EASE(**settings, **params, shared=shared)


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
    """Chosen settings (best validation metric, first in grid order on ties) and the two reports; `seconds`
    (fit + score) aligned with `trials`, the grid points `skipped` by the budget, and the test refit's seconds."""

    params: dict[str, Any]
    validation: EvalResult
    test: EvalResult
    trials: list[tuple[dict[str, Any], EvalResult]]
    seconds: list[float] = dataclasses.field(default_factory=list)
    skipped: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    test_seconds: float = 0.0

    def summary(self, metric: str = "ndcg@10") -> dict[str, Any]:
        """JSON-able: the chosen point, each point that ran (validation `metric`, seconds), the skipped ones."""
        ran = [{"params": p, metric: r[metric], "seconds": round(s, 2)} for (p, r), s in zip(self.trials, self.seconds)]
        return {"chosen": self.params, "ran": ran, "skipped": self.skipped, "test_seconds": round(self.test_seconds, 2)}


def _grid_points(grid: Mapping[str, Sequence[Any]] | Iterable[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    if grid is None:
        return [{}]
    if isinstance(grid, Mapping):
        keys = list(grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    points = [dict(p) for p in grid]
    return points or [{}]


def _fit_and_evaluate(
    factory: Callable[..., Baseline], params: dict[str, Any], task: EvalTask, ks: Sequence[int], batch_size: int
) -> tuple[EvalResult, float]:
    t0 = time.perf_counter()
    model = factory(**params).fit(task)
    result = evaluate(model.score, task, ks=ks, batch_size=batch_size)
    return result, time.perf_counter() - t0


def _line(name: str, what: str, params: dict, result: EvalResult, metric: str, seconds: float) -> str:
    return f"{_prefix(name)}{what} {params}: {metric} {result[metric]:.4f} ({seconds:.1f}s)"


def _prefix(name: str) -> str:
    return f"{name} " if name else ""


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
    name: str = "",
    budget_seconds: float | None = None,
) -> TuneResult:
    """Choose settings on the validation phase by `metric`, refit them on train + validation, report test.

    `grid` is either {param: [values]} (cartesian product) or a list of {param: value} dicts, tried in order
    (put the most promising first); `baseline_factory(**params)` must return an unfitted baseline. `log` gets
    one line per grid point and one for the refit ("<name> validation {params}: ndcg@10 0.0446 (3.1s)").
    `budget_seconds`: a point starts only if the grid would still end within it at the slowest point's pace
    so far (the first point always runs); the rest are skipped, said in the log and in `skipped`.
    """
    say = log if log is not None else (lambda line: None)
    val_task = EvalTask.from_splits(splits, "validation", num_users=num_users, num_items=num_items)
    test_task = EvalTask.from_splits(splits, "test", num_users=val_task.num_users, num_items=val_task.num_items)
    points = _grid_points(grid)
    trials: list[tuple[dict[str, Any], EvalResult]] = []
    seconds: list[float] = []
    for i, params in enumerate(points):
        if budget_seconds is not None and seconds and sum(seconds) + max(seconds) > budget_seconds:
            spent = f"{sum(seconds):.0f}s spent, the slowest point took {max(seconds):.0f}s"
            say(f"{_prefix(name)}grid: budget {budget_seconds:g}s ({spent}): skipped {points[i:]}")
            break
        result, sec = _fit_and_evaluate(baseline_factory, params, val_task, ks, batch_size)
        if metric not in result:
            raise ValueError(f"metric {metric!r} not among {list(result)}; add its cut-off to ks")
        trials.append((params, result))
        seconds.append(sec)
        say(_line(name, "validation", params, result, metric, sec))
    best = max(trials, key=lambda t: t[1][metric])  # max keeps the first of equal values: grid order on ties
    test, test_seconds = _fit_and_evaluate(baseline_factory, best[0], test_task, ks, batch_size)
    say(_line(name, "test refit", best[0], test, metric, test_seconds))
    return TuneResult(best[0], best[1], test, trials, seconds, points[len(trials) :], test_seconds)


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
                grid = {"lam": [50.0, 200.0, 500.0, 1000.0]}
                sizes = {"num_users": num_users, "num_items": num_items}
                say = lambda line: print(f"  {line}", flush=True)  # noqa: E731
                tuned = tune(ease_grid(), grid, splits, **sizes, log=say, name="EASE")
                print(f"  EASE grid {sum(tuned.seconds):.1f}s, test refit {tuned.test_seconds:.1f}s")
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
