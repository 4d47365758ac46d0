"""Quality of the served list and of every stage against the baselines, on any interaction table, over seeds.

Reproduce (one evaluator, test phase; ~8 min per seed on 2 cores for ml-latest-small, ~12 for Last.fm):
    V=$(bash scripts/bootstrap.sh); export PYSPARK_PYTHON=$V/bin/python
    $V/bin/python benchmarks/quality.py --dataset movielens --seeds 3 --sasrec --search 4
    $V/bin/python benchmarks/quality.py --dataset lastfm --seeds 3 --search 4
    $V/bin/python benchmarks/quality.py --source-config my_table.yaml --seeds 3   # any table
    # after a ranker change: rerun only the ranking stages on the data and Two Tower of the last run in --work
    $V/bin/python benchmarks/quality.py --dataset movielens --stages ranking_dataset,dlrm_model,recommendations,evaluation

Datasets: `movielens` (../shared/data/ml-latest-small, or --path to any MovieLens folder), `lastfm` (HetRec 2011
Last.fm, ../shared/data/hetrec2011-lastfm-2k: play counts without time, so each user's rows are put in a seeded
random order; artist names and tags through side tables), or `--source-config` (the `raw_interactions` config
block as YAML/JSON: a table path and its column mapping).

What it does: materializes the whole Dagster graph (real Spark, TorchDistributor with its default process count, MLflow on
SQLite under --work) for seed 0; for each further seed it materializes the model stages again (two_tower_model
→ … → evaluation) on the same data assets with every model seed changed. The baselines'
rows (EASE, Spark ALS with its own fixed seed, SASRec seeded by itself) do not depend on the models' seed, so
they are computed in the first run only and their rows reused for the later seeds (a --stages run pins their
settings to those the earlier run chose on validation). Likewise the funnel's EASE source takes the λ that
run 1 chose, without its grid. It prints
the mean ± std over seeds of each row of the `evaluation` asset's table (HR@10, NDCG@10, retrieval HR@100), the
served stage of each seed, and the targets: the served list against the best classical baseline (MostPopular,
LastItemMarkov, EASE, ALS) and SASRec, and the retrieval pool's HR@K against the best baseline HR@100.
Settings are chosen on validation only; test is read once per run, in `evaluation`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"
MODEL_STAGES = (
    "two_tower_model",
    "item_embeddings",
    "item_index",
    "retrieval_candidates",
    "ranking_dataset",
    "dlrm_model",
    "recommendations",
    "evaluation",
)
# The online model is not part of the quality figures; `--stages two_stage_model` registers it on a finished run
# (benchmarks/serving.py serves it).
ONLINE_STAGES = ("two_stage_model",)
CLASSICAL = ("mostpopular", "lastitemmarkov", "ease", "spark_als")
# metric prefixes of the baselines computed in the first run only (none depends on the models' seed)
SEED_FREE_BASELINES = ("ease_", "spark_als_", "sasrec_")


def lastfm_source(root: Path) -> dict:
    """The Last.fm files through the `table` source: a column mapping and two side tables, nothing else."""
    return {
        "source": "table",
        "table": {
            "path": str(root / "user_artists.dat"),
            "user_column": "userID",
            "item_column": "artistID",
            "timestamp_column": None,
            "order": "random",
            "rating_column": "weight",
            "integer_ids": True,
            "item_tables": [
                {"path": str(root / "artists.dat"), "item_column": "id", "name_column": "name"},
                {"path": str(root / "user_taggedartists.dat"), "item_column": "artistID", "category_column": "tagID"},
            ],
        },
    }


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _seeded(seed: int) -> dict:
    return {
        "two_tower_model": {"config": {"seed": seed, "search_seed": seed}},
        "retrieval_candidates": {"config": {"seed": seed}},
        "ranking_dataset": {"config": {"seed": seed}},
        "dlrm_model": {"config": {"seed": seed, "search_seed": seed}},
    }


def searched(trials: int, budget_seconds: float) -> dict:
    """Both models' Optuna search on validation (N trials, the first the configured settings) within the graph."""
    search = {"search_trials": trials, "search_timeout_seconds": budget_seconds}
    if not trials:
        return {}
    return {"two_tower_model": {"config": search}, "dlrm_model": {"config": search}}


def materialize(work: Path, ops: dict, selection: tuple[str, ...] | None) -> dict:
    import dagster as dg

    from recsys_assets.definitions import defs
    from recsys_assets.defs.resources import MLflowResource, SparkResource, StateResource, TorchDistributorResource
    from recsys_assets.defs.storage import AssetFolderIOManager

    spark, state = (
        SparkResource(master="local[2]", shuffle_partitions=8, driver_memory="4g"),
        StateResource(root=str(work / "state")),
    )
    (work / "dagster_home").mkdir(parents=True, exist_ok=True)
    instance = dg.DagsterInstance.local_temp(str(work / "dagster_home"))
    t0 = time.time()
    result = dg.materialize(
        [*defs.assets, *defs.asset_checks],
        selection=dg.AssetSelection.assets(*selection)
        if selection
        else dg.AssetSelection.all() - dg.AssetSelection.assets(*ONLINE_STAGES),
        resources={
            "spark": spark,
            "state": state,
            "torch_distributor": TorchDistributorResource(spark=spark, local_mode=True, timeout_seconds=3600),
            "mlflow": MLflowResource(
                state=state, tracking_uri=f"sqlite:///{work}/mlflow.db", artifact_location=(work / "artifacts").as_uri()
            ),
            "io_manager": AssetFolderIOManager(state=state),
        },
        run_config={"ops": {k: v for k, v in ops.items() if not selection or k in selection}},
        raise_on_error=False,
        # persistent: a later run of the model stages loads the data assets the first run recorded
        instance=instance,
    )
    seconds = time.time() - t0
    # the assets this run did not materialize (--stages): the materializations it read
    events = [
        instance.get_latest_materialization_event(key) for key in defs.resolve_asset_graph().materializable_asset_keys
    ]
    md = {e.asset_materialization.asset_key.to_user_string(): e.asset_materialization for e in events if e}
    md |= {e.asset_key.to_user_string(): e.materialization for e in result.get_asset_materialization_events()}
    md = {asset: {k: v.value for k, v in m.metadata.items()} for asset, m in md.items()}
    checks = {e.check_name: (e.passed, e.description) for e in result.get_asset_check_evaluations()}
    return {"success": result.success, "metadata": md, "checks": checks, "seconds": seconds}


def validation_lists(md: dict, seed: int, holdout_fraction: float = 0.2) -> dict[str, float]:
    """The numbers settings are chosen on (validation only): the holdout lists' NDCG@10 / HR@10 in the DLRM order
    and in the retrieval (pool) order, over all holdout lists and over the hashed share of users that is the
    holdout without a ranker window (so runs with and without a window compare on the same users), with the
    number of training and holdout lists."""
    import pandas as pd
    from pyspark.sql import SparkSession

    from recsys_assets.data.ranking import hashed_holdout_users
    from recsys_assets.evaluation.lists import compare_orders
    from recsys_assets.serving.rerank import dlrm_scores

    ranking, dlrm = md["ranking_dataset"], md["dlrm_model"]
    holdout_path = Path(ranking["path"]) / "holdout.parquet"
    holdout = pd.read_parquet(holdout_path, columns=["user", "query_id", "label", "pool_rank"])
    holdout["dlrm"] = dlrm_scores(dlrm["path"], holdout_path)
    spark = SparkSession.builder.getOrCreate()
    users = spark.createDataFrame(pd.DataFrame({"user": holdout["user"].unique().astype("int32")}))
    hashed = {r.user for r in users.filter(hashed_holdout_users(holdout_fraction, seed)).collect()}
    out = {"train_lists": float(ranking["train_lists"]), "holdout_lists": float(ranking["holdout_lists"])}
    for name, part in (("all", holdout), ("hashed", holdout[holdout["user"].isin(hashed)])):
        orders = {"dlrm": part["dlrm"].to_numpy(), "pool": -part["pool_rank"].to_numpy().astype(float)}
        for order, m in compare_orders(part["query_id"].to_numpy(), part["label"].to_numpy(), orders).items():
            out |= {f"{name}_{order}_{k}": float(v) for k, v in m.items()}
        out[f"{name}_lists"] = float(part["query_id"].nunique())
    out["two_tower_validation_ndcg@10"] = float(md["two_tower_model"]["validation_ndcg@10"])
    return out


def validation_report(rows: list[dict[str, float]]) -> str:
    keys = list(rows[0])
    lines = ["\n### validation (holdout lists; what settings are chosen on)", "| figure | mean ± std |", "|---|---|"]
    for k in keys:
        v = [r[k] for r in rows]
        std = statistics.pstdev(v) if len(v) > 1 else 0.0
        lines.append(f"| {k} | {statistics.fmean(v):.4f} ± {std:.4f} |")
    return "\n".join(lines)


def earlier_evaluation(work: Path) -> Path | None:
    """The folder of the latest `evaluation` the Dagster instance under `work` recorded (None: there is none)."""
    import dagster as dg

    from recsys_assets.defs.resources import StateResource
    from recsys_assets.defs.storage import stored_folder

    if not (work / "dagster_home").is_dir():
        return None
    instance = dg.DagsterInstance.local_temp(str(work / "dagster_home"))
    return stored_folder(instance, dg.AssetKey("evaluation"), None, StateResource(root=str(work / "state")))


def pinned_item_item_lambda(metadata: dict) -> dict:
    """The run config that gives the funnel's EASE source the λ run 1 chose on validation: the choice depends on
    the data only, so the later seeds skip its grid (~13 s per seed on Last.fm)."""
    lam = metadata.get("retrieval_candidates", {}).get("item_item_lambda")
    return {"retrieval_candidates": {"config": {"item_item_lambdas": [float(lam)]}}} if lam is not None else {}


def pinned_baselines(evaluation_folder: Path) -> dict:
    """The evaluation config that re-runs the baselines with the settings chosen on validation in run 1."""
    chosen = json.loads((evaluation_folder / "evaluation.json").read_text())["chosen"]
    pins: dict = {}
    if "EASE" in chosen:
        pins["ease_lambdas"] = [float(chosen["EASE"]["lam"])]
    if "Spark ALS" in chosen:
        p = chosen["Spark ALS"]
        pins.update(als_ranks=[int(p["rank"])], als_reg_params=[float(p["reg_param"])], als_alphas=[float(p["alpha"])])
    if "SASRec" in chosen:
        pins.update({f"sasrec_{k}": [v] for k, v in chosen["SASRec"].items()})
    return pins


def summarize(runs: list[dict]) -> tuple[dict[str, tuple[float, float]], list[str]]:
    """Mean and std (population std over seeds; 0 for one seed) of every flat evaluation metric."""
    keys = sorted({k for r in runs for k, v in r.items() if isinstance(v, float)})
    out = {}
    for k in keys:
        values = [r[k] for r in runs if k in r]
        out[k] = (statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0)
    models = sorted({k.rsplit("_", 1)[0] for k in keys if k.endswith("_hr@10")})
    return out, models


def report(name: str, runs: list[dict], served: list[str], seconds: list[float]) -> str:
    stats, models = summarize(runs)
    fmt = lambda k: f"{stats[k][0]:.4f} ± {stats[k][1]:.4f}" if k in stats else ""  # noqa: E731
    k100 = next((k.split("@")[1] for k in stats if k.startswith("two_stage_retrieval_hr@")), "100")
    lines = [
        f"\n## {name}: test phase, mean ± std over {len(runs)} seed(s); served stage per seed: {served}; "
        f"graph seconds per seed: {[round(s) for s in seconds]}",
        f"| model | HR@10 | NDCG@10 | HR@{k100} |",
        "|---|---|---|---|",
    ]
    for m in models:
        hr100 = f"{m}_retrieval_hr@{k100}" if f"{m}_retrieval_hr@{k100}" in stats else f"{m}_hr@{k100}"
        lines.append(f"| {m} | {fmt(f'{m}_hr@10')} | {fmt(f'{m}_ndcg@10')} | {fmt(hr100)} |")
    classical = [m for m in models if m.startswith(CLASSICAL)]
    lines += ["", "| target | value | reference | ratio |", "|---|---|---|---|"]
    for metric in ("hr@10", "ndcg@10"):
        served_v = stats[f"served_list_{metric}"][0]
        best = max(classical, key=lambda m: stats[f"{m}_{metric}"][0])
        ref = stats[f"{best}_{metric}"][0]
        lines.append(
            f"| served {metric.upper()} vs best classical ({best}) | {served_v:.4f} | {ref:.4f} | "
            f"{_ratio(served_v, ref)} |"
        )
        if f"sasrec_{metric}" in stats:
            sas = stats[f"sasrec_{metric}"][0]
            lines.append(
                f"| served {metric.upper()} vs SASRec | {served_v:.4f} | {sas:.4f} | {_ratio(served_v, sas)} |"
            )
    pool = stats.get(f"two_stage_retrieval_hr@{k100}", (float("nan"),))[0]
    best_hr = max(classical, key=lambda m: stats.get(f"{m}_hr@{k100}", (0.0,))[0])
    ref = stats.get(f"{best_hr}_hr@{k100}", (float("nan"),))[0]
    lines.append(
        f"| retrieval pool HR@{k100} vs best baseline ({best_hr}) | {pool:.4f} | {ref:.4f} | {_ratio(pool, ref)} |"
    )
    return "\n".join(lines)


def peak_step_rss(metadata: dict) -> tuple[float, str]:
    """(MB, asset): the largest `peak_rss_mb` among the run's steps (the graph's own process, not its children)."""
    return max(((float(m.get("peak_rss_mb", 0.0)), asset) for asset, m in metadata.items()), default=(0.0, "-"))


def _ratio(value: float, reference: float) -> str:
    """value / reference, or n/a where the reference is 0 (a table no baseline ranks a hit on)."""
    return f"{value / reference:.2f}x" if reference else "n/a (reference 0)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", choices=("movielens", "lastfm"), default="movielens")
    ap.add_argument("--path", default=None, help="The dataset's folder (default: under ../shared/data).")
    ap.add_argument("--source-config", default=None, help="YAML/JSON raw_interactions config (any table).")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--sasrec", action="store_true", help="Add the SASRec reference to the evaluation.")
    ap.add_argument("--work", default="/tmp/recsys-quality")
    ap.add_argument("--run-config", default=None, help="YAML/JSON with extra {'ops': ...} run config.")
    ap.add_argument(
        "--search",
        type=int,
        default=0,
        help="Optuna trials of each model's settings search on validation, inside the graph (0: the defaults).",
    )
    ap.add_argument("--search-budget", type=float, default=300.0, help="Wall-clock seconds of each model's search.")
    ap.add_argument(
        "--stages",
        default=None,
        help=f"Comma-separated assets among {', '.join(MODEL_STAGES + ONLINE_STAGES)} to rerun, for every seed, on what the last run "
        "in the same --work materialized (its Dagster instance), with the baselines pinned to its choices: a "
        "DLRM change need not retrain the Two Tower.",
    )
    args = ap.parse_args()
    stages = tuple(s.strip() for s in args.stages.split(",")) if args.stages else None
    allowed = set(MODEL_STAGES + ONLINE_STAGES)
    if stages and not set(stages) <= allowed:
        ap.error(f"--stages: {sorted(set(stages) - allowed)} are not among {sorted(allowed)}")
    import yaml

    if args.source_config:
        source, name = yaml.safe_load(Path(args.source_config).read_text()), args.source_config
    elif args.dataset == "lastfm":
        root = Path(args.path or SHARED / "hetrec2011-lastfm-2k")
        if not (root / "user_artists.dat").exists():
            print(f"skipped: {root} has no user_artists.dat (HetRec 2011 Last.fm is expected beside the repo)")
            return 0
        source, name = lastfm_source(root), f"Last.fm ({root.name}, random order)"
    else:
        root = Path(args.path or SHARED / "ml-latest-small")
        if not root.exists():
            print(f"skipped: {root} does not exist (MovieLens latest-small is expected beside the repo)")
            return 0
        source, name = {"source": "movielens", "movielens_path": str(root)}, f"MovieLens ({root.name})"
    ops = {"raw_interactions": {"config": source}}
    if args.sasrec:
        ops["evaluation"] = {"config": {"sasrec": True}}
    ops = _merge(ops, searched(args.search, args.search_budget))
    if args.run_config:
        ops = _merge(ops, yaml.safe_load(Path(args.run_config).read_text()).get("ops", {}))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if stages:
        earlier = earlier_evaluation(work)
        if earlier is None:
            print(f"--stages needs an earlier run in {work} that reached evaluation: run without --stages first")
            return 1
        ops = _merge(ops, {"evaluation": {"config": pinned_baselines(earlier)}})
    runs, served, seconds, validation, peaks = [], [], [], [], []
    for seed in range(args.seeds):
        selection = stages or (None if seed == 0 else MODEL_STAGES)
        out = materialize(work, _merge(ops, _seeded(seed)), selection)
        for check, (passed, why) in sorted(out["checks"].items()):
            if not passed:
                print(f"seed {seed}: check {check} FAILED — {why}")
        ev = out["metadata"].get("evaluation")
        if not ev:
            print(f"seed {seed}: no evaluation (the graph stopped before it; see the checks above)")
            return 1
        peaks.append(peak_step_rss(out["metadata"]))
        print(f"seed {seed}: {out['seconds']:.0f} s, served {ev['served_stage']}\n{ev['metrics']}", flush=True)
        metrics = {k: v for k, v in ev.items() if isinstance(v, float)}
        if seed > 0:  # the baselines do not depend on the models' seed: computed once, in run 1, on the same data
            metrics.update({k: v for k, v in runs[0].items() if k.startswith(SEED_FREE_BASELINES)})
        runs.append(metrics)
        validation.append(validation_lists(out["metadata"], seed))
        served.append(ev["served_stage"])
        seconds.append(out["seconds"])
        if seed == 0:  # the baselines' rows of this run serve the later seeds
            ops = _merge(ops, {"evaluation": {"config": {"ease": False, "als": False, "sasrec": False}}})
            ops = _merge(ops, pinned_item_item_lambda(out["metadata"]))
    text = report(name, runs, served, seconds) + "\n" + validation_report(validation)
    # each step restarts the process's peak-RSS count (its metadata), so /usr/bin/time sees the last step's only
    text += "\npeak RSS of the graph's process, its largest step, per seed: " + ", ".join(
        f"{mb:.0f} MB ({asset})" for mb, asset in peaks
    )
    print(text)
    (work / "quality.md").write_text(text + "\n")
    summary = {"runs": runs, "served": served, "seconds": seconds, "validation": validation, "peak_step_rss": peaks}
    (work / "quality.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
