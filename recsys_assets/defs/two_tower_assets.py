"""Retrieval half of the graph: two_tower_model (distributed TorchRec training: recsys_assets.training.runs) →
item_embeddings (recsys_assets.serving.candidates)."""

from pathlib import Path

import dagster as dg

from recsys_assets.data import schema as S
from recsys_assets.defs.configs import TwoTowerConfig, search_budget, train_config
from recsys_assets.defs.constants import RETRIEVAL_GROUP, TRAINING_POOL
from recsys_assets.defs.helpers import TrainedOnce, curves_metadata, launcher, record_search, training_metadata
from recsys_assets.defs.model_registration import register_two_tower
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
    from recsys_assets.training.runs import fit_two_tower

    torch_distributor.validate()
    mlflow.check_reachable()
    meta = _check_inputs(config, mds_splits.path)
    with (
        state.checkpoints(context) as checkpoints,
        mlflow.asset_run(context, model="two_tower", checkpoint_dir=checkpoints) as run,
        state.output_folder(context) as out,
    ):
        trained = TrainedOnce(context.log.info)  # the fit's validation phase reuses the chosen trial's run
        search = None
        if config.search_trials:
            search = _search(context, config, mds_splits.path, meta, torch_distributor, run, out.staging, trained)
            config = config.model_copy(update=search.settings)  # the fit below trains the chosen settings
        run.log_params(
            {
                **config.model_dump(),
                "num_processes": torch_distributor.num_processes,
                "use_gpu": torch_distributor.use_gpu,
                "data": mds_splits.path,
                **{f"data_{k}": v for k, v in meta.rows.items()},
            }
        )
        fit = fit_two_tower(
            trained.reuse(launcher(context, torch_distributor, "two_tower")),
            lambda **phase: _train_config(
                config,
                mds_splits.path,
                use_gpu=torch_distributor.use_gpu,
                mlflow_tracking_uri=run.tracking_uri,
                mlflow_run_id=run.id,
                **phase,
            ),
            out.staging,
            checkpoints,
            refit=config.refit_on_validation,
            ranker_phase=meta.ranker_queries > 0,
            log=context.log.info,
        )
        for png in fit.curves.values():
            run.log_artifact(png, "plots")
        model_info = run.log_model(fit.final.load_model())
        version, registry = register_two_tower(context, run, model_info, out, mds_splits.path, meta)
        run.log_metrics({f"final_{phase}/{k}": v for phase, m in fit.phase_metrics().items() for k, v in m.items()})
        searched = record_search(run, search) if search is not None else {}
    metadata = {
        **run.metadata(),
        **_fit_metadata(fit, out.path),
        "checkpoint_dir": dg.MetadataValue.path(str(checkpoints)),
        **searched,
        **registry,
    }
    return out.output(metadata, TrainedModel(str(out.path), run.id, model_version=version))


def _search(context, config, data_root: str, meta, torch_distributor, run, folder: Path, trained: TrainedOnce):
    """The settings search on the validation phase (training.search); trials' progress in `folder`/search; their
    results kept in `trained`."""
    from recsys_assets.training.search import MlflowTrialRuns, search_two_tower

    return search_two_tower(
        trained.record(launcher(context, torch_distributor, "two_tower search")),
        lambda settings, **fields: _train_config(
            config.model_copy(update=settings),
            data_root,
            use_gpu=torch_distributor.use_gpu,
            mlflow_tracking_uri=run.tracking_uri,
            **fields,
        ),
        search_budget(config),
        baseline=config.model_dump(),
        history_length=meta.history_length,
        work_dir=folder / "search",
        trial_runs=MlflowTrialRuns(run.tracking_uri, run.id),
        log=context.log.info,
    )


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
    from recsys_assets.serving.candidates import write_item_embeddings

    with state.output_folder(context) as out:
        stats = write_item_embeddings(two_tower_model, mds_splits.path, out.staging, two_tower_model.mlflow_run_id)
    return out.output({**stats, "mlflow_run_id": two_tower_model.mlflow_run_id})


two_tower_assets = [two_tower_model, item_embeddings]
