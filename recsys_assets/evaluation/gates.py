"""The funnel's quality gates: the evidence the DLRM run records (its holdout lists in both orders) and the
verdicts of the blocking checks, as CheckOutcomes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from recsys_assets.data import schema as S
from recsys_assets.data.checks import CheckOutcome

EVAL_COLUMNS = [S.USER, S.ITEM, S.TIMESTAMP, S.SPLIT]


def holdout_gate(holdout_path: str | Path, dlrm_scores: np.ndarray, *, min_gain: float, k: int) -> dict[str, Any]:
    """On the holdout users' candidate lists: HR@k / NDCG@k of the DLRM order ("two_stage") and of the Two
    Tower's own order ("two_tower"), the number of lists and the required gain (the gate's evidence)."""
    import pandas as pd

    from recsys_assets.evaluation.lists import compare_orders

    holdout = pd.read_parquet(holdout_path, columns=[S.QUERY_ID, S.LABEL, "retrieval_score"])
    qids = holdout[S.QUERY_ID].to_numpy()
    orders = compare_orders(
        qids,
        holdout[S.LABEL].to_numpy(),
        {"two_stage": dlrm_scores, "two_tower": holdout["retrieval_score"].to_numpy()},
        (k,),
    )
    return {
        "holdout_two_stage": orders["two_stage"],
        "holdout_two_tower": orders["two_tower"],
        "holdout_queries": int(len(np.unique(qids))),
        "min_gain": min_gain,
    }


def two_stage_at_least_two_tower(gate: dict[str, Any], k: int) -> CheckOutcome:
    """`holdout_gate`'s evidence: the DLRM order's NDCG@k >= the Two Tower order's + min_gain."""
    metric = f"ndcg@{k}"
    two_stage = float(gate["holdout_two_stage"][metric])
    two_tower = float(gate["holdout_two_tower"][metric])
    min_gain = float(gate.get("min_gain", 0.0))
    ok = two_stage >= two_tower + min_gain
    return CheckOutcome(
        passed=ok,
        description=None
        if ok
        else (
            f"two-stage NDCG@{k} {two_stage:.4f} < Two Tower alone {two_tower:.4f} + required gain {min_gain:g} on "
            f"{gate['holdout_queries']} holdout users' validation lists: the ranker does not improve the list"
        ),
        metadata={
            f"two_stage_{metric}": two_stage,
            f"two_tower_{metric}": two_tower,
            "required_gain": min_gain,
            "holdout_queries": int(gate["holdout_queries"]),
        },
    )


def two_tower_beats_most_popular(model_root: str | Path, dataset_root: str | Path, k: int) -> CheckOutcome:
    """The Two Tower's validation NDCG@k (its result.json) > MostPopular's, same split, same evaluator."""
    from recsys_assets.data.splits import load_splits_frame
    from recsys_assets.evaluation.baselines import MostPopular
    from recsys_assets.evaluation.protocol import EvalTask, evaluate

    metric = f"ndcg@{k}"
    model_ndcg = float(json.loads((Path(model_root) / "result.json").read_text())["validation"][metric])
    meta = S.DatasetMeta.load(S.DatasetPaths(Path(dataset_root)).meta)
    task = EvalTask.from_splits(
        load_splits_frame(dataset_root, EVAL_COLUMNS), "validation", num_users=meta.num_users, num_items=meta.num_items
    )
    pop = float(evaluate(MostPopular().fit(task).score, task)[metric])
    ok = model_ndcg > pop
    return CheckOutcome(
        passed=ok,
        description=None
        if ok
        else f"Two Tower validation NDCG@{k} {model_ndcg:.4f} does not beat MostPopular {pop:.4f}",
        metadata={f"two_tower_validation_{metric}": model_ndcg, f"most_popular_validation_{metric}": pop},
    )


def ranking_data_has_no_test_period(ranking_root: str | Path, dataset_root: str | Path) -> CheckOutcome:
    """Training and holdout pairs are validation-phase queries whose positive is the user's validation item and
    whose query time is not later than it."""
    import pandas as pd

    from recsys_assets.data.splits import load_splits_frame

    frame = load_splits_frame(dataset_root, EVAL_COLUMNS)
    val = frame[frame[S.SPLIT] == "validation"].set_index(S.USER)
    problems = {}
    for name in ("train", "holdout"):
        pairs = pd.read_parquet(
            Path(ranking_root) / f"{name}.parquet", columns=["phase", "user", "item", "label", "query_timestamp"]
        )
        problems[f"{name}_non_validation_phase"] = int((pairs["phase"] != "validation").sum())
        pos = pairs[pairs["label"] > 0.5]
        problems[f"{name}_positive_not_validation_item"] = int(
            (pos["item"].to_numpy() != val.loc[pos["user"], S.ITEM].to_numpy()).sum()
        )
        problems[f"{name}_query_after_validation_time"] = int(
            (pairs["query_timestamp"].to_numpy() > val[S.TIMESTAMP].reindex(pairs["user"]).to_numpy()).sum()
        )
    ok = not any(problems.values())
    return CheckOutcome(ok, None if ok else f"test-period leak: {problems}", {"violations": problems})
