"""recsys-assets: look at what the Dagster instance at $DAGSTER_HOME has materialized (what the UI shows).

  recsys-assets recommend --user <source id> [--k 10]   a user's served top-k, in the source's ids, from the
                                                       latest `recommendations`; an unknown user gets the most
                                                       popular items, flagged as a fallback
  recsys-assets status [--require ASSET:KEY,KEY ...]    each asset's last materialization and its metrics;
                                                       exits 1 unless every asset is materialized and each
                                                       required metadata entry is a finite number (CI);
                                                       first marks runs whose process is gone as failed and
                                                       frees their pool slots (defs/dead_runs.py)

Also runnable as ``python -m recsys_assets.cli``. The lookup itself is recsys_assets.serving.lookup."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import dagster as dg

RECOMMENDATIONS = "recommendations"


class CliError(Exception):
    """A problem the user can fix; printed without a traceback, exit code 1."""


def _instance() -> dg.DagsterInstance:
    try:
        return dg.DagsterInstance.get()
    except dg.DagsterError as e:  # $DAGSTER_HOME unset, or not a folder
        hint = "Set DAGSTER_HOME (`make demo` uses .recsys_state/dagster_home)."
        raise CliError(f"no Dagster instance: {e}. {hint}") from e


def _published_folder(instance: dg.DagsterInstance, asset: str) -> Path:
    """The folder of `asset`'s latest materialization, through the I/O manager's record (a local copy when it is
    on object storage)."""
    from recsys_assets.defs.resources import StateResource
    from recsys_assets.defs.storage import stored_folder

    try:
        folder = stored_folder(instance, dg.AssetKey(asset), None, StateResource())
    except dg.Failure as e:  # recorded, but gone or incomplete
        raise CliError(f"the latest {asset!r} cannot be read: {e.description}; run `make demo`") from e
    if folder is None:
        raise CliError(
            f"no materialization of {asset!r} in the Dagster instance at {instance.root_directory}: "
            "run `make demo` first (or materialize the graph)"
        )
    return folder


def recommend(args: argparse.Namespace) -> int:
    from recsys_assets.serving.lookup import lookup

    folder = _published_folder(_instance(), RECOMMENDATIONS)
    print(lookup(folder, args.user, args.k).format())
    return 0


def status(args: argparse.Namespace) -> int:
    from recsys_assets.definitions import defs
    from recsys_assets.defs.dead_runs import release_dead_runs

    required: dict[str, list[str]] = {}
    for spec in args.require:
        asset, _, keys = spec.partition(":")
        required.setdefault(asset, []).extend(k for k in keys.split(",") if k)
    instance = _instance()
    release_dead_runs(instance, log=lambda line: print(f"released: {line}", file=sys.stderr))
    problems, missing = [], []
    graph = defs.resolve_asset_graph()
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        name = key.to_user_string()
        if not graph.get(key).is_materializable:  # the observed source: its latest data version, if observed
            record = instance.get_latest_data_version_record(key)
            version = record.asset_observation.data_version if record and record.asset_observation else None
            print(f"== {name} (observed source): data version {version[:12] if version else 'not observed yet'}")
            continue
        event = instance.get_latest_materialization_event(key)
        if event is None or event.asset_materialization is None:
            missing.append(name)
            continue
        md = event.asset_materialization.metadata
        for k in required.get(name, []):
            v = md.get(k)
            if v is None or not isinstance(v.value, (int, float)) or not math.isfinite(v.value):
                problems.append(f"{name}: metadata {k!r} missing or not a finite number")
        shown = {
            k: v.value
            for k, v in md.items()
            if isinstance(v.value, (int, float, str)) and not k.startswith("dagster/") and len(str(v.value)) < 120
        }
        print(f"== {name} (run {event.run_id[:8]})" if event.run_id else f"== {name}")
        for k, v in shown.items():
            print(f"   {k}: {v:.4f}" if isinstance(v, float) else f"   {k}: {v}")
    problems += [f"{a}: not materialized" for a in required if a in missing]
    if missing:
        print(f"not materialized: {missing}", file=sys.stderr)
    for p in problems:
        print(f"REQUIRED: {p}", file=sys.stderr)
    return 1 if missing or problems else 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="recsys-assets", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("recommend", help="a user's top-k from the latest recommendations, in source ids")
    rec.add_argument("--user", required=True, help="the user's id in the source (e.g. MovieLens userId)")
    rec.add_argument("--k", type=int, default=10, help="items to show (default 10)")
    rec.set_defaults(run=recommend)
    st = sub.add_parser("status", help="each asset's last materialization and its metrics")
    st.add_argument("--require", action="append", default=[], metavar="ASSET:KEY,KEY")
    st.set_defaults(run=status)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "k", 1) < 1:
        print("error: --k must be >= 1", file=sys.stderr)
        return 2
    try:
        return args.run(args)
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
