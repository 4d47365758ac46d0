"""Retrieval half of the graph: two_tower_model (distributed TorchRec training: recsys_assets.training.runs) →
item_embeddings (recsys_assets.serving.candidates)."""

import dataclasses
import functools
from pathlib import Path

import dagster as dg

from recsys_assets.data import schema as S
from recsys_assets.defs.configs import TwoTowerConfig, search_budget, train_config
from recsys_assets.defs.constants import RETRIEVAL_GROUP, TRAINING_POOL
from recsys_assets.defs.helpers import TrainedOnce, curves_metadata, launcher, training_metadata
from recsys_assets.defs.model_registration import register_two_tower
from recsys_assets.defs.model_training import train_model_asset
from recsys_assets.defs.resources import MLflowResource, StateResource, TorchDistributorResource
from recsys_assets.defs.types import PublishedFolder, TrainedModel


def _train_config(config: TwoTowerConfig, data_root: str, **overrides):
    from recsys_assets.training.two_tower import TwoTowerTrainConfig

    # MDS uploaded to object storage by mds_splits (MdsConfig.remote_root): stream it into a local cache
    remote = S.DatasetMeta.load(S.DatasetPaths(Path(data_root)).meta).mds_remote
    return train_config(TwoTowerTrainConfig, config, data_root=data_root, mds_remote=remote, **overrides)


def _check_inputs(config: TwoTowerConfig, data_root: str) -> S.DatasetMeta:
    """Bad settings and corrupt / truncated shards fail here, before MLflow, Spark or any process starts."""
    from recsys_assets.training.two_tower import validate_fit_mds

    paths = S.DatasetPaths(Path(data_root))
    meta = S.DatasetMeta.load(paths.meta)
    _train_config(config, data_root).check_dataset(meta)
    folders = ("train", "validation", *((S.RANKER_FIT,) if meta.ranker_queries else ()))
    validate_fit_mds([paths.mds(folder) for folder in folders], meta)
    return meta


@dg.asset(
    group_name=RETRIEVAL_GROUP,
    kinds={"pytorch", "torchrec", "mlflow", "spark"},
    tags={"stage": "train", "model": "two_tower"},
    pool=TRAINING_POOL,
    description="Two Tower retrieval model (TorchRec, sharded embeddings) trained by TorchDistributor; "
    "early-stopped on validation NDCG@10, refit on train+validation; recorded in MLflow. With search_trials, "
    "an Optuna search chooses the settings on validation first (each trial a nested MLflow run).",
)
def two_tower_model(
    context: dg.AssetExecutionContext,
    config: TwoTowerConfig,
    mds_splits: PublishedFolder,
    torch_distributor: TorchDistributorResource,
    mlflow: MLflowResource,
    state: StateResource,
) -> dg.Output[TrainedModel]:
    recipe = TwoTowerRecipe(context, config, mds_splits.path, torch_distributor, TrainedOnce(context.log.info))
    return train_model_asset(context, recipe, torch_distributor, mlflow, state)


@dataclasses.dataclass(frozen=True)
class TwoTowerRecipe:
    """The Two Tower's steps of the model-asset template (defs/model_training.py). `trained`: the search's
    launches, so the fit's validation phase reuses the chosen trial instead of training it again."""

    context: dg.AssetExecutionContext
    config: TwoTowerConfig
    data_root: str
    torch_distributor: TorchDistributorResource
    trained: TrainedOnce
    model: str = "two_tower"

    @functools.cached_property
    def meta(self) -> S.DatasetMeta:
        return _check_inputs(self.config, self.data_root)

    def check_inputs(self) -> None:
        self.meta  # noqa: B018 - validates and caches

    def run_tags(self) -> dict:
        return {}

    def _train_config(self, config: TwoTowerConfig, run, **fields):
        use_gpu = self.torch_distributor.use_gpu
        return _train_config(config, self.data_root, use_gpu=use_gpu, mlflow_tracking_uri=run.tracking_uri, **fields)

    def search(self, run, build: Path):
        from recsys_assets.training.search import MlflowTrialRuns, search_two_tower

        return search_two_tower(
            self.trained.record(launcher(self.context, self.torch_distributor, "two_tower search")),
            lambda settings, **fields: self._train_config(self.config.model_copy(update=settings), run, **fields),
            search_budget(self.config),
            baseline=self.config.model_dump(),
            history_length=self.meta.history_length,
            work_dir=build / "search",
            trial_runs=MlflowTrialRuns(run.tracking_uri, run.id),
            log=self.context.log.info,
        )

    def with_settings(self, settings: dict) -> "TwoTowerRecipe":
        chosen = dataclasses.replace(self, config=self.config.model_copy(update=settings))
        chosen.__dict__["meta"] = self.meta  # the inputs are the same
        return chosen

    def data_params(self) -> dict:
        return {"data": self.data_root, **{f"data_{k}": v for k, v in self.meta.rows.items()}}

    def fit(self, run, build: Path, checkpoints: Path):
        from recsys_assets.training.runs import fit_two_tower

        return fit_two_tower(
            launcher(self.context, self.torch_distributor, "two_tower"),
            lambda **phase: self._train_config(self.config, run, mlflow_run_id=run.id, **phase),
            build,
            checkpoints,
            refit=self.config.refit_on_validation,
            ranker_phase=self.meta.ranker_queries > 0,
            trained=self.trained.lookup,
            log=self.context.log.info,
        )

    def final_model(self, fit):
        return fit.final.load_model()

    def log_results(self, run, fit) -> None:
        for png in fit.curves.values():
            run.log_artifact(png, "plots")
        run.log_metrics({f"final_{phase}/{k}": v for phase, m in fit.phase_metrics().items() for k, v in m.items()})

    def register(self, run, model_info, build: Path, fit) -> tuple[str, dict]:
        return register_two_tower(self.context, run, model_info, build, self.data_root, self.meta)

    def metadata(self, fit, folder: Path, checkpoints: Path) -> dict:
        return {**_fit_metadata(fit, folder), "checkpoint_dir": dg.MetadataValue.path(str(checkpoints))}


def _fit_metadata(fit, folder: Path) -> dict:
    """Metrics of both phases, the training figures and curves of a Two Tower fit."""
    selection, final = fit.selection, fit.final
    return {
        **training_metadata(selection, fit.train_seconds, fit.summary(), plan_text=final.plan_text),
        "resumed_from_step": dg.MetadataValue.json(
            {"validation": selection.resumed_from_step, "test": final.resumed_from_step if fit.refit else None}
        ),
        **curves_metadata(folder, fit.curves, "two_tower"),
        **{f"{phase}_{k}": float(v) for phase, m in fit.phase_metrics().items() for k, v in m.items()},
    }


@dg.asset(
    group_name=RETRIEVAL_GROUP,
    kinds={"pytorch", "numpy"},
    tags={"stage": "index", "model": "two_tower"},
    description="Every item through the candidate tower: item_vectors.npy (row i = item id i) + item_ids.npy + "
    "items.parquet (row i: the source's item_id, title, categories).",
)
def item_embeddings(
    context: dg.AssetExecutionContext,
    two_tower_model: TrainedModel,
    mds_splits: PublishedFolder,
    state: StateResource,
) -> dg.Output[PublishedFolder]:
    from recsys_assets.serving.candidates import ITEMS_FILE, write_item_embeddings

    with state.build_folder(context) as build:
        stats = write_item_embeddings(two_tower_model, mds_splits.path, build, two_tower_model.mlflow_run_id)
    return dg.Output(
        PublishedFolder(str(build), table=ITEMS_FILE),
        metadata={**stats, "mlflow_run_id": two_tower_model.mlflow_run_id},
    )


two_tower_assets = [two_tower_model, item_embeddings]
