"""One template for the model assets (Two Tower, DLRM): validate the inputs, open the MLflow run, search, fit,
register, metadata. What differs between the models is a `ModelRecipe`; `train_model_asset` runs the sequence."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import dagster as dg

from recsys_assets.defs.helpers import record_search
from recsys_assets.defs.resources import MLflowResource, MLflowRun, StateResource, TorchDistributorResource
from recsys_assets.defs.types import TrainedModel


class ModelRecipe(Protocol):
    """A model asset's own steps. Every method runs inside the asset's MLflow run, except `check_inputs`, which
    runs before it (bad input fails before a run or a process starts)."""

    model: str  # the MLflow run's model tag and the registered model's key
    config: Any  # the asset's dg.Config (search_trials, the settings)

    def check_inputs(self) -> None: ...

    def run_tags(self) -> dict[str, Any]: ...

    def search(self, run: MLflowRun, build: Path) -> Any:
        """The settings search (training.search.SearchResult); only called when config.search_trials > 0."""

    def with_settings(self, settings: dict[str, Any]) -> ModelRecipe:
        """This recipe for the chosen settings (the fit trains them)."""

    def data_params(self) -> dict[str, Any]: ...

    def fit(self, run: MLflowRun, build: Path, checkpoints: Path) -> Any: ...

    def final_model(self, fit: Any) -> Any:
        """The module logged to MLflow (the served weights)."""

    def log_results(self, run: MLflowRun, fit: Any) -> None:
        """Final metrics and curves into the run."""

    def register(self, run: MLflowRun, model_info: Any, build: Path, fit: Any) -> tuple[str, dict]: ...

    def metadata(self, fit: Any, folder: Path, checkpoints: Path) -> dict[str, Any]: ...


def train_model_asset(
    context: dg.AssetExecutionContext,
    recipe: ModelRecipe,
    torch_distributor: TorchDistributorResource,
    mlflow: MLflowResource,
    state: StateResource,
) -> dg.Output[TrainedModel]:
    """The shared sequence of a model asset; a retry of a failed run resumes from its checkpoints."""
    torch_distributor.validate()
    mlflow.check_reachable()
    recipe.check_inputs()
    with (
        state.checkpoints(context) as checkpoints,
        mlflow.asset_run(context, model=recipe.model, checkpoint_dir=checkpoints, **recipe.run_tags()) as run,
        state.build_folder(context) as build,
    ):
        search = None
        if recipe.config.search_trials:
            search = recipe.search(run, build)
            recipe = recipe.with_settings(search.settings)  # the fit below trains the chosen settings
        run.log_params(
            {
                **recipe.config.model_dump(),
                "num_processes": torch_distributor.process_count(),
                "use_gpu": torch_distributor.use_gpu,
                **recipe.data_params(),
            }
        )
        fit = recipe.fit(run, build, checkpoints)
        recipe.log_results(run, fit)
        model_info = run.log_model(recipe.final_model(fit))
        version, registry = recipe.register(run, model_info, build, fit)
        searched = record_search(run, search) if search is not None else {}
        metadata = {**run.metadata(), **recipe.metadata(fit, build, checkpoints), **searched, **registry}
    return dg.Output(TrainedModel(str(build), run.id, model_version=version), metadata=metadata)
