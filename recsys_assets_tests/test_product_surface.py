"""What a person sees: served tables in the source's ids (MovieLens integer ids and titles, a table's string ids)
and the `recsys-assets` command (a known user, an unknown user's flagged fallback, an empty instance).

Real Spark runs the data stages on small MovieLens-layout and table sources; the command reads a real Dagster
instance in a temporary DAGSTER_HOME. The whole graph's recommendations are checked in test_funnel.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from recsys_assets.data import schema as S
from recsys_assets.data import sources, stages
from recsys_assets.defs.storage import MARKER
from recsys_assets.serving.lookup import FALLBACK_NOTE
from recsys_assets.serving.source_ids import POPULAR_FILE, RECOMMENDATIONS_FILE, publish_recommendations

# MovieLens ids whose string order differs from their numeric order; 260 is rated by everyone (most popular)
MOVIES = {
    1: ("Toy Story (1995)", "Adventure|Animation|Children"),
    2: ("Jumanji (1995)", "Adventure|Fantasy"),
    10: ('"Shawshank Redemption, The (1994)"', "Crime|Drama"),
    32: ("Twelve Monkeys (a.k.a. 12 Monkeys) (1995)", "Mystery|Sci-Fi|Thriller"),
    100: ("City Hall (1996)", "Drama|Thriller"),
    260: ("Star Wars: Episode IV - A New Hope (1977)", "Action|Adventure|Sci-Fi"),
    1000: ("Curdled (1996)", "(no genres listed)"),
}
USERS = [1, 2, 9, 10, 100, 611]


def _title(movie_id: int) -> str:
    return MOVIES[movie_id][0].strip('"')


def _ratings() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for u in USERS:
        others = [m for m in MOVIES if m != 260]
        picked = [260, *rng.choice(others, size=4, replace=False).tolist()]
        for t, m in enumerate(picked):
            rows.append((u, m, float(rng.integers(1, 6)), 1_000_000 + 100 * t + u))
    return pd.DataFrame(rows, columns=["userId", "movieId", "rating", "timestamp"])


def _build_dataset(spark, raw: sources.RawTables, root: Path) -> Path:
    for name in ("raw", "interactions", "splits", "dataset"):
        (root / name).mkdir(parents=True)
    stages.write_raw(spark, raw, root / "raw")
    stages.clean_and_index(spark, root / "raw", root / "interactions", null_keys="drop", require_rating=False)
    stages.split(spark, root / "interactions", root / "splits", history_length=4)
    stages.build_mds_dataset(
        spark,
        root / "interactions",
        root / "splits",
        root / "dataset",
        partitions=1,
        compression=None,
        shard_size_limit="1mb",
        mds_remote=None,
        log=lambda _: None,
    )
    return root / "dataset"


@pytest.fixture(scope="module")
def movielens(spark, tmp_path_factory):
    """A ml-latest-layout folder (ratings.csv + movies.csv with quoted titles) through the data stages."""
    root = tmp_path_factory.mktemp("movielens")
    src = root / "ml"
    src.mkdir()
    ratings = _ratings()
    ratings.to_csv(src / "ratings.csv", index=False)
    lines = ["movieId,title,genres"] + [f"{m},{t},{g}" for m, (t, g) in MOVIES.items()]
    (src / "movies.csv").write_text("\n".join(lines) + "\n")
    dataset = _build_dataset(spark, sources.read_movielens(spark, src), root)
    return ratings, dataset


def _test_rows(dataset: Path) -> pd.DataFrame:
    splits = pd.read_parquet(S.DatasetPaths(dataset).splits)
    return splits[splits[S.SPLIT] == "test"][[S.USER, S.ITEM, S.TIMESTAMP]].reset_index(drop=True)


def test_movielens_ids_come_back_as_int64_movielens_ids_with_titles(movielens, spark):
    from recsys_assets.serving.source_ids import with_source_ids

    ratings, dataset = movielens
    meta = S.DatasetMeta.load(S.DatasetPaths(dataset).meta)
    assert (meta.user_id_type, meta.item_id_type) == ("int64", "int64")
    test = _test_rows(dataset)
    assert len(test) == len(USERS)
    served = with_source_ids(test, dataset)
    assert list(served.columns[:4]) == [S.USER_ID, S.ITEM_ID, S.TITLE, S.CATEGORIES]
    assert served[S.USER_ID].dtype == np.int64 and served[S.ITEM_ID].dtype == np.int64
    # every mapped (userId, movieId, timestamp) is a row of ratings.csv: the ids round-trip to the source
    joined = served.merge(
        ratings, left_on=[S.USER_ID, S.ITEM_ID, S.TIMESTAMP], right_on=["userId", "movieId", "timestamp"]
    )
    assert len(joined) == len(served)
    # and agree with the interactions asset's own index tables, read by Spark
    interactions = dataset.parent / "interactions"
    item_of = {r.item: int(r.raw_item) for r in spark.read.parquet(str(interactions / "item_index")).collect()}
    user_of = {r.user: int(r.raw_user) for r in spark.read.parquet(str(interactions / "user_index")).collect()}
    assert served[S.ITEM_ID].tolist() == [item_of[i] for i in test[S.ITEM]]
    assert served[S.USER_ID].tolist() == [user_of[u] for u in test[S.USER]]
    assert served[S.TITLE].tolist() == [_title(m) for m in served[S.ITEM_ID]]
    for m, cats in zip(served[S.ITEM_ID], served[S.CATEGORIES]):
        expected = [] if m == 1000 else sorted(MOVIES[m][1].split("|"))
        assert list(cats) == expected


def test_a_string_id_table_keeps_its_ids_and_names(spark, tmp_path):
    """A table source: integer user ids become int64, string item ids stay strings, names come from a column."""
    from recsys_assets.serving.source_ids import with_source_ids

    rows = [
        (u, f"sku-{i:03d}" if i % 2 else f"{i}x", f"Item {i}, size {i % 3}", "red|blue" if i % 2 else "", 100 * u + i)
        for u in (3, 20, 100)
        for i in range(1, 6)
    ]
    table = pd.DataFrame(rows, columns=["customer", "sku", "name", "tags", "ts"])
    table.to_csv(tmp_path / "events.csv", index=False)
    mapping = sources.ColumnMapping(
        user="customer", item="sku", timestamp="ts", item_categories="tags", item_name="name"
    )
    dataset = _build_dataset(spark, sources.read_table(spark, str(tmp_path / "events.csv"), mapping), tmp_path / "run")
    meta = S.DatasetMeta.load(S.DatasetPaths(dataset).meta)
    assert (meta.user_id_type, meta.item_id_type) == ("int64", "string")
    served = with_source_ids(_test_rows(dataset), dataset)
    assert served[S.USER_ID].dtype == np.int64 and served[S.ITEM_ID].map(type).eq(str).all()
    assert served.merge(table, left_on=[S.USER_ID, S.ITEM_ID, S.TIMESTAMP], right_on=["customer", "sku", "ts"]).shape[
        0
    ] == len(served)
    name_of = dict(zip(table["sku"], table["name"]))
    assert served[S.TITLE].tolist() == [name_of[i] for i in served[S.ITEM_ID]]


# ------------------------------------------------------------------------------------------------ the command
@pytest.fixture(scope="module")
def instance_with_recommendations(movielens, tmp_path_factory):
    """A Dagster instance whose latest `recommendations` is a list published from the MovieLens dataset: each
    user's unseen items (internal ids), ranked by internal id."""
    ratings, dataset = movielens
    splits = pd.read_parquet(S.DatasetPaths(dataset).splits)
    meta = S.DatasetMeta.load(S.DatasetPaths(dataset).meta)
    rows = []
    for u in range(meta.num_users):
        seen = set(splits.loc[(splits[S.USER] == u) & (splits[S.SPLIT] != "test"), S.ITEM])
        unseen = [i for i in range(meta.num_items) if i not in seen]
        rows += [(u, r, i, 1.0 - 0.1 * r, 0.5, r, "tt", "dl") for r, i in enumerate(unseen)]
    top = pd.DataFrame(
        rows,
        columns=["user", "rank", "item", "dlrm_score", "retrieval_score", "retrieval_rank", "two_tower_run_id"]
        + ["dlrm_run_id"],
    )
    folder = tmp_path_factory.mktemp("recommendations")
    publish_recommendations(top, dataset, folder)
    # stored as the I/O manager stores a value: its marker names the type (the CLI refuses a folder without it)
    (folder / MARKER).write_text(json.dumps({"type": "PublishedFolder", "fields": {"table": RECOMMENDATIONS_FILE}}))
    home = tmp_path_factory.mktemp("dagster_home")
    with dg.DagsterInstance.local_temp(str(home)) as instance:
        instance.report_runless_asset_event(
            dg.AssetMaterialization("recommendations", metadata={"path": dg.MetadataValue.path(str(folder))})
        )
    return home, folder


def test_published_recommendations_lead_with_source_ids_and_keep_internal_ids(instance_with_recommendations):
    _, folder = instance_with_recommendations
    recs = pd.read_parquet(folder / RECOMMENDATIONS_FILE)
    assert list(recs.columns[:5]) == [S.USER_ID, "rank", S.ITEM_ID, S.TITLE, S.CATEGORIES]
    assert {"user", "item", "dlrm_score", "retrieval_score"} <= set(recs.columns)
    assert set(recs[S.USER_ID]) == set(USERS) and set(recs[S.ITEM_ID]) <= set(MOVIES)
    popular = pd.read_parquet(folder / POPULAR_FILE)
    # 260 is in every user's history; leave-last-out keeps it out of test (it is rated first)
    assert popular[S.ITEM_ID].iloc[0] == 260 and popular["popularity"].iloc[0] == len(USERS)


def test_recommend_prints_a_known_users_items_in_movielens_ids(instance_with_recommendations, monkeypatch, capsys):
    from recsys_assets import cli

    home, folder = instance_with_recommendations
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    assert cli.main(["recommend", "--user", "611", "--k", "2"]) == 0
    out = capsys.readouterr().out
    recs = pd.read_parquet(folder / RECOMMENDATIONS_FILE)
    mine = recs[recs[S.USER_ID] == 611].sort_values("rank")
    assert "user 611: top 2" in out and FALLBACK_NOTE not in out
    lines = out.splitlines()
    for rank, (movie_id, title) in enumerate(zip(mine[S.ITEM_ID][:2], mine[S.TITLE][:2])):
        assert title == _title(movie_id)
        [line] = [ln for ln in lines if title in ln]
        assert line.split()[:2] == [str(rank), str(movie_id)]
    third = mine[S.TITLE].iloc[2]
    assert third not in out  # --k 2 shows two


def test_recommend_for_an_unknown_user_flags_the_popular_fallback(instance_with_recommendations, monkeypatch, capsys):
    from recsys_assets import cli

    home, _ = instance_with_recommendations
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    for user in ("4242", "not-a-number"):
        assert cli.main(["recommend", "--user", user, "--k", "3"]) == 0
        out = capsys.readouterr().out
        assert FALLBACK_NOTE in out
        first = [ln for ln in out.splitlines() if ln.lstrip().startswith("0 ")]
        assert first and "260" in first[0] and _title(260) in first[0] and "popular" in first[0]


def test_recommend_without_a_materialization_says_to_run_make_demo(tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    proc = subprocess.run(
        [sys.executable, "-m", "recsys_assets.cli", "recommend", "--user", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert "no materialization of 'recommendations'" in proc.stderr and "make demo" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_status_lists_what_is_materialized_and_fails_on_a_missing_requirement(
    instance_with_recommendations, monkeypatch, capsys
):
    from recsys_assets import cli

    home, folder = instance_with_recommendations
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    assert cli.main(["status", "--require", "evaluation:two_stage_hr@10"]) == 1
    captured = capsys.readouterr()
    assert "== recommendations" in captured.out and str(folder) in captured.out
    assert "REQUIRED: evaluation: not materialized" in captured.err
    # the observed source is shown, never reported as not materialized (make ci-materialize requires all)
    assert "== interaction_source (observed source): data version not observed yet" in captured.out
    assert "interaction_source" not in captured.err
