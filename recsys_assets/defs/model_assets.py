"""Retrieval half of the graph: two_tower_model (distributed TorchRec training) → item_embeddings.

The asset bodies only wire things: the training loop lives in recsys_assets.training, the model in
recsys_assets.models; TorchDistributor launches it, MLflow records it."""
import dataclasses
import json
import time
from pathlib import Path
from typing import Optional

import dagster as dg
from pydantic import Field

from recsys_assets.data import schema as S
from recsys_assets.data.publish import publish_folder
from recsys_assets.defs.plots import image_markdown, log_png_to_mlflow, training_curves_png
from recsys_assets.defs.configs import TwoTowerConfig, train_config
from recsys_assets.defs.constants import RETRIEVAL_GROUP, TRAINING_POOL
from recsys_assets.defs.resources import MLflowResource, SparkResource, StateResource, TorchDistributorResource
from recsys_assets.defs.types import PublishedFolder, TrainedModel

def metrics_markdown(rows: dict[str, dict[str, float]]) -> str:
    keys = sorted({k for m in rows.values() for k in m})
    lines = ["| | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.4f}" if k in m else "" for k in keys) + " |")
    return "\n".join(lines)


def progress_logger(context: dg.AssetExecutionContext, model_name: str):
    """Turns the JSON lines rank 0 writes per epoch into one readable line in the Dagster log."""

    def log(record: dict) -> None:
        if record.get("event") == "epoch":
            shown = {k: v for k, v in record.get("metrics", {}).items() if "@" in k and "100" not in k}
            metrics = " ".join(f"{k}={v:.4f}" for k, v in shown.items())
            context.log.info(
                f"{model_name} [{record.get('phase')}] epoch {record.get('epoch')}: loss {record.get('loss', float('nan')):.4f} {metrics}"
            )
        elif record.get("event") == "end":
            context.log.info(f"{model_name} [{record.get('phase', '')}] finished: best epoch {record.get('best_epoch')}, "
                             f"{record.get('final_metrics')}")

    return log


def _train_config(config: TwoTowerConfig, data_root: str, **overrides):
    from recsys_assets.training.two_tower import TwoTowerTrainConfig

    # MDS uploaded to object storage by mds_splits (MdsConfig.remote_root): stream it into a local cache
    remote = S.DatasetMeta.load(S.DatasetPaths(Path(data_root)).meta).mds_remote
    return train_config(TwoTowerTrainConfig, config, data_root=data_root, mds_remote=remote, **overrides)


@dg.asset(
    group_name=RETRIEVAL_GROUP,
    kinds={"pytorch", "torchrec", "mlflow", "spark"},
    tags={"stage": "train", "model": "two_tower"},
    pool=TRAINING_POOL,
    description="Two Tower retrieval model (TorchRec, sharded embeddings) trained by TorchDistributor; "
    "early-stopped on validation NDCG@10, refit on train+validation; recorded in MLflow.",
)
def two_tower_model(
    context: dg.AssetExecutionContext,
    config: TwoTowerConfig,
    mds_splits: PublishedFolder,
    torch_distributor: TorchDistributorResource,
    mlflow: MLflowResource,
    spark: SparkResource,
    state: StateResource,
) -> dg.Output[TrainedModel]:
    import torch

    from recsys_assets.training.two_tower import train_two_tower

    torch_distributor.validate()
    mlflow.check_reachable()
    meta = S.DatasetMeta.load(S.DatasetPaths(Path(mds_splits.path)).meta)
    # bad settings fail here, before MLflow, Spark or any process starts
    _train_config(config, mds_splits.path).check_dataset(meta)
    from recsys_assets.data.mds import validate_mds
    from recsys_assets.training.two_tower import TRAIN_MDS_COLUMNS

    for split in ("train", "validation"):  # corrupt / truncated shards fail here, before MLflow and Spark
        validate_mds(S.DatasetPaths(Path(mds_splits.path)).mds(split), columns=TRAIN_MDS_COLUMNS)
    checkpoints = state.checkpoint_dir(context)
    run_id = mlflow.start_asset_run(context, model="two_tower", checkpoint_dir=checkpoints)
    client = mlflow.client()
    dest = state.asset_dir("two_tower_model", context.run_id)
    try:
        mlflow.log_params(run_id, {**config.model_dump(), "num_processes": torch_distributor.num_processes,
                                   "use_gpu": torch_distributor.use_gpu, "data": mds_splits.path,
                                   **{f"data_{k}": v for k, v in meta.rows.items()}})
        with publish_folder(dest) as tmp:
            common = dict(
                use_gpu=torch_distributor.use_gpu,
                mlflow_tracking_uri=mlflow.resolved_tracking_uri(),
                mlflow_run_id=run_id,
                progress_file=str(tmp / "progress.jsonl"),
            )
            t0 = time.time()
            common.update(resume="auto", checkpoint_every_n_steps=config.checkpoint_every_n_steps)
            selection = torch_distributor.run(
                context, spark, train_two_tower,
                _train_config(config, mds_splits.path, eval_phase="validation",
                              checkpoint_dir=str(checkpoints / "validation"), **common),
                progress_file=tmp / "progress.jsonl", on_progress=progress_logger(context, "two_tower"),
            )
            if selection.resumed_from_step is not None:
                context.log.info(f"validation phase resumed from step {selection.resumed_from_step} ({selection.resumed_from})")
            context.log.info(f"validation phase: best epoch {selection.best_epoch}, {selection.final_metrics}")
            final = selection
            if config.refit_on_validation:
                # Same settings, the epoch count chosen on validation; no selection on test (restore_best off).
                final = torch_distributor.run(
                    context, spark, train_two_tower,
                    _train_config(config, mds_splits.path, eval_phase="test", mlflow_prefix="refit_",
                                  epochs=selection.best_epoch + 1, checkpoint_dir=str(checkpoints / "test"), **common),
                    progress_file=tmp / "progress.jsonl", on_progress=progress_logger(context, "two_tower"),
                )
            train_seconds = time.time() - t0
            torch.save(
                {"state_dict": final.state_dict, "model_config": final.model_config, "feature_spec": final.feature_spec},
                tmp / "model.pt",
            )
            # The train-only fit (the validation phase's best epoch): the ranker's training candidates come from
            # it, so no model that saw validation rows proposes them.
            torch.save(
                {"state_dict": selection.state_dict, "model_config": selection.model_config,
                 "feature_spec": selection.feature_spec},
                tmp / "model_validation.pt",
            )
            (tmp / "plan.txt").write_text(final.plan_text)
            (tmp / "result.json").write_text(json.dumps({
                "validation": selection.final_metrics, "test": final.final_metrics if final is not selection else None,
                "best_epoch": selection.best_epoch, "history_validation": selection.history,
                "history_refit": final.history if final is not selection else None,
            }, indent=2, default=float))
            curves = {"validation": training_curves_png(selection.history, tmp / "training_curves.png",
                                                        "two_tower: train loss, validation metrics")}
            if final is not selection:
                curves["refit"] = training_curves_png(final.history, tmp / "training_curves_refit.png",
                                                      "two_tower refit (train+validation): test metrics")
            for png in curves.values():
                log_png_to_mlflow(mlflow.resolved_tracking_uri(), run_id, png)
            curves_md = "\n\n".join(f"**{k}**\n\n{image_markdown(png, f'two_tower {k} curves')}" for k, png in curves.items())
            model = final.load_model()
            _log_model(mlflow, run_id, model)
            summary = {"validation (fit train)": selection.final_metrics}
            if final is not selection:
                summary["test (refit train+validation)"] = final.final_metrics
            for phase, metrics in summary.items():
                prefix = "final_validation/" if phase.startswith("validation") else "final_test/"
                for k, v in metrics.items():
                    client.log_metric(run_id, (prefix + k).replace("@", "_at_"), float(v))
    except BaseException as exc:
        mlflow.end_run(run_id, failed=exc)
        raise
    mlflow.end_run(run_id)
    import shutil

    shutil.rmtree(checkpoints, ignore_errors=True)  # published: nothing left to resume
    metadata = {
        "mlflow_run": dg.MetadataValue.url(mlflow.run_url(run_id)),
        "mlflow_run_id": run_id,
        "metrics": dg.MetadataValue.md(metrics_markdown(summary)),
        "published_path": dg.MetadataValue.path(str(dest)),
        "best_epoch": selection.best_epoch,
        "stopped_early": selection.stopped_early,
        "samples_per_second": float(selection.samples_per_second),
        "train_seconds": float(train_seconds),
        "world_size": selection.world_size,
        "checkpoint_dir": dg.MetadataValue.path(str(checkpoints)),
        "resumed_from_step": dg.MetadataValue.json({"validation": selection.resumed_from_step,
                                                    "test": final.resumed_from_step if final is not selection else None}),
        "sharding_plan": dg.MetadataValue.md(f"```\n{final.plan_text}\n```"),
        "training_curves": dg.MetadataValue.md(curves_md),
        "training_curves_path": dg.MetadataValue.path(str(dest / "training_curves.png")),
    }
    for phase, metrics in summary.items():
        tag = "validation" if phase.startswith("validation") else "test"
        for k, v in metrics.items():
            metadata[f"{tag}_{k}"] = float(v)
    return dg.Output(TrainedModel(path=str(dest), mlflow_run_id=run_id), metadata=metadata)


def _log_model(tracking: MLflowResource, run_id: str, model) -> None:
    import mlflow
    import mlflow.pytorch
    import torch

    mlflow.set_tracking_uri(tracking.resolved_tracking_uri())
    with mlflow.start_run(run_id=run_id):
        # pickle format: the default pt2 export needs an input example this KJT-based signature cannot give;
        # explicit pip requirements skip a slow environment inference.
        mlflow.pytorch.log_model(
            model, name="model", serialization_format="pickle",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "torchrec==1.9.2"],
        )


def load_trained_two_tower(model: TrainedModel, phase: str = "test"):
    """The unsharded TwoTower from a published model folder (weights_only: no arbitrary unpickling).

    phase "test": the served model (refit on train + validation); "validation": the train-only fit."""
    import torch

    from recsys_assets.models.features import FeatureSpec
    from recsys_assets.models.two_tower import TwoTowerModelConfig, load_two_tower

    files = {"test": "model.pt", "validation": "model_validation.pt"}
    if phase not in files:
        raise ValueError(f"phase must be one of {sorted(files)}, got {phase!r}")
    blob = torch.load(Path(model.path) / files[phase], weights_only=True)
    spec_dict = dict(blob["feature_spec"])
    spec_dict["user_attributes"] = tuple(tuple(x) for x in spec_dict["user_attributes"])
    spec = FeatureSpec(**spec_dict)
    return load_two_tower(blob["state_dict"], spec, TwoTowerModelConfig.from_dict(blob["model_config"])), spec


@dg.asset(
    group_name=RETRIEVAL_GROUP,
    kinds={"pytorch", "numpy"},
    tags={"stage": "index", "model": "two_tower"},
    description="Every item through the candidate tower: item_vectors.npy (row i = item id i) + item_ids.npy.",
)
def item_embeddings(
    context: dg.AssetExecutionContext,
    two_tower_model: TrainedModel,
    mds_splits: PublishedFolder,
    state: StateResource,
) -> dg.Output[PublishedFolder]:
    import numpy as np
    import torch

    from recsys_assets.models.features import FeatureStore
    from recsys_assets.models.two_tower import ItemEncoder

    model, spec = load_trained_two_tower(two_tower_model)
    store = FeatureStore.load(mds_splits.path, spec)
    with torch.no_grad():
        vectors = ItemEncoder(model, store).encode_all().numpy().astype(np.float32)
    dest = state.asset_dir("item_embeddings", context.run_id)
    with publish_folder(dest) as tmp:
        np.save(tmp / "item_vectors.npy", vectors)
        np.save(tmp / "item_ids.npy", np.arange(len(vectors), dtype=np.int64))
        (tmp / "model.json").write_text(json.dumps({"mlflow_run_id": two_tower_model.mlflow_run_id,
                                                    "model_path": two_tower_model.path}))
    norms = np.linalg.norm(vectors, axis=1)
    return dg.Output(
        PublishedFolder(str(dest)),
        metadata={
            "published_path": dg.MetadataValue.path(str(dest)),
            "num_items": int(vectors.shape[0]),
            "dim": int(vectors.shape[1]),
            "mean_norm": float(norms.mean()) if len(norms) else 0.0,
            "mlflow_run_id": two_tower_model.mlflow_run_id,
        },
    )


model_assets = [two_tower_model, item_embeddings]
