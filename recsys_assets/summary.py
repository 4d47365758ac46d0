"""Prints what the last materialization of each asset recorded (run by `make demo` after materializing).

Reads the persistent Dagster instance at $DAGSTER_HOME, so it shows exactly what the UI shows.
``--require ASSET:KEY,KEY`` (repeatable) exits 1 unless those metadata entries exist as finite numbers: CI uses
it to check that the evaluation asset has its metrics after `dagster asset materialize --select '*'`."""

from __future__ import annotations

import argparse
import math
import sys

import dagster as dg


def main(argv: list[str] | None = None) -> int:
    from recsys_assets.definitions import defs

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--require", action="append", default=[], metavar="ASSET:KEY,KEY")
    args = ap.parse_args(argv)
    required = {}
    for spec in args.require:
        asset, _, keys = spec.partition(":")
        required.setdefault(asset, []).extend(k for k in keys.split(",") if k)
    problems = []

    instance = dg.DagsterInstance.get()
    keys = [k for k in defs.resolve_asset_graph().get_all_asset_keys()]
    missing = []
    for key in sorted(keys, key=lambda k: k.to_user_string()):
        event = instance.get_latest_materialization_event(key)
        if event is None or event.asset_materialization is None:
            missing.append(key.to_user_string())
            continue
        md = event.asset_materialization.metadata
        for k in required.get(key.to_user_string(), []):
            v = md.get(k)
            if v is None or not isinstance(v.value, (int, float)) or not math.isfinite(v.value):
                problems.append(f"{key.to_user_string()}: metadata {k!r} missing or not a finite number")
        shown = {
            k: v.value
            for k, v in md.items()
            if isinstance(v.value, (int, float, str))
            and k != "path"
            and not k.startswith("dagster/")
            and len(str(v.value)) < 120
        }
        print(f"== {key.to_user_string()}")
        for k, v in shown.items():
            print(f"   {k}: {v:.4f}" if isinstance(v, float) else f"   {k}: {v}")
    problems += [f"{a}: not materialized" for a in required if a in missing]
    if missing:
        print(f"not materialized: {missing}", file=sys.stderr)
    for p in problems:
        print(f"REQUIRED: {p}", file=sys.stderr)
    return 1 if missing or problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
