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
    """On the holdout users' candidate lists: HR@k / NDCG@k of the DLRM order ("two_stage") and of the
    retrieval order ("retrieval": the pool rank, the Two Tower's order merged with the item-item source's), the
    number of lists and the required gain (the evidence that decides the served stage)."""
    import pandas as pd

    from recsys_assets.evaluation.lists import compare_orders

    holdout = pd.read_parquet(holdout_path, columns=[S.QUERY_ID, S.LABEL, "pool_rank"])
    qids = holdout[S.QUERY_ID].to_numpy()
    orders = compare_orders(
        qids,
        holdout[S.LABEL].to_numpy(),
        {"two_stage": dlrm_scores, "retrieval": -holdout["pool_rank"].to_numpy().astype(np.float64)},
        (k,),
    )
    return {
        "holdout_two_stage": orders["two_stage"],
        "holdout_retrieval": orders["retrieval"],
        "holdout_queries": int(len(np.unique(qids))),
        "min_gain": min_gain,
    }


def served_stage(gate: dict[str, Any], k: int) -> tuple[str, str]:
    """Which list is served, and why: "dlrm" when the DLRM order's holdout NDCG@k >= the retrieval order's +
    min_gain, else "retrieval" (the ranker does not improve the list, so it is not used)."""
    metric = f"ndcg@{k}"
    ranker, retrieval = float(gate["holdout_two_stage"][metric]), float(gate["holdout_retrieval"][metric])
    min_gain = float(gate.get("min_gain", 0.0))
    evidence = (
        f"on {gate['holdout_queries']} holdout users' validation lists, DLRM order NDCG@{k} {ranker:.4f} vs "
        f"retrieval order {retrieval:.4f} (required gain {min_gain:g})"
    )
    if ranker >= retrieval + min_gain:
        return "dlrm", f"the DLRM order is served: {evidence}"
    return "retrieval", f"the retrieval order is served, the ranker does not improve it: {evidence}"


def served_list_beats_most_popular(
    gate: dict[str, Any], ranking_root: str | Path, dataset_root: str | Path, k: int
) -> CheckOutcome:
    """The served stage's validation lists (holdout users) beat MostPopular on the same users' validation
    rows (NDCG@k, the one evaluator's metrics; a list without the target counts as a miss)."""
    import pandas as pd

    from recsys_assets.data.splits import load_splits_frame
    from recsys_assets.evaluation.baselines import MostPopular
    from recsys_assets.evaluation.protocol import EvalTask, evaluate, metrics_from_ranks

    metric = f"ndcg@{k}"
    stage, why = served_stage(gate, k)
    served = float(gate["holdout_two_stage" if stage == "dlrm" else "holdout_retrieval"][metric])
    holdout_users = pd.read_parquet(Path(ranking_root) / "holdout.parquet", columns=[S.USER])[S.USER].unique()
    meta = S.DatasetMeta.load(S.DatasetPaths(Path(dataset_root)).meta)
    task = EvalTask.from_splits(
        load_splits_frame(dataset_root, EVAL_COLUMNS), "validation", num_users=meta.num_users, num_items=meta.num_items
    )
    result = evaluate(MostPopular().fit(task).score, task, ks=(k,))
    popular = float(metrics_from_ranks(result.ranks[np.isin(result.users, holdout_users)], (k,))[metric])
    ok = served > popular
    return CheckOutcome(
        passed=ok,
        description=None
        if ok
        else (
            f"the served list ({stage}) does not beat MostPopular on validation: NDCG@{k} {served:.4f} <= "
            f"{popular:.4f} on {len(holdout_users)} holdout users, so no recommendations are published ({why})"
        ),
        metadata={
            "served_stage": stage,
            "why": why,
            f"served_validation_{metric}": served,
            f"most_popular_validation_{metric}": popular,
            "holdout_users": int(len(holdout_users)),
        },
    )


def two_stage_at_least_two_tower(gate: dict[str, Any], k: int) -> CheckOutcome:
    """`holdout_gate`'s evidence: the DLRM order's NDCG@k >= the retrieval order's + min_gain."""
    metric = f"ndcg@{k}"
    two_stage = float(gate["holdout_two_stage"][metric])
    two_tower = float(gate["holdout_retrieval"][metric])  # the retrieval order
    min_gain = float(gate.get("min_gain", 0.0))
    ok = two_stage >= two_tower + min_gain
    return CheckOutcome(
        passed=ok,
        description=None
        if ok
        else (
            f"two-stage NDCG@{k} {two_stage:.4f} < retrieval order {two_tower:.4f} + required gain {min_gain:g} on "
            f"{gate['holdout_queries']} holdout users' validation lists: the ranker does not improve the list, so "
            "the retrieval order is served"
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
