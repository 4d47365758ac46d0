"""A table with a wide catalogue for the memory targets of the item-item steps: every one of `--items` items is
interacted with (at least twice), by `--users` users with random timestamps. Writes Parquet and the source config
that `benchmarks/quality.py` reads.

Reproduce (100k items: the dense items x items EASE, the funnel's item-item source and the EASE baseline, would need
a 37 GiB float32 matrix, so both step aside before allocating and say why; 20k items: they run):
    V=$(bash scripts/bootstrap.sh); export PYSPARK_PYTHON=$V/bin/python
    $V/bin/python benchmarks/wide_catalogue.py --items 100000 --out /tmp/wide100k
    /usr/bin/time -v $V/bin/python benchmarks/quality.py --source-config /tmp/wide100k/source.yaml \
        --run-config benchmarks/configs/memory_run.yaml --seeds 1 --work /tmp/q-wide100k
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import yaml


def wide_table(items: int, users: int, per_item: int, seed: int) -> pd.DataFrame:
    """`per_item` rows of each item, spread over `users` users (a user's rows are distinct items)."""
    rng = np.random.default_rng(seed)
    item = np.tile(np.arange(items), per_item)
    user = rng.integers(0, users, len(item))
    table = pd.DataFrame({"user": user, "item": item}).drop_duplicates(ignore_index=True)
    table["timestamp"] = 1_600_000_000 + rng.integers(0, 365 * 86400, len(table))
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--users", type=int, default=5_000)
    ap.add_argument("--per-item", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/recsys-wide-catalogue")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = wide_table(args.items, args.users, args.per_item, args.seed)
    table.to_parquet(out / "interactions.parquet", index=False)
    source = {"source": "table", "table": {"path": str(out / "interactions.parquet")}}
    (out / "source.yaml").write_text(yaml.safe_dump(source))
    print(f"{len(table)} rows, {table['user'].nunique()} users, {table['item'].nunique()} items -> {out}")


if __name__ == "__main__":
    main()
