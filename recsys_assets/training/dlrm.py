"""Distributed training of the DLRM ranker (TorchRec model parallel; CPU/gloo or GPU/nccl).

Same shape as the Two Tower trainer and the same helpers (`training.common`): meta-device tables, a sharding
plan computed collectively and passed to DistributedModelParallel, fused RowWiseAdagrad on the tables + Adam on
the MLPs, StreamingDataset per rank for the training pairs.

Data (feature-layout driven, see `recsys_assets.models.dlrm`):
- training pairs: MDS folder(s) with ``label`` (float32), ``dense`` (ndarray:float32 [D]) and one column per
  sparse feature (int32 scalar, or ndarray:int32 padded with -1 for bags);
- evaluation sets: Parquet files/folders with the same columns (``dense`` and bags as lists), plus an optional
  ``query_id`` (int64): pairs with the same query_id are one candidate list, for list metrics
  (HR@K / NDCG@K of the list's positive; a list without a positive counts as a miss).

Per epoch: one pass over the training pairs, then every evaluation set is scored on the sharded model in
lockstep (each rank a contiguous part, equal call counts) and gathered. Early stopping on
`early_stopping_metric` of `selection_set` (never on a set named "test"); the best epoch's weights are restored
and returned unsharded, with the final scores of every evaluation set.

Two ways in: ``train_dlrm(config)`` in every process of a launcher (TorchDistributor, elastic_launch), or
``torchrun --nproc_per_node 2 -m recsys_assets.training.dlrm --config cfg.json [--result out.pt]``.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recsys_assets.data.pairs import PairSet, load_pair_set
from recsys_assets.data.schema import LABEL
from recsys_assets.evaluation.lists import pair_metrics
from recsys_assets.training import checkpoint, common
from recsys_assets.training.common import DistEnv, setting




@dataclasses.dataclass
class DLRMTrainConfig(common.JsonConfig):
    train_mds: tuple[str, ...]  # MDS folders of training pairs
    layout: tuple[dict, ...]  # SparseFeature dicts (models.dlrm.SparseFeature)
    dense_in_features: int
    eval_sets: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> Parquet path
    selection_set: str | None = None  # eval set for early stopping / best epoch (None: the last epoch)

    # model. Defaults chosen on the holdout users' validation lists (ml-latest-small and synthetic data).
    embedding_dim: int = setting(16, "Embedding width of every table; the bottom MLP's last size must equal it.")
    bottom_layer_sizes: tuple[int, ...] = setting((64, 16), "Dense MLP; the last size must equal embedding_dim.")
    top_layer_sizes: tuple[int, ...] = setting((64, 32, 1), "Over MLP; the last size must be 1.")

    # optimization
    epochs: int = setting(15, "Most epochs; the best one on the selection set is returned.")
    batch_size: int = setting(
        128, "Per process (global batch = this x processes; 2 x 128 chosen on the holdout lists: 2 x 256 halves the "
        "updates and stalled there).")
    patience: int = setting(4, "Epochs without a gain on the early-stopping metric before stopping.")
    min_delta: float = 0.0
    early_stopping_metric: str = setting(
        "ndcg@10", "On the selection set: ndcg@10 | hr@10 (need query ids) | auroc | logloss.")
    sparse_optimizer: str = "row_wise_adagrad"
    sparse_lr: float = setting(0.002, "RowWiseAdagrad on the tables, fused into backward.")
    dense_lr: float = setting(3e-3, "Adam on the MLPs.")
    weight_decay: float = setting(0.0, "Adam weight decay on the MLPs.")
    epoch_size: int | None = None
    seed: int = setting(0, "Seeds the model and the data order.")

    # distributed / runtime
    use_gpu: bool = False
    sharding_types: tuple[str, ...] | None = None
    single_node: bool = False
    num_workers: int = 0
    num_threads: int | None = None
    eval_batch_size: int = 2048
    ks: tuple[int, ...] = (10,)

    # checkpoints (recsys_assets.training.checkpoint): sharded DCP state + loader/RNG + trainer state at every
    # epoch end; resume "auto" continues a relaunch with the same folder after its last finished epoch
    checkpoint_dir: str | None = None
    checkpoint_keep: int = 2
    resume: bool | str = "auto"

    # reporting (rank 0)
    mlflow_tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    mlflow_prefix: str = ""
    progress_file: str | None = None

    def __post_init__(self) -> None:
        from recsys_assets.models.dlrm import layout_from_dicts, validate_layout

        self.train_mds = tuple(str(p) for p in ([self.train_mds] if isinstance(self.train_mds, (str, Path)) else self.train_mds))
        self.layout = tuple(dict(x) for x in self.layout)
        validate_layout(layout_from_dicts(self.layout))
        self.eval_sets = {str(k): str(v) for k, v in dict(self.eval_sets).items()}
        self.bottom_layer_sizes = tuple(int(x) for x in self.bottom_layer_sizes)
        self.top_layer_sizes = tuple(int(x) for x in self.top_layer_sizes)
        self.ks = tuple(int(k) for k in self.ks)
        if self.sharding_types is not None:
            self.sharding_types = tuple(self.sharding_types)
        if self.selection_set is not None:
            if self.selection_set not in self.eval_sets:
                raise ValueError(f"selection_set {self.selection_set!r} is not one of the eval sets {sorted(self.eval_sets)}")
            if self.selection_set == "test":
                raise ValueError("selecting epochs on the test set would leak it: use a validation set")
        if self.batch_size <= 0 or self.epochs <= 0 or self.patience <= 0:
            raise ValueError("batch_size, epochs and patience must be positive")
        if self.sparse_lr <= 0 or self.dense_lr <= 0 or self.weight_decay < 0:
            raise ValueError("sparse_lr and dense_lr must be > 0 and weight_decay >= 0")
        list_metrics = {f"{m}@{k}" for k in self.ks for m in ("hr", "ndcg")}
        if self.early_stopping_metric not in {"auroc", "logloss", *list_metrics}:
            raise ValueError(f"early_stopping_metric {self.early_stopping_metric!r} is not auroc, logloss or one of "
                             f"{sorted(list_metrics)}")
        if self.resume not in (True, False, "auto"):
            raise ValueError(f"resume must be true, false or 'auto', got {self.resume!r}")
        self.model_config()  # validates the MLP sizes

    def model_config(self):
        from recsys_assets.models.dlrm import DLRMModelConfig

        return DLRMModelConfig(
            dense_in_features=self.dense_in_features,
            embedding_dim=self.embedding_dim,
            bottom_layer_sizes=self.bottom_layer_sizes,
            top_layer_sizes=self.top_layer_sizes,
        )

    def sparse_layout(self):
        from recsys_assets.models.dlrm import layout_from_dicts

        return layout_from_dicts(self.layout)


@dataclasses.dataclass
class DLRMTrainResult:
    state_dict: dict[str, torch.Tensor]  # unsharded DLRM weights (train-task prefix stripped)
    model_config: dict
    layout: list[dict]
    config: dict
    history: list[dict]
    best_epoch: int
    final_metrics: dict[str, dict[str, float]]  # eval set -> metrics of the returned weights
    eval_scores: dict[str, np.ndarray]  # eval set -> logits of the returned weights, in the set's row order
    stopped_early: bool
    plan_text: str
    samples_per_second: float
    world_size: int
    peak_rss_mb: list[float]
    total_seconds: float
    resumed_from_step: int | None = None  # the checkpoint step this launch continued from (None: fresh)

    def load_model(self, device: str | torch.device = "cpu"):
        from recsys_assets.models.dlrm import DLRMModelConfig, layout_from_dicts, load_dlrm

        return load_dlrm(self.state_dict, layout_from_dicts(self.layout), DLRMModelConfig.from_dict(self.model_config), device)


@torch.no_grad()
def sharded_logits(dlrm, layout, config, data: PairSet, env: DistEnv, batch_size: int) -> np.ndarray:
    """Collective. Logits [n] of every pair, on every rank: each rank scores a contiguous part in the same
    number of equally sized calls (short calls padded with row 0), then the parts are gathered in rank order."""
    from recsys_assets.models.dlrm import batch_to_kjt, dense_tensor

    n = data.n
    start, end = common.shard_bounds(n, env.rank, env.world_size)
    n_calls = max(1, math.ceil(math.ceil(n / env.world_size) / batch_size))
    out = []
    was_training = dlrm.training
    dlrm.eval()
    for i in range(n_calls):
        lo, hi = min(start + i * batch_size, end), min(start + (i + 1) * batch_size, end)
        # pad with row 0 so every rank sends equally sized batches through the all-to-all (sets are never empty)
        idx = torch.cat([torch.arange(lo, hi), torch.zeros(batch_size - (hi - lo), dtype=torch.long)])
        batch = {k: v[idx] for k, v in data.columns.items()}
        kjt = batch_to_kjt(batch, layout).to(env.device)
        logits = dlrm(dense_tensor(batch, config.dense_in_features).to(env.device), kjt).squeeze(-1)
        out.append(logits[: hi - lo].float())
    dlrm.train(was_training)
    local = torch.cat(out) if out else torch.zeros(0)
    return common.all_gather_variable(local.to(env.device), env).cpu().numpy()


# --------------------------------------------------------------------------------------------------- train
def train_dlrm(config: DLRMTrainConfig | Mapping[str, Any]) -> DLRMTrainResult:
    """Train on the MDS pairs; evaluate every eval set each epoch. Every rank returns the same result."""
    return common.run_trainer(config, DLRMTrainConfig, _train)


def _train(config: DLRMTrainConfig, env: DistEnv, t_start: float) -> DLRMTrainResult:
    from recsys_assets.models.dlrm import (
        DLRMTrainTask,
        batch_to_kjt,
        build_dlrm,
        dense_tensor,
        embedding_bag_configs,
        strip_prefix,
    )

    common.seed_everything(config.seed)
    # an explicit resume without a checkpoint fails here, before any expensive work
    resume_path = checkpoint.resolve_resume(config.checkpoint_dir, config.resume)
    layout = config.sparse_layout()
    model_config = config.model_config()
    eval_sets = {name: load_pair_set(p, layout, config.dense_in_features) for name, p in config.eval_sets.items()}
    for name, s in eval_sets.items():
        if s.n == 0:
            raise ValueError(f"evaluation set {name!r} ({config.eval_sets[name]}) is empty")

    reporter = common.ProgressReporter(
        env,
        mlflow_tracking_uri=config.mlflow_tracking_uri,
        mlflow_run_id=config.mlflow_run_id,
        progress_file=config.progress_file,
        mlflow_prefix=config.mlflow_prefix,
    )
    dlrm = build_dlrm(layout, model_config, device=env.device, table_device="meta")
    task = DLRMTrainTask(dlrm)
    tables = embedding_bag_configs(layout, model_config.embedding_dim)
    sharded = common.shard_model(
        task,
        [dlrm.sparse_arch.embedding_bag_collection],
        tables,
        env,
        sparse_optimizer=config.sparse_optimizer,
        sparse_lr=config.sparse_lr,
        sharding_types=config.sharding_types,
    )
    dmp = sharded.dmp
    optimizer = common.make_optimizer(dmp, config.dense_lr, config.weight_decay)
    sharded_dlrm = dmp.module.dlrm
    reporter.event({"event": "start", "world_size": env.world_size, "plan": sharded.plan_text, "config": config.to_dict()})

    common.prepare_streaming()
    dataset, loader = common.streaming_loader(
        config.train_mds, config.batch_size, seed=config.seed, num_workers=config.num_workers, epoch_size=config.epoch_size
    )

    def evaluate_all() -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
        metrics, scores = {}, {}
        for name, s in eval_sets.items():
            logits = sharded_logits(sharded_dlrm, layout, model_config, s, env, config.eval_batch_size)
            scores[name] = logits
            metrics[name] = pair_metrics(s.labels, logits, s.query_ids, config.ks)
        return metrics, scores

    history: list[dict[str, Any]] = []
    best_value, best_epoch, best_snapshot, bad_epochs = -math.inf, -1, None, 0
    stopped_early = False
    train_seconds_total, samples_total = 0.0, 0
    lower_is_better = config.early_stopping_metric == "logloss"
    manager = checkpoint.CheckpointManager(config.checkpoint_dir, env, keep=config.checkpoint_keep) if config.checkpoint_dir else None
    best_checkpoint: str | None = None  # the checkpoint holding the best epoch's weights (pinned)
    start_epoch, global_step, resumed_from_step = 0, 0, None
    if resume_path is not None:
        loaded = manager.load(resume_path, model=dmp, optimizer=optimizer, loader=loader)
        st = loaded.trainer_state
        history, best_epoch, bad_epochs = list(st["history"]), int(st["best_epoch"]), int(st["bad_epochs"])
        best_value = float(st["best_value"]) if st["best_value"] is not None else -math.inf
        best_checkpoint, stopped_early = st["best_checkpoint"], bool(st["stopped_early"])
        train_seconds_total, samples_total = float(st["train_seconds"]), int(st["samples"])
        start_epoch, global_step = int(st["epoch"]) + 1, loaded.step
        resumed_from_step = global_step
        reporter.event({"event": "resume", "step": global_step, "epoch": start_epoch, "path": str(resume_path)})
        if env.is_main:
            print(f"[dlrm] resumed from {resume_path} (step {global_step}, next epoch {start_epoch})", flush=True)
    try:
        for epoch in range(start_epoch, config.epochs):
            if stopped_early:
                break
            dmp.train()
            t0 = time.time()
            loss_sum, steps, samples = 0.0, 0, 0
            lstate = None
            for batch in loader:
                b = int(batch[LABEL].shape[0])
                kjt = batch_to_kjt(batch, layout).to(env.device)
                dense = dense_tensor(batch, config.dense_in_features).to(env.device)
                labels = torch.as_tensor(batch[LABEL]).float().reshape(-1).to(env.device)
                optimizer.zero_grad()
                loss, _ = dmp(dense, kjt, labels)
                loss.backward()
                optimizer.step()
                loss_sum += float(loss.detach()) * b
                steps += 1
                samples += b
                global_step += 1
                if manager is not None:
                    lstate = loader.state_dict()  # local and cheap; an exhausted loop's state is not resumable
            train_s = time.time() - t0
            loss_sum_g, samples_g, steps_g = common.all_reduce_sum([loss_sum, samples, steps], env)
            train_seconds_total += train_s
            samples_total += int(samples_g)
            t1 = time.time()
            metrics, scores = evaluate_all()
            eval_s = time.time() - t1
            record = {
                "epoch": epoch,
                "loss": loss_sum_g / max(1.0, samples_g),
                "metrics": metrics,
                "samples": int(samples_g),
                "steps": int(steps_g),
                "train_seconds": train_s,
                "eval_seconds": eval_s,
            }
            history.append(record)
            improved = True
            if config.selection_set is not None:
                value = metrics[config.selection_set][config.early_stopping_metric]
                value = -value if lower_is_better else value
                improved = best_epoch < 0 or value > best_value + config.min_delta
                if improved:
                    best_value, best_epoch, bad_epochs = value, epoch, 0
                    best_snapshot = common.snapshot_local_state(dmp)
                    best_checkpoint = checkpoint.checkpoint_name(global_step) if manager is not None else None
                else:
                    bad_epochs += 1
            flat = {f"{name}_{k}": v for name, m in metrics.items() for k, v in m.items()}
            reporter.log_epoch(epoch, {"train_loss": record["loss"], **flat, "epoch_seconds": train_s + eval_s},
                               loss=record["loss"], best_epoch=best_epoch, phase=config.selection_set or "train")
            if env.is_main:
                shown = " ".join(f"{k}={v:.4f}" for k, v in flat.items())
                print(f"[dlrm] epoch {epoch} loss {record['loss']:.4f} {shown} ({train_s:.1f}s train, {eval_s:.1f}s eval)"
                      f"{' *' if improved and config.selection_set else ''}", flush=True)
            if config.selection_set is not None and bad_epochs >= config.patience:
                stopped_early = epoch < config.epochs - 1
            if manager is not None:
                manager.save(
                    global_step, model=dmp, optimizer=optimizer,
                    loader_state=checkpoint.next_epoch_loader_state(lstate) if lstate is not None else None,
                    trainer_state={"epoch": epoch, "history": history, "best_epoch": best_epoch,
                                   "best_value": best_value if math.isfinite(best_value) else None,
                                   "bad_epochs": bad_epochs, "best_checkpoint": best_checkpoint,
                                   "stopped_early": stopped_early, "train_seconds": train_seconds_total,
                                   "samples": samples_total},
                    pinned=[best_checkpoint] if best_checkpoint else [],
                )
            if stopped_early:
                break
    finally:
        del loader, dataset
    if not history:
        raise RuntimeError("no epoch was trained (epochs <= the resumed checkpoint's epoch)")

    if config.selection_set is None:
        best_epoch = history[-1]["epoch"]
    if best_epoch != history[-1]["epoch"]:
        if best_snapshot is not None:
            common.restore_local_state(dmp, best_snapshot)
        else:  # the best epoch was before this launch resumed: its weights are in the pinned checkpoint
            manager.load_model(Path(config.checkpoint_dir) / best_checkpoint, dmp)
    best_snapshot = None
    # the returned weights' metrics and scores, evaluated once more (also right after a resume)
    final_metrics, final_scores = evaluate_all()
    state_dict = common.gather_state_dict(dmp.state_dict(), env)
    rss = common.all_gather_object(common.peak_rss_mb(), env)
    result = None
    if env.is_main:
        result = DLRMTrainResult(
            state_dict=strip_prefix(state_dict),
            model_config=model_config.to_dict(),
            layout=[dict(x) for x in config.layout],
            config=config.to_dict(),
            history=history,
            best_epoch=best_epoch,
            final_metrics=final_metrics,
            eval_scores=final_scores,
            stopped_early=stopped_early,
            plan_text=sharded.plan_text,
            samples_per_second=samples_total / max(train_seconds_total, 1e-9),
            world_size=env.world_size,
            peak_rss_mb=[float(x) for x in rss],
            total_seconds=time.time() - t_start,
            resumed_from_step=resumed_from_step,
        )
        reporter.event({"event": "end", "best_epoch": best_epoch, "final_metrics": final_metrics,
                        "samples_per_second": result.samples_per_second, "stopped_early": stopped_early})
    return common.broadcast_object(result, env)


# ---------------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    return common.trainer_cli(
        argv, description="Train the DLRM ranker (run under torchrun).", config_cls=DLRMTrainConfig, train=train_dlrm,
        summary=lambda r: {"best_epoch": r.best_epoch, "final_metrics": r.final_metrics,
                           "samples_per_second": r.samples_per_second, "world_size": r.world_size},
    )


if __name__ == "__main__":
    # run the module's own copy, so a pickled DLRMTrainResult names recsys_assets.training.dlrm, not __main__
    from recsys_assets.training.dlrm import main as _main

    sys.exit(_main())
