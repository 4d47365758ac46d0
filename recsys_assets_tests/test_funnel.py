"""The whole two-stage funnel through Dagster on tiny synthetic data (real Spark, 2-process gloo TorchRec
training via TorchDistributor, a real MLflow SQLite store): candidates, ranker data, DLRM, recommendations,
evaluation, and the quality gates."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import torch

pytestmark = pytest.mark.multiprocess  # TorchDistributor with 2 processes


def _resources(root: Path) -> dict:
    from training_resources import training_resources

    return training_resources(root)


def _instance(root: Path) -> dg.DagsterInstance:
    """A persistent instance: the `recsys-assets` command reads it, and a later run of a subset loads the upstream
    values of the first run from the materializations it recorded (the I/O manager's paths)."""
    return dg.DagsterInstance.local_temp(str(root / "dagster_home"))


def _run_config(gate_min_gain: float) -> dict:
    return {
        "ops": {
            "raw_interactions": {"config": {"synthetic": {"size": "tiny"}}},
            "two_tower_model": {"config": {"epochs": 4, "patience": 2}},
            "retrieval_candidates": {"config": {"k": 50, "num_random_negatives": 5}},
            "ranking_dataset": {"config": {"num_hard_negatives": 10}},
            "dlrm_model": {"config": {"epochs": 2, "patience": 1, "gate_min_gain": gate_min_gain}},
            "evaluation": {"config": {"ease_lambdas": [50.0], "als_ranks": [8], "als_max_iter": 3}},
        }
    }


def _assets_and_checks():
    from recsys_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    return list(defs.assets), list(defs.asset_checks), graph


@pytest.fixture(scope="module")
def funnel(tmp_path_factory, spark):
    assets, checks, _ = _assets_and_checks()
    root = tmp_path_factory.mktemp("funnel")
    # The served stage is whichever wins on the holdout lists (on tiny data often the retrieval order);
    # `test_when_the_ranker_loses_*` below demands an impossible gain to force the retrieval order.
    (root / "dagster_home").mkdir()
    instance = _instance(root)
    result = dg.materialize(
        [*assets, *checks], resources=_resources(root), run_config=_run_config(0.0), instance=instance
    )
    return result, root


def _md(result, key: str) -> dict:
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == key]
    return {k: v.value for k, v in event.materialization.metadata.items()}


def _splits(result) -> pd.DataFrame:
    from recsys_assets.data.schema import DatasetPaths

    return pd.read_parquet(DatasetPaths(Path(_md(result, "mds_splits")["path"])).splits)


def test_every_asset_and_check_of_the_graph_ran(funnel):
    result, _ = funnel
    assert result.success
    _, _, graph = _assets_and_checks()
    done = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    # every asset but the observed source (interaction_source: observed, never materialized)
    materializable = {k.to_user_string() for k in graph.get_all_asset_keys() if graph.get(k).is_materializable}
    assert done == materializable and "raw_interactions" in done
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["ranking_data_has_no_test_period"] and checks["two_tower_beats_most_popular"]
    assert checks["served_list_beats_most_popular"]


def test_candidates_never_include_items_seen_before_the_query(funnel):
    result, _ = funnel
    splits = _splits(result)
    folder = Path(_md(result, "retrieval_candidates")["path"])
    cand = pd.read_parquet(folder / "candidates.parquet")
    queries = pd.read_parquet(folder / "queries.parquet")
    assert set(cand["phase"]) == {"ranker", "validation", "test"}
    for phase in ("ranker", "validation", "test"):
        c = cand[cand["phase"] == phase].merge(queries[queries["phase"] == phase][["query_id", "position"]])
        assert len(c) and c.groupby("query_id").size().max() == 50
        # no candidate is an item of the user's rows before the query (for validation / test: the fit items)
        seen = c.merge(
            splits[["user", "item", "position"]].rename(columns={"position": "seen_at"}), on=["user", "item"]
        )
        clash = seen[seen["seen_at"] < seen["position"]]
        assert clash.empty, f"{phase} candidates contain items seen before the query: {clash.head()}"
        # Two Tower ranks follow its scores; the pool holds the Two Tower's and EASE's best items, interleaved
        c = c.sort_values(["query_id", "retrieval_rank"])
        assert (c.groupby("query_id")["retrieval_score"].diff().dropna() <= 1e-6).all()
        assert (c.groupby("query_id")["pool_rank"].agg(lambda r: sorted(r) == list(range(len(r))))).all()
        share = _md(result, "retrieval_candidates")["item_item_share"]
        best = c.groupby("query_id").agg(tt=("retrieval_rank", "min"), ii=("item_item_rank", "min"))
        assert share == 1.0 or (best["tt"] == 0).all()
        assert share == 0.0 or (best["ii"] == 0).all()
    # the window's queries: several per user, each after at least one row
    ranker = queries[queries["phase"] == "ranker"]
    assert ranker.groupby("user").size().max() > 1 and (ranker["position"] > 1).all()


def test_ranker_trains_on_the_window_and_every_validation_list_chooses(funnel):
    result, _ = funnel
    splits = _splits(result)
    root = Path(_md(result, "ranking_dataset")["path"])
    train = pd.read_parquet(root / "train.parquet")
    holdout = pd.read_parquet(root / "holdout.parquet")
    assert set(train["phase"]) == {"ranker"} and set(holdout["phase"]) == {"validation"}
    rows = splits.set_index(["user", "position"])
    pos = train[train["label"] > 0.5]
    assert len(pos) > 0
    at = rows.loc[list(zip(pos["user"], pos["query_position"]))]
    assert (at["item"].to_numpy() == pos["item"].to_numpy()).all() and at["ranker_window"].all()
    # every query time is its window row's, before the same user's validation row
    val = splits[splits["split"] == "validation"].set_index("user")
    has_val = train["user"].isin(val.index)
    assert (
        train.loc[has_val, "query_timestamp"].to_numpy() <= val.loc[train.loc[has_val, "user"], "timestamp"].to_numpy()
    ).all()
    # hard negatives come from retrieval, and are not the query's item
    assert {"retrieved", "random"} <= set(train["source"])
    assert (train.loc[train["source"] == "random", "label"] == 0).all()
    # the MDS training split holds exactly these pairs
    from recsys_assets.data.mds import summarize_mds

    assert summarize_mds(root / "mds" / "train")["rows"] == len(train)
    meta = json.loads((root / "meta.json").read_text())
    assert meta["rows"]["train"] == len(train) and meta["lists"]["train"] == train["query_id"].nunique()
    assert train.groupby("user")["query_id"].nunique().max() > 1  # users give several lists
    assert "target" not in set(train["source"])  # only the lists whose item retrieval found train
    # the holdout is every user's validation list
    assert set(holdout["user"]) == set(val.index)
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["ranker_queries_see_only_earlier_rows"]


def test_dlrm_recorded_in_mlflow_and_reloads(funnel):
    from mlflow.tracking import MlflowClient

    from recsys_assets.defs.types import TrainedModel
    from recsys_assets.training.model_files import load_dlrm_model

    result, root = funnel
    md = _md(result, "dlrm_model")
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    run = client.get_run(md["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["model"] == "dlrm"
    assert run.data.tags["two_tower_run_id"] == _md(result, "two_tower_model")["mlflow_run_id"]
    assert 0.0 <= md["holdout_auroc"] <= 1.0 and 0.0 <= md["test_auroc"] <= 1.0
    assert np.isfinite(md["test_logloss"]) and md["test_logloss"] > 0
    # test is scored once, with the final weights: no epoch of the history names it
    history = json.loads((Path(md["path"]) / "result.json").read_text())["history"]
    assert history and all(set(h["metrics"]) == {"holdout"} for h in history)
    assert md["mlflow_run"].endswith(md["mlflow_run_id"])
    model, layout, cfg = load_dlrm_model(TrainedModel(md["path"], md["mlflow_run_id"]))
    # the defaults chosen on holdout lists: category bag + user attributes (id tables are opt-in)
    names = {f.name for f in layout}
    assert "categories" in names and any(n.startswith("attr_") for n in names)
    assert not names & {"user", "item", "history"}
    assert isinstance(model, torch.nn.Module)
    # registered: the first version of recsys_dlrm, champion when the ranker improves the list (its gate),
    # else challenger; tagged with the Dagster run
    improves = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}["two_stage_at_least_two_tower"]
    assert md["model_version"] == "1" and md["registry_alias"] == ("champion" if improves else "challenger")
    assert md["model_version_url"].endswith("/#/models/recsys_dlrm/versions/1")
    version = client.get_model_version("recsys_dlrm", "1")
    assert version.run_id == md["mlflow_run_id"] and version.tags["dagster.run_id"] == result.run_id
    assert version.tags["data_path"] == _md(result, "ranking_dataset")["path"]
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {
        "ranking_dataset/train",
        "ranking_dataset/holdout",
        "ranking_dataset/test",
    }
    recs = _md(result, "recommendations")
    assert recs["dlrm_version"] == "1" and recs["two_tower_version"] == _md(result, "two_tower_model")["model_version"]
    assert recs["two_tower_version_url"].endswith(f"/versions/{recs['two_tower_version']}")


def test_recommendations_are_top10_reranked_unseen_items(funnel):
    result, _ = funnel
    md = _md(result, "recommendations")
    recs = pd.read_parquet(Path(md["path"]) / "recommendations.parquet")
    splits = _splits(result)
    assert recs.groupby("user").size().max() == 10
    assert recs["user"].nunique() == splits["user"].nunique()  # every user gets a list
    if md["served_stage"] == "dlrm":
        assert (recs.groupby("user")["dlrm_score"].diff().dropna() <= 1e-6).all()
    else:
        assert (recs.groupby("user")["pool_rank"].diff().dropna() > 0).all()
    seen = splits[splits["split"].isin(["train", "validation"])][["user", "item"]].drop_duplicates()
    assert recs.merge(seen, on=["user", "item"]).empty
    assert set(recs["dlrm_run_id"]) == {_md(result, "dlrm_model")["mlflow_run_id"]}
    assert set(recs["two_tower_run_id"]) == {_md(result, "two_tower_model")["mlflow_run_id"]}


def test_recommendations_in_source_ids_and_the_command_serves_them(funnel, monkeypatch, capsys):
    """Published recommendations carry the source's ids (the synthetic source's are integers: int64) that the
    interactions asset's index tables give for the internal ids; item_embeddings' items.parquet too; the
    `recsys-assets recommend` command prints a user's list from the instance in those ids."""
    from recsys_assets import cli

    result, root = funnel
    md = _md(result, "recommendations")
    recs = pd.read_parquet(Path(md["path"]) / "recommendations.parquet")
    assert list(recs.columns[:5]) == ["user_id", "rank", "item_id", "title", "categories"]
    assert recs["user_id"].dtype == np.int64 and recs["item_id"].dtype == np.int64
    index_root = Path(_md(result, "interactions")["path"])
    raw_item = pd.read_parquet(index_root / "item_index").set_index("item")["raw_item"]
    raw_user = pd.read_parquet(index_root / "user_index").set_index("user")["raw_user"]
    assert (recs["item_id"].astype(str).to_numpy() == raw_item.loc[recs["item"]].to_numpy()).all()
    assert (recs["user_id"].astype(str).to_numpy() == raw_user.loc[recs["user"]].to_numpy()).all()
    assert (recs["user_id"] != recs["user"]).any()  # the synthetic ids are offset: a real mapping happened
    assert "user_id" in md["preview"] and "item_id" in md["preview"]
    items = pd.read_parquet(Path(_md(result, "item_embeddings")["path"]) / "items.parquet")
    assert items["item"].tolist() == list(range(len(items)))
    assert (items["item_id"].astype(str).to_numpy() == raw_item.loc[items["item"]].to_numpy()).all()

    monkeypatch.setenv("DAGSTER_HOME", str(root / "dagster_home"))
    user = int(recs["user_id"].iloc[0])
    assert cli.main(["recommend", "--user", str(user), "--k", "3"]) == 0
    out = capsys.readouterr().out
    assert f"user {user}: top 3" in out and "fallback" not in out
    rows = [ln.split() for ln in out.splitlines() if ln.split()[:1] in (["0"], ["1"], ["2"])]
    expected = recs[recs["user_id"] == user].sort_values("rank")["item_id"].head(3).tolist()
    assert [int(r[1]) for r in rows] == expected


def test_evaluation_reports_every_model_through_one_evaluator(funnel):
    from mlflow.tracking import MlflowClient

    from recsys_assets.evaluation.protocol import EvalTask, evaluate

    result, root = funnel
    md = _md(result, "evaluation")
    for key in (
        "two_tower_hr@10",
        "two_tower_ndcg@10",
        "two_stage_hr@10",
        "two_stage_ndcg@10",
        "two_stage_retrieval_hr@50",
        "retrieval_hr@10",
        "served_list_hr@10",
        "mostpopular_hr@10",
        "lastitemmarkov_ndcg@10",
        "ease_hr@10",
        "spark_als_ndcg@10",
    ):
        assert key in md and 0.0 <= md[key] <= 1.0, key
    assert "| Two-stage (retrieval → DLRM) |" in md["metrics"] and "| Retrieval (pool order) |" in md["metrics"]
    served_row = "two_stage" if md["served_stage"] == "dlrm" else "retrieval"
    assert md["served_list_hr@10"] == md[f"{served_row}_hr@10"]
    assert md["split"].startswith("leave-last-out by timestamp")
    assert md["chart"].startswith("![")
    # the served list's HR@10 recomputed from the published recommendations with the evaluator
    splits = _splits(result)
    recs = pd.read_parquet(Path(_md(result, "recommendations")["path"]) / "recommendations.parquet")
    task = EvalTask.from_splits(splits[["user", "item", "timestamp", "split"]], "test")
    order = {(u, i): 10 - r for u, i, r in zip(recs["user"], recs["item"], recs["rank"])}

    def score(users):
        out = torch.full((len(users), task.num_items), -torch.inf)
        for row, u in enumerate(users):
            for (uu, i), s in order.items():
                if uu == u:
                    out[row, i] = float(s)
        return out

    assert evaluate(score, task)["hr@10"] == pytest.approx(md["served_list_hr@10"])
    # retrieval bounds the funnel: the two-stage list cannot hit more than the candidates hold
    assert md["two_stage_hr@10"] <= md["two_stage_retrieval_hr@50"] + 1e-9
    run = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db").get_run(md["mlflow_run"].rsplit("/", 1)[-1])
    assert run.info.status == "FINISHED" and "two_stage_ndcg_at_10" in run.data.metrics


def test_when_the_ranker_loses_the_retrieval_order_is_served_and_evaluation_runs(funnel):
    """Demand an impossible gain from the ranker: it loses on the holdout lists, so `recommendations` serves the
    retrieval order and says why, `evaluation` still runs and reports every stage, and the registry keeps the
    DLRM as a challenger only."""
    result, root = funnel
    assets, checks, _ = _assets_and_checks()
    names = ("dlrm_model", "recommendations", "evaluation")
    run = dg.materialize(
        [*assets, *checks],
        selection=dg.AssetSelection.assets(*names),
        resources=_resources(root),
        run_config={"ops": {k: v for k, v in _run_config(1.0)["ops"].items() if k in names}},
        instance=_instance(root),
    )
    assert run.success
    verdicts = {e.check_name: e for e in run.get_asset_check_evaluations()}
    assert not verdicts["two_stage_at_least_two_tower"].passed  # not blocking any more
    assert "retrieval order is served" in (verdicts["two_stage_at_least_two_tower"].description or "")
    assert verdicts["served_list_beats_most_popular"].passed
    done = {e.asset_key.to_user_string() for e in run.get_asset_materialization_events()}
    assert done == set(names)
    md = _md(run, "recommendations")
    assert md["served_stage"] == "retrieval" and "does not improve" in md["served_stage_reason"]
    recs = pd.read_parquet(Path(md["path"]) / "recommendations.parquet")
    assert (recs["served_stage"] == "retrieval").all()
    assert (recs.sort_values(["user", "rank"]).groupby("user")["pool_rank"].diff().dropna() > 0).all()
    ev = _md(run, "evaluation")
    assert ev["served_stage"] == "retrieval"
    assert ev["served_list_hr@10"] == ev["retrieval_hr@10"] and "two_stage_hr@10" in ev
    [dlrm] = [e for e in run.get_asset_materialization_events() if e.asset_key.to_user_string() == "dlrm_model"]
    dlrm_md = {k: v.value for k, v in dlrm.materialization.metadata.items()}
    assert dlrm_md["registry_alias"] == "challenger" and dlrm_md["model_version"] != "1"
    assert dlrm_md["registry_reason"].startswith("quality gate failed: two-stage")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    champions = [v for v in client.search_model_versions("name='recsys_dlrm'") if "champion" in v.aliases]
    assert all(v.version == "1" for v in champions)  # the losing ranker never becomes champion


def test_recommend_in_the_dlrm_order(funnel, tmp_path):
    """The DLRM-served path on the funnel's folders: each user's list follows the DLRM score (ties: the pool
    rank), and candidate_scores.parquet keeps both orders of every candidate for the evaluation."""
    from recsys_assets.serving.rerank import recommend

    result, _ = funnel
    dlrm = _md(result, "dlrm_model")
    top = recommend(
        dlrm["path"],
        _md(result, "ranking_dataset")["path"],
        tmp_path,
        dataset_root=_md(result, "mds_splits")["path"],
        top_k=10,
        served="dlrm",
        two_tower_run_id="tt",
        dlrm_run_id=dlrm["mlflow_run_id"],
    )
    assert (top["served_stage"] == "dlrm").all() and top.groupby("user").size().max() == 10
    assert (top.sort_values(["user", "rank"]).groupby("user")["dlrm_score"].diff().dropna() <= 1e-6).all()
    scored = pd.read_parquet(tmp_path / "candidate_scores.parquet")
    assert {"pool_rank", "dlrm_score"} <= set(scored.columns) and len(scored) >= len(top)
    with pytest.raises(ValueError, match="served must be one of"):
        recommend(
            dlrm["path"],
            "",
            tmp_path,
            dataset_root="",
            top_k=10,
            served="x",
            two_tower_run_id="",
            dlrm_run_id="",
        )


def test_served_list_gate_fails_with_a_message_that_says_so(funnel):
    """A served list that never finds the target does not beat MostPopular: the blocking gate fails and says
    that no recommendations are published."""
    from recsys_assets.evaluation.gates import served_list_beats_most_popular

    result, _ = funnel
    zero = {"hr@10": 0.0, "ndcg@10": 0.0}
    gate = {"holdout_two_stage": zero, "holdout_retrieval": zero, "holdout_queries": 10, "min_gain": 0.0}
    outcome = served_list_beats_most_popular(
        gate, _md(result, "ranking_dataset")["path"], _md(result, "mds_splits")["path"], k=10
    )
    assert not outcome.passed
    assert "does not beat MostPopular on validation" in outcome.description
    assert "no recommendations are published" in outcome.description
    assert outcome.metadata["most_popular_validation_ndcg@10"] > 0
