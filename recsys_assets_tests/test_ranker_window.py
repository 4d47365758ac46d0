"""The ranker's data with and without the ranker window (data/phases.py, data/ranking.py), on the small inputs of
`ranking_fixture` through real Spark: window 0 reproduces the dataset of the tree before the window; the window's
queries train, every user's validation lists are the holdout; the Spark features equal a direct call of the
registry; the leakage checks pass, and fail on planted leakage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recsys_assets_tests.ranking_fixture import write_ranking_inputs

GOLDEN = Path(__file__).parent / "data" / "ranking_window0_golden.json"


def _settings(**kw):
    from recsys_assets.data.ranking import RankingDataSettings

    values = dict(
        num_hard_negatives=100,
        holdout_fraction=0.3,
        cooccurrence_window=3,
        recent_fraction=0.2,
        seed=0,
        mds_partitions=1,
    )
    return RankingDataSettings(**{**values, **kw})


def _build(spark, root: Path, ranker_window: int):
    from recsys_assets.data.ranking import build_ranking_dataset

    dataset, candidates = write_ranking_inputs(root / "inputs", ranker_window)
    info = build_ranking_dataset(spark, dataset, candidates, root / "ranking", _settings())
    return dataset, candidates, root / "ranking", info


@pytest.fixture(scope="module")
def window0(spark, tmp_path_factory):
    return _build(spark, tmp_path_factory.mktemp("window0"), 0)


@pytest.fixture(scope="module")
def window3(spark, tmp_path_factory):
    return _build(spark, tmp_path_factory.mktemp("window3"), 3)


def test_window_zero_reproduces_the_ranking_dataset_before_the_window(window0):
    """The golden file is the output of `build_ranking_dataset` at commit 20a4fc6 (before the window) on the same
    fixture inputs: `PYTHONPATH=<a checkout of 20a4fc6> python <script>` calling `write_ranking_inputs(root, 0)`
    and `build_ranking_dataset` with these settings, dumping the three tables sorted by (user, item). Same rows,
    labels, sources, query ids, categories, attributes, standardization and dense features."""
    from recsys_assets.data.ranker_features import DENSE_FEATURES

    _, _, ranking, info = window0
    golden = json.loads(GOLDEN.read_text())
    for name, stats in golden["feature_stats"].items():
        np.testing.assert_allclose(info["feature_stats"][name], stats, rtol=1e-9, atol=1e-12, err_msg=name)
    # the features that existed then, in this tree's dense vector (features added since are extra columns)
    then = [DENSE_FEATURES.index(name) for name in golden["feature_stats"]]
    for name, want in golden["tables"].items():
        got = pd.read_parquet(ranking / f"{name}.parquet").sort_values(["user", "item"]).reset_index(drop=True)
        for column in ("user", "item", "label", "query_id", "source", "phase", "attr_group"):
            assert got[column].tolist() == want[column], (name, column)
        assert [list(map(int, c)) for c in got["categories"]] == want["categories"]
        dense = np.stack(got["dense"])[:, then]
        np.testing.assert_allclose(dense, np.array(want["dense"]), atol=2e-6, err_msg=name)
    assert info["phases"] == {"train": "validation", "holdout": "validation", "test": "test"}


def test_the_window_trains_on_many_lists_per_user_and_every_validation_list_chooses(window3):
    dataset, candidates, ranking, info = window3
    splits = pd.read_parquet(Path(dataset) / "splits")
    train = pd.read_parquet(ranking / "train.parquet")
    holdout = pd.read_parquet(ranking / "holdout.parquet")
    assert info["phases"] == {"train": "ranker", "holdout": "validation", "test": "test"}
    assert set(train["phase"]) == {"ranker"} and set(holdout["phase"]) == {"validation"}
    window = splits[splits["ranker_window"]]
    # the window's lists whose item retrieval found: the appended missed items are not trained on
    pool = pd.read_parquet(candidates / "candidates.parquet").merge(
        pd.read_parquet(candidates / "queries.parquet")[["phase", "query_id", "target"]], on=["phase", "query_id"]
    )
    hits = pool[(pool["phase"] == "ranker") & (pool["item"] == pool["target"])]["query_id"]
    assert 0 < hits.nunique() < len(window)
    assert info["lists"]["train"] == hits.nunique() == train["query_id"].nunique()
    assert set(train["query_id"]) == set(hits) and "target" not in set(train["source"])
    assert train.groupby("user")["query_id"].nunique().max() > 1  # several lists per user
    # every user with a validation row is a holdout user now (no hashed share)
    assert set(holdout["user"]) == set(splits.loc[splits["split"] == "validation", "user"])
    # each training list's positive is its own window row's item
    rows = splits.set_index(["user", "position"])
    pos = train[train["label"] > 0.5]
    assert (rows.loc[list(zip(pos["user"], pos["query_position"])), "item"].to_numpy() == pos["item"]).all()
    assert set(info["rows"]) == {"train", "holdout", "test"}
    # no negative is the user's own later train row (a false 'not picked'); the fixture's pools do hold some
    later = train.merge(splits[splits["split"] == "train"][["user", "item", "position"]], on=["user", "item"])
    assert not ((later["position"] > later["query_position"]) & (later["label"] < 0.5)).any()
    pools = pd.read_parquet(candidates / "candidates.parquet").merge(
        pd.read_parquet(candidates / "queries.parquet")[["phase", "query_id", "position"]], on=["phase", "query_id"]
    )
    pools = pools[pools["phase"] == "ranker"].merge(
        splits[splits["split"] == "train"][["user", "item", "position"]], on=["user", "item"], suffixes=("", "_row")
    )
    assert (pools["position_row"] > pools["position"]).any()
    assert sorted(p.name for p in (ranking / "features").iterdir()) == ["ranker.npz", "test.npz", "validation.npz"]


def _spark_inputs(spark, dataset, candidates: Path):
    """The inputs of `phase_labelled_pairs`: splits, queries, candidate pairs, item features."""
    pairs = spark.read.parquet(str(candidates / "candidates.parquet")).unionByName(
        spark.read.parquet(str(candidates / "training_pool.parquet"))
    )
    read = spark.read.parquet
    return (
        read(str(Path(dataset) / "splits")),
        read(str(candidates / "queries.parquet")),
        pairs,
        read(str(Path(dataset) / "item_features")),
    )


def test_spark_features_equal_a_direct_call_of_the_registry(window3, spark):
    """For every phase: the features Spark computed per task equal `compute_features` called on each query's
    pairs alone (one query per call, as an online scorer would), from the saved feature state."""
    from recsys_assets.data.ranker_features import DENSE_FEATURES, FeatureState, compute_features
    from recsys_assets.data.ranking import phase_labelled_pairs, with_features

    dataset, candidates, ranking, _ = window3
    splits, queries, pairs, items = _spark_inputs(spark, dataset, candidates)
    q = pd.read_parquet(candidates / "queries.parquet").rename(columns={"timestamp": "query_timestamp"})
    p = pd.concat(
        [pd.read_parquet(candidates / "candidates.parquet"), pd.read_parquet(candidates / "training_pool.parquet")]
    )
    for phase in ("ranker", "validation", "test"):
        candidate_pairs, spark_state = phase_labelled_pairs(
            splits, queries, pairs, items, phase, num_users=30, num_items=40, window=3, recent_fraction=0.2
        )
        spark_out = with_features(spark, candidate_pairs, spark_state, items, phase)
        got = spark_out.toPandas().sort_values(["query_id", "item"]).reset_index(drop=True)
        state = FeatureState.load(ranking / "features" / f"{phase}.npz")
        joined = p[p["phase"] == phase].merge(q.drop(columns="user"), on=["phase", "query_id"])
        direct = pd.concat([compute_features(state, g) for _, g in joined.groupby("query_id")])
        direct = direct.sort_values(["query_id", "item"]).reset_index(drop=True)
        assert len(got) == len(direct) > 0
        for name in DENSE_FEATURES:
            np.testing.assert_allclose(got[name], direct[name], rtol=1e-12, atol=1e-12, err_msg=f"{phase} {name}")
        assert got["recent_cooccurrence"].gt(0).any() and got["category_overlap"].gt(0).any()  # not all zero


def test_sampled_pairs_get_the_features_of_their_whole_list(window3, spark):
    """build_ranking_dataset samples the training negatives before computing features: each kept pair's features
    equal those computed on its query's whole pool, also where the sample dropped the query's best retrieved
    candidate (the score-gap features measure against the pool's best)."""
    from recsys_assets.data.ranker_features import DENSE_FEATURES
    from recsys_assets.data.ranking import phase_labelled_pairs, sample_training_pairs, with_features

    dataset, candidates, _, _ = window3
    splits, queries, pairs, items = _spark_inputs(spark, dataset, candidates)
    kw = dict(num_users=30, num_items=40, window=3, recent_fraction=0.2)
    whole, state = phase_labelled_pairs(splits, queries, pairs, items, "ranker", **kw)
    full = with_features(spark, whole, state, items, "ranker").toPandas()
    kept = with_features(spark, sample_training_pairs(whole, 1, seed=0), state, items, "ranker").toPandas()
    assert 0 < len(kept) < len(full)
    retrieved = full[full["source"] == "retrieved"]
    best = retrieved.loc[retrieved.groupby("query_id")["retrieval_score"].idxmax(), ["query_id", "item"]]
    dropped_best = best.merge(kept[["query_id", "item"]], how="left", indicator=True)["_merge"] == "left_only"
    assert dropped_best.any()  # else the sample would not test the pool's best
    both = kept.merge(full, on=["query_id", "item"], suffixes=("", "_whole"))
    assert len(both) == len(kept)
    for name in DENSE_FEATURES:
        np.testing.assert_allclose(both[name], both[f"{name}_whole"], rtol=1e-12, atol=1e-12, err_msg=name)


def test_the_leakage_checks_pass_and_fail_on_planted_leakage(window3, tmp_path):
    from recsys_assets.data.ranker_features import FeatureState
    from recsys_assets.evaluation.gates import queries_see_only_earlier_rows, ranking_data_has_no_test_period

    dataset, candidates, ranking, _ = window3
    ok = queries_see_only_earlier_rows(ranking, candidates, dataset)
    assert ok.passed, ok.description
    assert (
        ok.metadata["queries_checked"]["ranker/two_tower"] > 0 and "ranker/features" in ok.metadata["queries_checked"]
    )
    assert ranking_data_has_no_test_period(ranking, dataset).passed
    splits = pd.read_parquet(Path(dataset) / "splits")
    train_last = splits[splits["split"] == "train"].groupby("user")["position"].max().reindex(range(30), fill_value=0)

    # 1. the ranker's candidates came from a Two Tower fitted on all train rows (the window included)
    planted = tmp_path / "candidates"
    shutil.copytree(candidates, planted)
    fitted = dict(np.load(planted / "fit_positions.npz"))
    fitted["ranker/two_tower"] = train_last.to_numpy(np.int64)
    np.savez(planted / "fit_positions.npz", **fitted)
    bad = queries_see_only_earlier_rows(ranking, planted, dataset)
    assert not bad.passed and "ranker/two_tower" in bad.metadata["violations"]

    # 2. the ranker's features were computed from all train rows
    planted_ranking = tmp_path / "ranking"
    shutil.copytree(ranking, planted_ranking)
    state = FeatureState.load(planted_ranking / "features" / "ranker.npz")
    state.user_last_position = train_last.to_numpy(np.int64)
    state.save(planted_ranking / "features" / "ranker.npz")
    bad = queries_see_only_earlier_rows(planted_ranking, candidates, dataset)
    assert not bad.passed and set(bad.metadata["violations"]) == {"ranker/features"}

    # 3. a training pair whose query is a test row
    train = pd.read_parquet(planted_ranking / "train.parquet")
    test_pos = splits[splits["split"] == "test"].set_index("user")["position"]
    train.loc[0, "query_position"] = test_pos[train.loc[0, "user"]]
    shutil.rmtree(planted_ranking / "train.parquet")  # a Spark-written folder
    train.to_parquet(planted_ranking / "train.parquet", index=False)
    bad = ranking_data_has_no_test_period(planted_ranking, dataset)
    assert not bad.passed and bad.metadata["violations"]["train_query_row_in_test"] == 1
