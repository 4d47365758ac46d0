"""Quality of the two-stage recommender on MovieLens (ml-latest-small), against the baselines, one evaluator.

Reproduce (prints the tables below; ~8 min on 2 cores):
    V=$(bash scripts/bootstrap.sh); PYSPARK_PYTHON=$V/bin/python $V/bin/python benchmarks/quality.py \
        [--movielens ../shared/data/ml-latest-small] [--work /tmp/quality] [--run-config extra.yaml]

What it does: materializes the whole Dagster graph (real Spark, TorchDistributor with 2 gloo processes, MLflow
on a SQLite file under --work) with the MovieLens source, then prints
1. the `evaluation` asset's table: test phase, full ranking, train and validation items excluded — retrieval
   HR@K, the Two Tower alone, the two-stage list (Two Tower top-K → DLRM top-10), MostPopular, LastItemMarkov,
   EASE and Spark ALS (each tuned on validation), with the issue's target (1.5 × the best baseline);
2. the ranker's own numbers: AUROC / log-loss on holdout and test pairs, and the holdout users' validation
   lists ordered by the Two Tower vs by the DLRM (the quality gate's evidence: the only numbers any setting was
   chosen on, together with the validation metrics of the Two Tower).
Settings are chosen on validation only (epochs by early stopping; EASE λ and ALS by `tune`); test is reported
once per run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_RUN_CONFIG = {
    "two_tower_model": {"config": {"epochs": 10, "patience": 3}},
}


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def run(movielens: Path, work: Path, extra: dict) -> dict:
    import dagster as dg

    from recsys_assets.definitions import defs
    from recsys_assets.defs.resources import MLflowResource, SparkResource, StateResource, TorchDistributorResource

    ops = _merge(
        DEFAULT_RUN_CONFIG, {"raw_interactions": {"config": {"source": "movielens", "movielens_path": str(movielens)}}}
    )
    ops = _merge(ops, extra.get("ops", {}))
    t0 = time.time()
    result = dg.materialize(
        [*defs.assets, *defs.asset_checks],
        resources={
            "spark": SparkResource(master="local[2]", shuffle_partitions=8, driver_memory="4g"),
            "state": StateResource(root=str(work / "state")),
            "torch_distributor": TorchDistributorResource(num_processes=2, local_mode=True, timeout_seconds=3600),
            "mlflow": MLflowResource(
                tracking_uri=f"sqlite:///{work}/mlflow.db", artifact_location=(work / "artifacts").as_uri()
            ),
        },
        run_config={"ops": ops},
        raise_on_error=False,
    )
    seconds = time.time() - t0
    md = {}
    for e in result.get_asset_materialization_events():
        md[e.asset_key.to_user_string()] = {k: v.value for k, v in e.materialization.metadata.items()}
    checks = {e.check_name: (e.passed, e.description) for e in result.get_asset_check_evaluations()}
    return {"success": result.success, "metadata": md, "checks": checks, "seconds": seconds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--movielens", default=str(REPO.parent / "shared" / "data" / "ml-latest-small"))
    ap.add_argument("--work", default="/tmp/recsys-quality")
    ap.add_argument("--run-config", default=None, help="YAML/JSON with extra {'ops': ...} run config")
    args = ap.parse_args()
    ml = Path(args.movielens)
    if not (ml / "ratings.csv").exists():
        print(f"skipped: {ml} has no ratings.csv (MovieLens latest-small is expected beside the repo)")
        return 0
    extra = {}
    if args.run_config:
        import yaml

        extra = yaml.safe_load(Path(args.run_config).read_text())
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = run(ml, work, extra)
    md = out["metadata"]
    print(f"\nml-latest-small, whole graph materialized in {out['seconds']:.0f} s, success={out['success']}")
    for name, (passed, why) in sorted(out["checks"].items()):
        print(f"  check {name}: {'passed' if passed else 'FAILED'}{'' if passed else ' — ' + str(why)}")
    tt = md.get("two_tower_model", {})
    print(
        f"\nTwo Tower validation (fit train): HR@10 {tt.get('validation_hr@10', float('nan')):.4f} "
        f"NDCG@10 {tt.get('validation_ndcg@10', float('nan')):.4f} (best epoch {tt.get('best_epoch')})"
    )
    d = md.get("dlrm_model", {})
    if d:
        print("\nDLRM ranker (pairs):")
        print(d["metrics"])
    ev = md.get("evaluation")
    if not ev:
        print("\n(no evaluation: the graph stopped before it; see the checks above)")
        return 1
    print("\nTest phase (evaluation asset):")
    print(ev["metrics"])
    baselines = {k: v for k, v in ev.items() if isinstance(v, float) and not k.startswith(("two_stage", "two_tower"))}
    best_hr = max(v for k, v in baselines.items() if k.endswith("_hr@10"))
    best_ndcg = max(v for k, v in baselines.items() if k.endswith("_ndcg@10"))
    print("\n| | two-stage | best baseline | target (1.5x) | ratio |\n|---|---|---|---|---|")
    for m, best in (("hr@10", best_hr), ("ndcg@10", best_ndcg)):
        v = ev[f"two_stage_{m}"]
        print(f"| {m.upper()} | {v:.4f} | {best:.4f} | {1.5 * best:.4f} | {v / best:.2f}x |")
    print(
        f"| NDCG@10 two-stage vs Two Tower alone | {ev['two_stage_ndcg@10']:.4f} | {ev['two_tower_ndcg@10']:.4f} | | "
        f"{ev['two_stage_ndcg@10'] / ev['two_tower_ndcg@10']:.2f}x |"
    )
    (work / "quality.json").write_text(
        json.dumps({k: v for k, v in ev.items() if isinstance(v, (int, float))}, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
