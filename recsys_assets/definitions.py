"""The code location: every asset, check, resource, job, schedule and sensor under recsys_assets/defs, collected
by Dagster's `load_from_defs_folder` ([tool.dg] in pyproject.toml; `dg check defs`, `dg launch`, `dg dev`)."""

from pathlib import Path

import dagster as dg

defs = dg.load_from_defs_folder(project_root=Path(__file__).resolve().parents[1])
