"""The test-phase report of the funnel: the Two Tower alone, the two-stage list, MostPopular, LastItemMarkov, EASE
and Spark ALS (tuned on validation), all through the one evaluator, as a table, JSON and a bar chart."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from recsys_assets.data import schema as S

TWO_STAGE = "Two-stage (retrieval → DLRM)"
RETRIEVAL_ORDER = "Retrieval (pool order)"
SERVED = "Served list"
# in a recommendations folder: every test candidate with its pool rank and DLRM score (both stages' orders)
CANDIDATE_SCORES_FILE = "candidate_scores.parquet"


def metrics_markdown(rows: dict[str, dict[str, float]]) -> str:
    """A markdown table: one row per model, one column per metric."""
    keys = sorted({k for m in rows.values() for k in m})
    lines = ["| | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.4f}" if k in m else "" for k in keys) + " |")
    return "\n".join(lines)


@dataclasses.dataclass
class EvaluationReport:
    rows: dict[str, dict[str, float]]  # display name (settings in parentheses) -> metrics
    seconds: dict[str, float]  # stage -> seconds ("<baseline> grid" / "<baseline> test refit" for tuned ones)
    chosen: dict[str, dict]  # tuned baseline -> its chosen settings
    test_users: int
    dlrm_run_id: str
    served_stage: str = "dlrm"
    split: str = S.SPLIT_DESCRIPTIONS["timestamp"]  # how the held-out rows were chosen
    grids: dict[str, dict] = dataclasses.field(default_factory=dict)  # tuned baseline -> TuneResult.summary()

    @property
    def table(self) -> str:
        return metrics_markdown(self.rows)

    def flat(self) -> dict[str, float]:
        """ "<model>_<metric>": "Spark ALS (rank=8, ...)" + "ndcg@10" -> "spark_als_ndcg@10"."""
        flat = {}
        for name, metrics in self.rows.items():
            key = name.split(" (")[0].lower().replace(" ", "_").replace("-", "_")
            for m, v in metrics.items():
                flat[f"{key}_{m}"] = float(v)
        return flat


def evaluate_funnel(
    dataset_root: str | Path,
    two_tower_scorer: Callable,
    candidates_root: str | Path,
    recommendations_root: str | Path,
    *,
    top_k: int,
    session,
    ease: bool,
    ease_lambdas: Sequence[float],
    ease_max_items: int | None,
    als: bool,
    als_ranks: Sequence[int],
    als_reg_params: Sequence[float],
    als_alphas: Sequence[float],
    als_max_iter: int,
    als_budget_seconds: float | None = None,
    sasrec: bool = False,
    sasrec_epochs: Sequence[int] = (5, 10),
    log: Callable[[str], None] = print,
) -> EvaluationReport:
    """Test phase, full ranking with train and validation items excluded. `session`: a SparkSession for ALS
    (unused when `als` is off). `ease`, `als` and `sasrec` switch those baselines on or off. EASE steps aside above
    `ease_max_items` items (None: what the memory available now holds, evaluation.memory), with the reason logged,
    before allocating. The ALS grid runs in order and skips its remaining points past `als_budget_seconds`. SASRec
    (off by default: minutes of training) has its epochs chosen from `sasrec_epochs` on validation. `log` gets a
    line per stage and per grid point."""
    from recsys_assets.data.splits import load_query_splits
    from recsys_assets.evaluation.baselines import LastItemMarkov, MostPopular, SparkALS, ease_grid
    from recsys_assets.evaluation.memory import dense_item_refusal
    from recsys_assets.evaluation.protocol import EvalTask, evaluate

    meta = S.DatasetMeta.load(S.DatasetPaths(Path(dataset_root)).meta)
    splits = load_query_splits(dataset_root)  # read once: the evaluator's columns + the query tower's history
    frame = splits[[S.USER, S.ITEM, S.TIMESTAMP, S.SPLIT]]
    n_users, n_items = meta.num_users, meta.num_items
    task = EvalTask.from_splits(frame, "test", num_users=n_users, num_items=n_items)
    rows: dict[str, dict[str, float]] = {}
    stages = _Stages(log)
    timed = stages.timed

    rows["Two Tower"] = timed("Two Tower", lambda: evaluate(two_tower_scorer(splits), task).as_dict())
    recs = pd.read_parquet(Path(recommendations_root) / "recommendations.parquet")
    served = str(recs["served_stage"].iloc[0]) if len(recs) else "dlrm"
    scored = pd.read_parquet(Path(recommendations_root) / CANDIDATE_SCORES_FILE)
    scored["pool_order"] = -scored["pool_rank"].astype(np.float32)
    pool_hr = _retrieval_hit_rate(candidates_root, task)
    for name, column in ((RETRIEVAL_ORDER, "pool_order"), (TWO_STAGE, "dlrm_score")):
        metrics = timed(name, lambda c=column: evaluate(_list_scores(scored, n_items, c), task).as_dict())
        rows[name] = {m: v for m, v in metrics.items() if m.endswith(f"@{top_k}")} | pool_hr
    rows[f"{SERVED} ({served})"] = dict(rows[TWO_STAGE if served == "dlrm" else RETRIEVAL_ORDER])
    rows["MostPopular"] = timed("MostPopular", lambda: evaluate(MostPopular().fit(task).score, task).as_dict())
    rows["LastItemMarkov"] = timed("LastItemMarkov", lambda: evaluate(LastItemMarkov().fit(task).score, task).as_dict())
    tune_on = {"splits": frame, "num_users": n_users, "num_items": n_items}
    refusal = dense_item_refusal(n_items, ease_max_items, "EASE baseline") if ease else None
    if ease and refusal is None:
        tuned = stages.tuned("EASE", ease_grid(max_items=ease_max_items), {"lam": list(ease_lambdas)}, **tune_on)
        rows[f"EASE (λ={tuned.params['lam']:g})"] = tuned.test.as_dict()
    elif refusal is not None:
        log(refusal)
    if als:
        grid = {"rank": list(als_ranks), "reg_param": list(als_reg_params), "alpha": list(als_alphas)}
        als_factory = lambda **p: SparkALS(session, max_iter=als_max_iter, seed=0, **p)  # noqa: E731
        tuned = stages.tuned("Spark ALS", als_factory, grid, **tune_on, budget_seconds=als_budget_seconds)
        rows[f"Spark ALS ({', '.join(f'{k}={v}' for k, v in tuned.params.items())})"] = tuned.test.as_dict()
    if sasrec:
        import torch

        from recsys_assets.evaluation.sasrec import SASRec

        device = "cuda" if torch.cuda.is_available() else "cpu"
        log(f"SASRec: choosing epochs from {list(sasrec_epochs)} on validation, then refit ({device})")
        sasrec_factory = lambda **p: SASRec(device=device, log=log, **p)  # noqa: E731
        tuned = stages.tuned("SASRec", sasrec_factory, {"epochs": list(sasrec_epochs)}, **tune_on)
        rows[f"SASRec (epochs={tuned.params['epochs']})"] = tuned.test.as_dict()
    dlrm_run_id = str(recs["dlrm_run_id"].iloc[0]) if len(recs) else ""
    return EvaluationReport(
        rows,
        stages.seconds,
        {name: g["chosen"] for name, g in stages.grids.items()},
        int(task.n_queries),
        dlrm_run_id,
        served_stage=served,
        split=meta.split_description,
        grids=stages.grids,
    )


class _Stages:
    """Each stage's seconds and a progress line for it (the report ran minutes without a word before)."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log
        self.seconds: dict[str, float] = {}
        self.grids: dict[str, dict] = {}

    def timed(self, name: str, fn: Callable):
        t0 = time.time()
        out = fn()
        self.seconds[name] = time.time() - t0
        shown = f" test ndcg@10 {out['ndcg@10']:.4f}" if isinstance(out, dict) and "ndcg@10" in out else ""
        self.log(f"evaluation: {name}{shown} ({self.seconds[name]:.1f}s)")
        return out

    def tuned(self, name: str, factory: Callable, grid: dict, **tune_kwargs):
        """`tune` with a line per grid point; seconds of the whole, of the grid and of the test refit."""
        from recsys_assets.evaluation.baselines import tune

        tuned = self.timed(name, lambda: tune(factory, grid, log=self.log, name=name, **tune_kwargs))
        self.seconds[f"{name} grid"] = sum(tuned.seconds)
        self.seconds[f"{name} test refit"] = tuned.test_seconds
        self.grids[name] = tuned.summary()
        return tuned


def _retrieval_hit_rate(candidates_root: str | Path, task) -> dict[str, float]:
    """{"retrieval_hr@<k>": share of test users whose target is among their k test candidates}."""
    cand = pd.read_parquet(Path(candidates_root) / "candidates.parquet")
    cand = cand[cand["phase"] == "test"]
    k = int(cand.groupby("user").size().max()) if len(cand) else 0
    hit = cand.merge(pd.Series(task.targets, index=task.users).rename("target"), left_on="user", right_index=True)
    retrieved_hits = hit.loc[hit["item"] == hit["target"], "user"].nunique()
    return {f"retrieval_hr@{k}": float(retrieved_hits / max(1, task.n_queries))}


def _list_scores(frame: pd.DataFrame, num_items: int, score_col: str):
    """score_fn for the evaluator from a (user, item, score) list: listed items get their score, others -inf."""
    import torch

    by_user = {u: (g["item"].to_numpy(np.int64), g[score_col].to_numpy(np.float32)) for u, g in frame.groupby("user")}

    def score(users: np.ndarray) -> torch.Tensor:
        out = torch.full((len(users), num_items), -torch.inf)
        for i, u in enumerate(users):
            if int(u) in by_user:
                items, s = by_user[int(u)]
                out[i, torch.as_tensor(items)] = torch.as_tensor(s)
        return out

    return score


def write_report(report: EvaluationReport, out_dir: Path, warn: Callable[[str], None] = print) -> Path | None:
    """evaluation.json, evaluation.md and the bar chart evaluation.png (returned; None when it could not be
    drawn: a picture never fails the evaluation)."""
    (out_dir / "evaluation.json").write_text(
        json.dumps(
            {
                "phase": "test",
                "split": report.split,
                "served_stage": report.served_stage,
                "users": report.test_users,
                "rows": report.rows,
                "chosen": report.chosen,
                "seconds": report.seconds,
                "grids": report.grids,
            },
            indent=2,
            default=float,
        )
    )
    (out_dir / "evaluation.md").write_text(
        f"Test phase, {report.test_users} users; split: {report.split}; served stage: {report.served_stage}.\n\n"
        + report.table
        + "\n"
    )
    try:
        from recsys_assets.evaluation.plots import metrics_bar_chart_png

        return metrics_bar_chart_png(
            {n.split(" (")[0]: m for n, m in report.rows.items()},
            out_dir / "evaluation.png",
            title=f"test phase, {report.test_users} users",
        )
    except Exception as exc:  # noqa: BLE001
        warn(f"bar chart not rendered: {exc}")
        return None
