"""Prints what the last materialization of each asset recorded (run by `make demo` after materializing).

Reads the persistent Dagster instance at $DAGSTER_HOME, so it shows exactly what the UI shows."""
from __future__ import annotations

import sys

import dagster as dg


def main() -> int:
    from recsys_assets.definitions import defs

    instance = dg.DagsterInstance.get()
    keys = [k for k in defs.resolve_asset_graph().get_all_asset_keys()]
    missing = []
    for key in sorted(keys, key=lambda k: k.to_user_string()):
        event = instance.get_latest_materialization_event(key)
        if event is None or event.asset_materialization is None:
            missing.append(key.to_user_string())
            continue
        md = event.asset_materialization.metadata
        shown = {
            k: v.value
            for k, v in md.items()
            if isinstance(v.value, (int, float, str)) and k != "path" and not k.startswith("dagster/") and len(str(v.value)) < 120
        }
        print(f"== {key.to_user_string()}")
        for k, v in shown.items():
            print(f"   {k}: {v:.4f}" if isinstance(v, float) else f"   {k}: {v}")
    if missing:
        print(f"not materialized: {missing}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
