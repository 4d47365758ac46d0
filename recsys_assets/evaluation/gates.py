"""The funnel's quality gates: the evidence the DLRM run records (its holdout lists in both orders) and the
verdicts of the blocking checks, as CheckOutcomes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from recsys_assets.data import schema as S
from recsys_assets.data.checks import CheckOutcome
from recsys_assets.data.ranking import QUERY_POSITION

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
    """The training and holdout pairs are queries of a phase before test (data/phases.py): each query's row is
    not a test row, its positive is that row's item and its query time that row's time."""
    import pandas as pd

    from recsys_assets.data.splits import load_splits_frame

    rows = load_splits_frame(dataset_root, [S.USER, S.POSITION, S.ITEM, S.TIMESTAMP, S.SPLIT])
    rows = rows.set_index([S.USER, S.POSITION]).sort_index()
    table_phases = json.loads((Path(ranking_root) / "meta.json").read_text())["phases"]
    problems = {}
    for name in ("train", "holdout"):
        columns = ["phase", S.USER, S.ITEM, S.LABEL, "query_timestamp", QUERY_POSITION]
        pairs = pd.read_parquet(Path(ranking_root) / f"{name}.parquet", columns=columns)
        at = rows.reindex(pd.MultiIndex.from_arrays([pairs[S.USER], pairs[QUERY_POSITION]]))
        positive = (pairs[S.LABEL] > 0.5).to_numpy()
        problems[f"{name}_test_phase"] = int((pairs["phase"] == "test").sum()) + int(table_phases[name] == "test")
        problems[f"{name}_query_row_missing"] = int(at[S.SPLIT].isna().sum())
        problems[f"{name}_query_row_in_test"] = int((at[S.SPLIT] == "test").sum())
        problems[f"{name}_positive_not_query_item"] = int(
            (at[S.ITEM].to_numpy()[positive] != pairs[S.ITEM][positive]).sum()
        )
        problems[f"{name}_query_time_not_row_time"] = int(
            (at[S.TIMESTAMP].to_numpy() != pairs["query_timestamp"]).sum()
        )
    ok = not any(problems.values())
    return CheckOutcome(ok, None if ok else f"test-period leak: {problems}", {"violations": problems})


def queries_see_only_earlier_rows(
    ranking_root: str | Path, candidates_root: str | Path, dataset_root: str | Path
) -> CheckOutcome:
    """Every query of every phase was answered by models and features fitted on rows strictly before its own
    place in the user's order: the last fitted position of its user, per source (the Two Tower fit and EASE
    behind its candidates: the candidates' fit_positions.npz; its features: the ranking dataset's
    features/<phase>.npz), is below the query's position."""
    import pandas as pd

    from recsys_assets.data.ranker_features import FeatureState

    queries = pd.read_parquet(Path(candidates_root) / "queries.parquet", columns=["phase", S.USER, S.POSITION])
    fitted = dict(np.load(Path(candidates_root) / "fit_positions.npz"))
    for path in sorted((Path(ranking_root) / "features").glob("*.npz")):
        fitted[f"{path.stem}/features"] = FeatureState.load(path).user_last_position
    problems, checked = {}, {}
    for key, last in sorted(fitted.items()):
        phase = key.split("/")[0]
        q = queries[queries["phase"] == phase]
        users, positions = q[S.USER].to_numpy(np.int64), q[S.POSITION].to_numpy(np.int64)
        late = int((last[users] >= positions).sum())
        checked[key] = int(len(q))
        if late:
            problems[key] = late
    phases = set(queries["phase"])
    missing = sorted(
        f"{p}/{source}" for p in phases for source in ("two_tower", "features") if f"{p}/{source}" not in fitted
    )
    ok = not problems and not missing
    why = (
        None
        if ok
        else f"queries answered by models or features fitted on their own row or a later one (source: queries) "
        f"{problems}; no evidence for {missing}"
    )
    return CheckOutcome(ok, why, {"queries_checked": checked, "violations": problems, "missing_evidence": missing})


def two_stage_model_gate(
    parity: dict[str, Any], two_tower_gate_passed: bool, gate: dict[str, Any], *, min_served_ndcg: float, k: int
) -> CheckOutcome:
    """The online funnel's gate (`serving.online.batch_parity`'s evidence, the Two Tower version's gate, the DLRM
    run's holdout evidence): its answers equal the batch list for every user compared, the Two Tower it serves
    passed its gate, and the served order's holdout NDCG@k reaches `min_served_ndcg`."""
    stage, _ = served_stage(gate, k)
    served = float(gate["holdout_two_stage" if stage == "dlrm" else "holdout_retrieval"][f"ndcg@{k}"])
    problems = []
    if parity["identical"] != parity["users"]:
        problems.append(
            f"online top-{k} differs from recommendations.parquet for {parity['users'] - parity['identical']} of "
            f"{parity['users']} users (e.g. {parity['mismatches'][:3]}; max score difference {parity['max_score_diff']:.3g})"
        )
    if not two_tower_gate_passed:
        problems.append("the Two Tower it serves failed its gate (two_tower_beats_most_popular)")
    if served < min_served_ndcg:
        problems.append(f"the served ({stage}) order's holdout NDCG@{k} {served:.4f} < required {min_served_ndcg:g}")
    return CheckOutcome.of(
        problems,
        {
            "parity_users": int(parity["users"]),
            "parity_identical": int(parity["identical"]),
            "parity_max_score_diff": float(parity["max_score_diff"]),
            f"served_holdout_ndcg@{k}": served,
        },
    )
