"""Evaluation stage: every model and baseline through the one evaluator (test phase), and the quality gates.

The gates are blocking asset checks: a failed gate stops everything downstream of the checked asset (the
recommendations are not published) and its description says why."""
import json
import time
from pathlib import Path

import dagster as dg
from pydantic import Field

from recsys_assets.data import schema as S
from recsys_assets.data.publish import publish_folder
from recsys_assets.defs.constants import EVALUATION_GROUP
from recsys_assets.defs.model_assets import metrics_markdown, two_tower_model
from recsys_assets.defs.ranking_assets import dlrm_model, ranking_dataset
from recsys_assets.defs.resources import MLflowResource, SparkResource, StateResource
from recsys_assets.defs.retrieval_assets import load_query_splits, serving_queries
from recsys_assets.defs.types import CandidateSet, PublishedFolder, RankingData, TrainedModel

class EvaluationConfig(dg.Config):
    ease_lambdas: list[float] = Field([50.0, 200.0, 500.0, 1000.0], description="EASE λ grid (chosen on validation).")
    ease_max_items: int = Field(20_000, description="EASE is closed form (items × items): skipped above this catalog size.")
    als: bool = Field(True, description="Spark ALS (implicit), tuned on validation.")
    als_ranks: list[int] = Field([32, 64])
    als_reg_params: list[float] = Field([0.1])
    als_alphas: list[float] = Field([1.0])
    als_max_iter: int = Field(10, ge=1)


def _splits_frame(mds_splits: PublishedFolder):
    from recsys_assets.data.splits import load_splits_frame

    return load_splits_frame(mds_splits.path, [S.USER, S.ITEM, S.TIMESTAMP, S.SPLIT])


def _list_scores(frame, num_items: int, score_col: str):
    """score_fn for the evaluator from a (user, item, score) list: listed items get their score, others -inf."""
    import numpy as np
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


@dg.asset(
    group_name=EVALUATION_GROUP,
    kinds={"pytorch", "spark", "mlflow"},
    tags={"stage": "evaluation"},
    description="Test phase, full ranking with train and validation items excluded, one evaluator for all: "
    "retrieval HR@K, the Two Tower alone, the two-stage list (DLRM over the candidates), MostPopular, "
    "LastItemMarkov, EASE and Spark ALS (tuned on validation). Table + bar chart in metadata and MLflow.",
)
def evaluation(
    context: dg.AssetExecutionContext,
    config: EvaluationConfig,
    mds_splits: PublishedFolder,
    two_tower_model: TrainedModel,
    retrieval_candidates: CandidateSet,
    recommendations: PublishedFolder,
    spark: SparkResource,
    mlflow: MLflowResource,
    state: StateResource,
) -> dg.Output[PublishedFolder]:
    import numpy as np
    import pandas as pd
    import torch

    from recsys_assets.evaluation.baselines import EASE, LastItemMarkov, MostPopular, SparkALS, tune
    from recsys_assets.evaluation.protocol import EvalTask, evaluate
    from recsys_assets.models.two_tower import ItemEncoder

    mlflow.check_reachable()
    meta = S.DatasetMeta.load(S.DatasetPaths(Path(mds_splits.path)).meta)
    splits = load_query_splits(mds_splits)  # read once: the evaluator's columns + the query tower's history
    frame = splits[[S.USER, S.ITEM, S.TIMESTAMP, S.SPLIT]]
    n_users, n_items = meta.num_users, meta.num_items
    task = EvalTask.from_splits(frame, "test", num_users=n_users, num_items=n_items)
    rows: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}

    def timed(name, fn):
        t0 = time.time()
        out = fn()
        seconds[name] = time.time() - t0
        return out

    # the Two Tower alone (the served model), full ranking
    def two_tower_alone():
        model, store, states, qv = serving_queries(two_tower_model, mds_splits, "test", all_users=False, splits=splits)
        with torch.no_grad():
            iv = ItemEncoder(model, store).encode_all()
        row_of = {int(u): i for i, u in enumerate(states.users)}
        return evaluate(lambda users: qv[torch.as_tensor([row_of[int(u)] for u in users])] @ iv.T, task).as_dict()

    rows["Two Tower"] = timed("Two Tower", two_tower_alone)

    cand = pd.read_parquet(Path(retrieval_candidates.path) / "candidates.parquet")
    cand = cand[cand["phase"] == "test"]
    k = int(cand.groupby("user").size().max()) if len(cand) else 0
    targets = pd.Series(task.targets, index=task.users)
    hit = cand.merge(targets.rename("target"), left_on="user", right_index=True)
    retrieved_hits = hit.loc[hit["item"] == hit["target"], "user"].nunique()
    retrieval_hr = retrieved_hits / max(1, task.n_queries)

    recs = pd.read_parquet(Path(recommendations.path) / "recommendations.parquet")
    recs = recs.assign(order_score=(recs["rank"].max() + 1 - recs["rank"]).astype(np.float32))
    two_stage = timed("Two-stage", lambda: evaluate(_list_scores(recs, n_items, "order_score"), task).as_dict())
    rows["Two-stage (Two Tower → DLRM)"] = {k2: v for k2, v in two_stage.items() if k2.endswith("@10")}
    rows["Two-stage (Two Tower → DLRM)"][f"retrieval_hr@{k}"] = float(retrieval_hr)

    rows["MostPopular"] = timed("MostPopular", lambda: evaluate(MostPopular().fit(task).score, task).as_dict())
    rows["LastItemMarkov"] = timed("LastItemMarkov", lambda: evaluate(LastItemMarkov().fit(task).score, task).as_dict())
    chosen: dict[str, dict] = {}
    if n_items <= config.ease_max_items:
        tuned = timed("EASE", lambda: tune(EASE, {"lam": list(config.ease_lambdas)}, frame, num_users=n_users, num_items=n_items))
        rows[f"EASE (λ={tuned.params['lam']:g})"] = tuned.test.as_dict()
        chosen["EASE"] = tuned.params
    else:
        context.log.info(f"EASE skipped: {n_items} items > ease_max_items={config.ease_max_items}")
    if config.als:
        session = spark.spark_session
        grid = {"rank": list(config.als_ranks), "reg_param": list(config.als_reg_params), "alpha": list(config.als_alphas)}
        tuned = timed("Spark ALS", lambda: tune(lambda **p: SparkALS(session, max_iter=config.als_max_iter, seed=0, **p),
                                                grid, frame, num_users=n_users, num_items=n_items))
        rows[f"Spark ALS ({', '.join(f'{k2}={v}' for k2, v in tuned.params.items())})"] = tuned.test.as_dict()
        chosen["Spark ALS"] = tuned.params

    table = metrics_markdown(rows)
    flat = {}
    for name, metrics in rows.items():
        key = name.split(" (")[0].lower().replace(" ", "_").replace("-", "_")
        for m, v in metrics.items():
            flat[f"{key}_{m}"] = float(v)
    dest = state.asset_dir("evaluation", context.run_id)
    run_id = mlflow.start_asset_run(context, two_tower_run_id=two_tower_model.mlflow_run_id,
                                    dlrm_run_id=recs["dlrm_run_id"].iloc[0] if len(recs) else "")
    try:
        client = mlflow.client()
        with publish_folder(dest) as tmp:
            (tmp / "evaluation.json").write_text(json.dumps({"phase": "test", "users": task.n_queries, "rows": rows,
                                                             "chosen": chosen, "seconds": seconds}, indent=2, default=float))
            (tmp / "evaluation.md").write_text(table + "\n")
            chart = None
            try:
                from recsys_assets.defs.plots import metrics_bar_chart_png

                chart = metrics_bar_chart_png({n.split(" (")[0]: m for n, m in rows.items()}, tmp / "evaluation.png",
                                              title=f"test phase, {task.n_queries} users")
            except Exception as exc:  # a picture must never fail the evaluation
                context.log.warning(f"bar chart not rendered: {exc}")
        for name, v in flat.items():
            client.log_metric(run_id, name.replace("@", "_at_"), v)
        client.log_text(run_id, table, "evaluation.md")
        if chart is not None:
            client.log_artifact(run_id, str(dest / "evaluation.png"), artifact_path="plots")
    except BaseException as exc:
        mlflow.end_run(run_id, failed=exc)
        raise
    mlflow.end_run(run_id)
    context.log.info("\n" + table)
    metadata = {
        "published_path": dg.MetadataValue.path(str(dest)),
        "mlflow_run": dg.MetadataValue.url(mlflow.run_url(run_id)),
        "metrics": dg.MetadataValue.md(table),
        "test_users": int(task.n_queries),
        **flat,
    }
    if (dest / "evaluation.png").exists():
        from recsys_assets.defs.plots import image_markdown

        metadata["chart"] = dg.MetadataValue.md(image_markdown(dest / "evaluation.png", "HR@10 and NDCG@10"))
    return dg.Output(PublishedFolder(str(dest)), metadata=metadata)


# ------------------------------------------------------------------------------------------------ gates
@dg.asset_check(
    asset=two_tower_model,
    additional_ins={"mds_splits": dg.AssetIn("mds_splits")},
    blocking=True,
    description="Gate: the Two Tower beats MostPopular on validation NDCG@10 (same split, same evaluator).",
)
def two_tower_beats_most_popular(two_tower_model: TrainedModel, mds_splits: PublishedFolder) -> dg.AssetCheckResult:
    from recsys_assets.evaluation.baselines import MostPopular
    from recsys_assets.evaluation.protocol import EvalTask, evaluate

    result = json.loads((Path(two_tower_model.path) / "result.json").read_text())
    model_ndcg = float(result["validation"]["ndcg@10"])
    meta = S.DatasetMeta.load(S.DatasetPaths(Path(mds_splits.path)).meta)
    task = EvalTask.from_splits(_splits_frame(mds_splits), "validation", num_users=meta.num_users, num_items=meta.num_items)
    pop = float(evaluate(MostPopular().fit(task).score, task)["ndcg@10"])
    ok = model_ndcg > pop
    return dg.AssetCheckResult(
        passed=ok,
        description=None if ok else f"Two Tower validation NDCG@10 {model_ndcg:.4f} does not beat MostPopular {pop:.4f}",
        metadata={"two_tower_validation_ndcg@10": model_ndcg, "most_popular_validation_ndcg@10": pop},
    )


@dg.asset_check(
    asset=dlrm_model,
    blocking=True,
    description="Gate: on the holdout users' validation lists, the DLRM-ordered top-10 is at least as good as the "
    "Two Tower's own order (NDCG@10). A failure stops the recommendations from being published.",
)
def two_stage_at_least_two_tower(dlrm_model: TrainedModel) -> dg.AssetCheckResult:
    gate = json.loads((Path(dlrm_model.path) / "result.json").read_text())["gate"]
    two_stage = float(gate["holdout_two_stage"]["ndcg@10"])
    two_tower = float(gate["holdout_two_tower"]["ndcg@10"])
    min_gain = float(gate.get("min_gain", 0.0))
    ok = two_stage >= two_tower + min_gain
    return dg.AssetCheckResult(
        passed=ok,
        description=None if ok else (
            f"two-stage NDCG@10 {two_stage:.4f} < Two Tower alone {two_tower:.4f} + required gain {min_gain:g} on "
            f"{gate['holdout_queries']} holdout users' validation lists: the ranker does not improve the list"),
        metadata={"two_stage_ndcg@10": two_stage, "two_tower_ndcg@10": two_tower, "required_gain": min_gain,
                  "holdout_queries": int(gate["holdout_queries"])},
    )


@dg.asset_check(
    asset=ranking_dataset,
    additional_ins={"mds_splits": dg.AssetIn("mds_splits")},
    blocking=True,
    description="No test-period information in the ranker's training pairs: training and holdout pairs are "
    "validation-phase queries whose positive is the user's validation item and whose query time is not later "
    "than it.",
)
def ranking_data_has_no_test_period(ranking_dataset: RankingData, mds_splits: PublishedFolder) -> dg.AssetCheckResult:
    import pandas as pd

    frame = _splits_frame(mds_splits)
    val = frame[frame[S.SPLIT] == "validation"].set_index(S.USER)
    problems = {}
    for name in ("train", "holdout"):
        pairs = pd.read_parquet(Path(ranking_dataset.path) / f"{name}.parquet",
                                columns=["phase", "user", "item", "label", "query_timestamp"])
        problems[f"{name}_non_validation_phase"] = int((pairs["phase"] != "validation").sum())
        pos = pairs[pairs["label"] > 0.5]
        problems[f"{name}_positive_not_validation_item"] = int(
            (pos["item"].to_numpy() != val.loc[pos["user"], S.ITEM].to_numpy()).sum())
        problems[f"{name}_query_after_validation_time"] = int(
            (pairs["query_timestamp"].to_numpy() > val[S.TIMESTAMP].reindex(pairs["user"]).to_numpy()).sum())
    ok = not any(problems.values())
    return dg.AssetCheckResult(passed=ok, description=None if ok else f"test-period leak: {problems}",
                               metadata={"violations": dg.MetadataValue.json(problems)})


evaluation_assets = [evaluation]
funnel_checks = [two_tower_beats_most_popular, two_stage_at_least_two_tower, ranking_data_has_no_test_period]
