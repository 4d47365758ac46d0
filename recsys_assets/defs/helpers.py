"""What the asset modules share: the training launcher with readable progress, and metadata / check results in
Dagster's types."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import dagster as dg

from recsys_assets.data.checks import CheckOutcome
from recsys_assets.data.stages import Preview
from recsys_assets.defs.resources import TorchDistributorResource


def progress_logger(context: dg.AssetExecutionContext, model_name: str):
    """Turns the JSON lines rank 0 writes per epoch into one readable line in the Dagster log."""

    def log(record: dict) -> None:
        if record.get("event") == "epoch":
            shown = {k: v for k, v in record.get("metrics", {}).items() if "@" in k and "100" not in k}
            metrics = " ".join(f"{k}={v:.4f}" for k, v in shown.items())
            context.log.info(
                f"{model_name} [{record.get('phase')}] epoch {record.get('epoch')}: "
                f"loss {record.get('loss', float('nan')):.4f} {metrics}"
            )
        elif record.get("event") == "end":
            context.log.info(
                f"{model_name} [{record.get('phase', '')}] finished: best epoch "
                f"{record.get('best_epoch')}, {record.get('final_metrics')}"
            )

    return log


def launcher(
    context: dg.AssetExecutionContext,
    torch_distributor: TorchDistributorResource,
    model_name: str,
):
    """`launch(fn, config, progress_file=...)` for training.runs: TorchDistributor, progress in the Dagster log."""
    return functools.partial(torch_distributor.run, context, on_progress=progress_logger(context, model_name))


# Fields of a training config that say where a run reports, not what it trains.
REPORTING_FIELDS = ("mlflow_run_id", "mlflow_prefix", "progress_file", "checkpoint_dir")


class TrainedOnce:
    """Launch results by what they trained (the config less REPORTING_FIELDS and `unscored`). A settings search's
    trial trains exactly what the fit trains when the fit keeps its settings (trial 0: the configured ones), so
    the fit takes the trial's result instead of a second launch (~10 s start-up plus the epochs).

    `unscored`: config fields a trial leaves out that do not change the training (the DLRM's final_sets: a trial
    never scores test); `complete(result, config)` then adds what they produce to the reused result."""

    def __init__(self, log, *, unscored: tuple[str, ...] = (), complete=None) -> None:
        self.log, self.results = log, {}
        self.unscored, self.complete = unscored, complete

    def record(self, launch):
        """`launch`, remembering each result."""

        def run(fn, config, **kwargs):
            result = launch(fn, config, **kwargs)
            self.results[self._key(config)] = result
            return result

        return run

    def reuse(self, launch):
        """`launch`, except that a config already trained through `record` returns that result."""

        def run(fn, config, **kwargs):
            # a launch of several configs (training.two_tower.train_two_tower_phases) is never a search trial
            result = self.lookup(config) if dataclasses.is_dataclass(config) else None
            if result is None:
                return launch(fn, config, **kwargs)
            phase = getattr(config, "eval_phase", None) or getattr(config, "selection_set", None) or "fit"
            self.log(f"{phase} phase: the search trial with these settings is reused, not retrained")
            return result

        return run

    def lookup(self, config):
        """The result `record` kept for what `config` trains (completed by `complete`), else None."""
        result = self.results.get(self._key(config))
        if result is None or self.complete is None:
            return result
        return self.complete(result, config)

    def _key(self, config) -> str:
        ignored = (*REPORTING_FIELDS, *self.unscored)
        values = {k: v for k, v in dataclasses.asdict(config).items() if k not in ignored}
        return json.dumps(values, sort_keys=True, default=str)


def training_metadata(
    result: Any, train_seconds: float, rows: dict[str, dict[str, float]], plan_text: str | None = None
) -> dict[str, Any]:
    """What both model assets show of a training result (`rows`: the metrics table; `plan_text`: the sharding
    plan shown, default the result's)."""
    from recsys_assets.evaluation.report import metrics_markdown

    return {
        "metrics": dg.MetadataValue.md(metrics_markdown(rows)),
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "samples_per_second": float(result.samples_per_second),
        "train_seconds": float(train_seconds),
        "world_size": result.world_size,
        "sharding_plan": dg.MetadataValue.md(f"```\n{plan_text or result.plan_text}\n```"),
    }


def curves_metadata(folder: Path, curves: dict[str, Path], model_name: str) -> dict[str, Any]:
    """Training curves (name -> PNG, as written into the build `folder`) inline, and the first one's file name in
    the asset's folder (its ``path`` once published)."""
    # imported here: evaluation imports torch, which the data assets (and `make demo`'s dagster.yaml step) skip
    from recsys_assets.evaluation.plots import image_markdown

    if not curves:
        return {}
    pngs = {name: folder / png.name for name, png in curves.items()}
    md = "\n\n".join(
        f"**{name}**\n\n{image_markdown(png, f'{model_name} {name} curves')}" for name, png in pngs.items()
    )
    return {
        "training_curves": dg.MetadataValue.md(md),
        "training_curves_file": next(iter(pngs.values())).name,
    }


def record_search(run: Any, search: Any) -> dict[str, Any]:
    """A settings search (training.search.SearchResult) in the asset's MLflow run (the best score, the trial
    table) and as metadata: the trial table, the chosen settings and their score."""
    if search.best_value is not None:
        run.log_metrics({f"search_best_{search.metric}": search.best_value})
    table = search.markdown()
    run.log_text(table, "search/trials.md")
    metadata = {
        "search_trials": dg.MetadataValue.md(table),
        "chosen_settings": dg.MetadataValue.json(search.settings),  # {}: no trial succeeded, configured ones kept
        "search_seconds": float(search.seconds),
    }
    if search.best_value is not None:
        metadata[f"search_best_{search.metric}"] = float(search.best_value)
    return metadata


def table_metadata(preview: Preview) -> dict[str, Any]:
    """A written table's column schema and a markdown sample of its rows."""
    schema = dg.TableSchema(columns=[dg.TableColumn(name=n, type=t) for n, t in preview.columns])
    return {"dagster/column_schema": schema, "sample": dg.MetadataValue.md(preview.sample)}


def check_result(outcome: CheckOutcome) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=outcome.passed, description=outcome.description, metadata=outcome.metadata)
