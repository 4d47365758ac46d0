"""The evaluation's cost: EASE's λ grid shares one Gram matrix per fit task (same numbers as a direct inverse),
the tuner says each grid point's metric and seconds and keeps a time budget, and the funnel report gives each
stage's seconds."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from recsys_assets.evaluation import EvalTask, evaluate
from recsys_assets.evaluation.baselines import EASE, EASEGram, MostPopular, SharedGram, ease_grid, tune

LAMBDAS = (0.5, 5.0, 50.0, 500.0)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_evaluation import _random_splits  # noqa: E402


def _dense_x(task: EvalTask) -> torch.Tensor:
    x = torch.zeros((task.num_users, task.num_items), dtype=torch.float64)
    x[task.fit["user"].to_numpy(), task.fit["item"].to_numpy()] = 1.0
    return x


def _direct_weights(task: EvalTask, lam: float) -> torch.Tensor:
    """EASE's B from the plain inverse: B = I - P diag(1/diag(P)), P = (XᵀX + λI)⁻¹."""
    x = _dense_x(task)
    p = torch.linalg.inv(x.T @ x + lam * torch.eye(task.num_items, dtype=torch.float64))
    return torch.eye(task.num_items, dtype=torch.float64) - p / p.diagonal().unsqueeze(0)


# 30 users x 80 items takes the Woodbury form, 120 x 60 the Gram one: both must match the direct inverse, exactly in
# float64 (the algebra) and within float32's precision in the default dtype (what the product runs)
@pytest.mark.parametrize("n_users, n_items", [(30, 80), (120, 60)])
@pytest.mark.parametrize(
    "dtype, rtol, atol", [(torch.float64, 1e-8, 1e-10), (torch.float32, 1e-4, 1e-5)], ids=["float64", "float32"]
)
def test_shared_gram_weights_equal_the_direct_inverse_for_every_lambda(
    n_users: int, n_items: int, dtype: torch.dtype, rtol: float, atol: float
) -> None:
    task = EvalTask.from_splits(_random_splits(n_users, n_items, 12, seed=1), "test")
    gram = EASEGram(task, dtype=dtype)
    assert gram.woodbury == (2 * n_users <= n_items)
    x = _dense_x(task)
    for lam in LAMBDAS:
        direct_p = torch.linalg.inv(x.T @ x + lam * torch.eye(n_items, dtype=torch.float64))
        inverse = gram.inverse(lam)
        assert inverse.dtype == dtype
        torch.testing.assert_close(inverse.double(), direct_p, rtol=rtol * 10, atol=atol * 10)
        weights = gram.weights(lam)
        torch.testing.assert_close(weights.double(), _direct_weights(task, lam), rtol=rtol, atol=atol)
        assert torch.all(weights.diagonal() == 0)
        # the sparse scoring of EASE gives X_u B
        model = EASE(lam, shared=SharedGram(), dtype=dtype).fit(task)
        users = np.arange(n_users)
        torch.testing.assert_close(model.score(users).double(), x @ weights.double(), rtol=rtol, atol=atol)


def test_a_lambda_grid_builds_the_gram_once_per_fit_task() -> None:
    splits = _random_splits(40, 30, 10, seed=2)
    shared = SharedGram()
    seen = []

    def factory(lam: float) -> EASE:
        seen.append(shared._gram)  # the slot before this model's fit: the previous fit's Gram
        return EASE(lam, shared=shared)

    tune(factory, {"lam": list(LAMBDAS)}, splits)
    validation_gram, test_gram = seen[1], shared._gram
    assert seen[0] is None and all(g is validation_gram for g in seen[1:])  # one for the 4 validation fits
    assert validation_gram.task.phase == "validation" and test_gram.task.phase == "test"
    assert test_gram is not validation_gram


def test_tuned_ease_choice_and_metrics_equal_the_direct_inverse() -> None:
    splits = _random_splits(60, 40, 10, seed=3)
    tuned = tune(ease_grid(), {"lam": list(LAMBDAS)}, splits)
    val_task, test_task = (EvalTask.from_splits(splits, phase) for phase in ("validation", "test"))

    def direct(task: EvalTask, lam: float):
        b = _direct_weights(task, lam)
        return evaluate(lambda users: _dense_x(task)[users] @ b, task)

    for (params, result), lam in zip(tuned.trials, LAMBDAS):
        assert params == {"lam": lam}
        assert dict(result) == pytest.approx(dict(direct(val_task, lam)), abs=1e-12)
    best = max(LAMBDAS, key=lambda lam: direct(val_task, lam)["ndcg@10"])
    assert tuned.params == {"lam": best}
    assert dict(tuned.test) == pytest.approx(dict(direct(test_task, best)), abs=1e-12)


class _SlowPopular(MostPopular):
    """MostPopular whose fit takes `seconds` (a grid point of known cost)."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def fit(self, task: EvalTask) -> _SlowPopular:
        time.sleep(self.seconds)
        return super().fit(task)


def test_tune_says_each_point_and_skips_what_the_budget_cannot_hold() -> None:
    splits = _random_splits(30, 20, 8, seed=4)
    grid = [{"seconds": 0.3}, {"seconds": 0.01}, {"seconds": 0.02}]
    lines: list[str] = []
    tuned = tune(_SlowPopular, grid, splits, log=lines.append, name="Slow", budget_seconds=0.5)
    # after the first point (0.3 s) another at that pace would end past 0.5 s: the rest is skipped
    assert [p for p, _ in tuned.trials] == grid[:1] and tuned.skipped == grid[1:]
    assert re.fullmatch(r"Slow validation \{'seconds': 0\.3\}: ndcg@10 \d\.\d{4} \(0\.\ds\)", lines[0])
    assert "budget 0.5s" in lines[1] and "skipped [{'seconds': 0.01}, {'seconds': 0.02}]" in lines[1]
    assert lines[2].startswith("Slow test refit {'seconds': 0.3}: ndcg@10 ")
    summary = tuned.summary()
    assert summary["skipped"] == grid[1:] and summary["ran"][0]["seconds"] >= 0.3
    json.dumps(summary)  # metadata-ready
    # without a budget every point runs, and each has its seconds
    full = tune(_SlowPopular, grid, splits, log=lines.append, budget_seconds=None)
    assert len(full.trials) == len(full.seconds) == 3 and full.skipped == [] and full.seconds[0] >= 0.3


def test_choose_lambda_is_unchanged_and_says_each_lambda() -> None:
    from recsys_assets.serving.item_item import choose_lambda

    splits = _random_splits(60, 40, 10, seed=5)
    lines: list[str] = []
    lam, results = choose_lambda(splits, num_users=60, num_items=40, lambdas=LAMBDAS, log=lines.append)
    task = EvalTask.from_splits(splits, "validation", num_users=60, num_items=40)
    for value in LAMBDAS:
        b = _direct_weights(task, value)
        direct = evaluate(lambda users, b=b: _dense_x(task)[users] @ b, task)["ndcg@10"]
        assert results[value] == pytest.approx(direct, abs=1e-6)  # float32 weights
    assert lam == max(results, key=results.get)
    assert len(lines) == len(LAMBDAS)
    assert all(re.search(r"EASE λ=\S+ validation NDCG@10 \d\.\d{4} \(\d+\.\ds\)$", line) for line in lines)
    # one λ is not a choice: no validation fit (a benchmark's later seeds pin the first seed's λ)
    assert choose_lambda(splits, num_users=60, num_items=40, lambdas=[7.0], log=lines.append) == (7.0, {})
    assert lines[-1].endswith("λ=7 given (one value: nothing to choose, no validation fit)")


# ------------------------------------------------------------------------------------ the funnel report
def _write_funnel_inputs(root: Path, splits: pd.DataFrame, n_users: int, n_items: int) -> tuple[Path, Path, Path]:
    """A dataset folder (meta.json + splits/), a candidates folder and a recommendations folder, as the
    upstream assets write them, from a splits table."""
    from recsys_assets.data import schema as S

    data, cands, recs = root / "data", root / "candidates", root / "recommendations"
    for d in (data, cands, recs):
        d.mkdir()
    meta = S.DatasetMeta(
        num_users=n_users,
        num_items=n_items,
        num_categories=1,
        user_attribute_cardinalities={},
        history_length=4,
        rows=splits["split"].value_counts().to_dict(),
    )
    S.DatasetPaths(data).meta.write_text(meta.to_json())
    table = splits.sort_values(["user", "timestamp", "item"]).assign(history=[[-1] * 4] * len(splits), history_len=0)
    table = table.assign(position=table.groupby("user").cumcount() + 1, ranker_window=False)
    S.DatasetPaths(data).splits.mkdir()
    table.to_parquet(S.DatasetPaths(data).splits / "part-0.parquet", index=False)
    test = splits[splits["split"] == "test"]
    pool = pd.DataFrame(
        {"phase": "test", "user": np.repeat(test["user"].to_numpy(), 3), "item": np.tile([0, 1, 2], len(test))}
    )
    pool.to_parquet(cands / "candidates.parquet", index=False)
    scored = pool.assign(pool_rank=np.tile([0, 1, 2], len(test)), dlrm_score=np.tile([0.1, 0.3, 0.2], len(test)))
    scored.drop(columns="phase").to_parquet(recs / "candidate_scores.parquet", index=False)
    pd.DataFrame({"user": test["user"], "served_stage": "dlrm", "dlrm_run_id": "run"}).to_parquet(
        recs / "recommendations.parquet", index=False
    )
    return data, cands, recs


def test_the_funnel_report_gives_each_stage_seconds_and_bounds_the_als_grid(spark, tmp_path: Path) -> None:
    from recsys_assets.evaluation.report import evaluate_funnel, write_report

    splits = _random_splits(40, 30, 8, seed=6)
    data, cands, recs = _write_funnel_inputs(tmp_path, splits, 40, 30)

    def popularity_scorer(frame: pd.DataFrame):  # stands in for the Two Tower: scores from the splits it is given
        return MostPopular().fit(EvalTask.from_splits(frame[["user", "item", "timestamp", "split"]], "test")).score

    lines: list[str] = []
    report = evaluate_funnel(
        data,
        popularity_scorer,
        cands,
        recs,
        top_k=10,
        session=spark,
        ease=True,
        ease_lambdas=[5.0, 50.0],
        ease_max_items=100,
        als=True,
        als_ranks=[4, 2],
        als_reg_params=[0.1],
        als_alphas=[1.0],
        als_max_iter=2,
        als_budget_seconds=0.0,  # the first point always runs; the second is over budget
        log=lines.append,
    )
    for stage in ("Two Tower", "MostPopular", "LastItemMarkov", "EASE", "EASE grid", "EASE test refit"):
        assert report.seconds[stage] >= 0.0, stage
    assert report.seconds["EASE"] >= report.seconds["EASE grid"] + report.seconds["EASE test refit"]
    assert [r["params"] for r in report.grids["EASE"]["ran"]] == [{"lam": 5.0}, {"lam": 50.0}]
    als = report.grids["Spark ALS"]
    assert [r["params"]["rank"] for r in als["ran"]] == [4] and [p["rank"] for p in als["skipped"]] == [2]
    assert report.chosen["Spark ALS"] == {"rank": 4, "reg_param": 0.1, "alpha": 1.0}
    assert any(line.startswith("evaluation: MostPopular test ndcg@10 ") for line in lines)
    assert sum(line.startswith("EASE validation {'lam': ") for line in lines) == 2
    assert any(line.startswith("Spark ALS grid: budget 0s") and "'rank': 2" in line for line in lines)
    write_report(report, tmp_path)
    written = json.loads((tmp_path / "evaluation.json").read_text())
    assert written["grids"]["Spark ALS"]["skipped"] == als["skipped"] and "EASE grid" in written["seconds"]


def test_switched_off_baselines_are_neither_fitted_nor_reported(tmp_path: Path) -> None:
    # what benchmarks/quality.py asks of its later seeds: their EASE / ALS / SASRec rows come from the first run
    from recsys_assets.evaluation.report import evaluate_funnel

    splits = _random_splits(40, 30, 8, seed=6)
    data, cands, recs = _write_funnel_inputs(tmp_path, splits, 40, 30)

    def popularity_scorer(frame: pd.DataFrame):
        return MostPopular().fit(EvalTask.from_splits(frame[["user", "item", "timestamp", "split"]], "test")).score

    switches = dict(ease_lambdas=[5.0], ease_max_items=100, als_ranks=[4], als_reg_params=[0.1], als_alphas=[1.0])
    off = evaluate_funnel(
        data, popularity_scorer, cands, recs, top_k=10, session=None, ease=False, als=False, als_max_iter=2, **switches
    )
    assert not any(name.startswith(("EASE", "Spark ALS", "SASRec")) for name in off.rows), list(off.rows)
    assert not any(stage.startswith("EASE") for stage in off.seconds), list(off.seconds)
    assert {"Two Tower", "MostPopular", "LastItemMarkov"} <= set(off.rows)
    on = evaluate_funnel(
        data, popularity_scorer, cands, recs, top_k=10, session=None, ease=True, als=False, als_max_iter=2, **switches
    )
    assert [name for name in on.rows if name.startswith("EASE")] == ["EASE (λ=5)"]
