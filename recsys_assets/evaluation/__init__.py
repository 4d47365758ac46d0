"""The project's one offline evaluator (full ranking, leave-last-out) and its reference baselines.

No Dagster in here: assets call these functions. Spark is used only by `SparkALS`, which takes a SparkSession.
The baselines are imported lazily (PEP 562), so ``python -m recsys_assets.evaluation.baselines`` runs cleanly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from recsys_assets.evaluation.protocol import (
    PHASES,
    EvalResult,
    EvalTask,
    evaluate,
    index_interactions,
    leave_last_out_splits,
    metrics_from_ranks,
    ranks_from_scores,
)

if TYPE_CHECKING:  # pragma: no cover
    from recsys_assets.evaluation.baselines import (
        EASE,
        Baseline,
        LastItemMarkov,
        MostPopular,
        SparkALS,
        TuneResult,
        tune,
    )

_BASELINE_NAMES = ("EASE", "Baseline", "LastItemMarkov", "MostPopular", "SparkALS", "TuneResult", "tune")


def __getattr__(name: str) -> Any:
    if name in _BASELINE_NAMES:
        return getattr(importlib.import_module("recsys_assets.evaluation.baselines"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PHASES",
    "EvalResult",
    "EvalTask",
    "evaluate",
    "index_interactions",
    "leave_last_out_splits",
    "metrics_from_ranks",
    "ranks_from_scores",
    "EASE",
    "Baseline",
    "LastItemMarkov",
    "MostPopular",
    "SparkALS",
    "TuneResult",
    "tune",
]
