"""Distributed training of the DLRM ranker (TorchRec model parallel; CPU/gloo or GPU/nccl).

Run ``torchrun --nproc_per_node 2 -m recsys_assets.training.dlrm --config cfg.json [--result out.pt]``
(cfg.json: `DLRMTrainConfig` fields), or call ``train_dlrm(config)`` in every process of a launcher. Trains on
MDS pairs (``label``, ``dense``, one column per sparse feature; see `recsys_assets.models.dlrm`) and scores
Parquet evaluation sets (optional ``query_id``: candidate lists for HR/NDCG). The epochs, early stopping and
checkpoints are `training.loop`'s.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recsys_assets.data.pairs import PairSet, load_pair_set
from recsys_assets.data.schema import DENSE, LABEL
from recsys_assets.evaluation.lists import pair_metrics
from recsys_assets.training import checkpoint, distributed, loop, sharding, streaming, trainer_config
from recsys_assets.training.distributed import DistEnv
from recsys_assets.training.trainer_config import setting

LOWER_IS_BETTER = ("logloss",)  # early-stopping metrics to minimize (the others are maximized)
TEST_SET = "test"  # an evaluation set by this name is only ever a final set


@dataclasses.dataclass
class DLRMTrainConfig(trainer_config.JsonConfig):
    train_mds: tuple[str, ...]  # MDS folders of training pairs
    layout: tuple[dict, ...]  # SparseFeature dicts (models.dlrm.SparseFeature)
    dense_in_features: int
    eval_sets: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> Parquet path, scored each epoch
    selection_set: str | None = None  # eval set for early stopping / best epoch (None: the last epoch)
    # name -> Parquet path, scored once with the final weights (test: never read while training)
    final_sets: dict[str, str] = dataclasses.field(default_factory=dict)

    # model. Defaults chosen on the holdout users' validation lists (ml-latest-small and synthetic data).
    embedding_dim: int = setting(16, "Embedding width of every table; the bottom MLP's last size must equal it.")
    bottom_layer_sizes: tuple[int, ...] = setting((64, 16), "Dense MLP; the last size must equal embedding_dim.")
    top_layer_sizes: tuple[int, ...] = setting((64, 32, 1), "Over MLP; the last size must be 1.")

    # optimization
    epochs: int = setting(15, "Most epochs; the best one on the selection set is returned.")
    batch_size: int = setting(
        512,
        "Per process (global batch = this x processes). With the ranker window's ~12k lists on ml-latest-small, "
        "2 x 512 matched 2 x 128 on the holdout lists (NDCG@10 0.0903 vs 0.0911) at a third of the epoch time.",
    )
    patience: int = setting(4, "Epochs without a gain on the early-stopping metric before stopping.")
    min_delta: float = 0.0
    early_stopping_metric: str = setting(
        "ndcg@10", "On the selection set: ndcg@10 | hr@10 (need query ids) | auroc | logloss."
    )
    sparse_optimizer: str = "row_wise_adagrad"
    sparse_lr: float = setting(0.002, "RowWiseAdagrad on the tables, fused into backward.")
    dense_lr: float = setting(3e-3, "Adam on the MLPs.")
    weight_decay: float = setting(0.0, "Adam weight decay on the MLPs.")
    epoch_size: int | None = None  # rows per epoch over all ranks; None = all
    seed: int = setting(0, "Seeds the model and the data order.")

    # distributed / runtime
    use_gpu: bool = False
    sharding_types: tuple[str, ...] | None = None
    single_node: bool = False
    num_workers: int = 0  # DataLoader workers decoding MDS blocks ahead of the step (0: in the trainer; GPU: 2)
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

        self.train_mds = tuple(
            str(p) for p in ([self.train_mds] if isinstance(self.train_mds, (str, Path)) else self.train_mds)
        )
        self.layout = tuple(dict(x) for x in self.layout)
        validate_layout(layout_from_dicts(self.layout))
        self.eval_sets = {str(k): str(v) for k, v in dict(self.eval_sets).items()}
        self.final_sets = {str(k): str(v) for k, v in dict(self.final_sets).items()}
        if TEST_SET in self.eval_sets:
            raise ValueError(
                f"the {TEST_SET!r} set would be scored every epoch: pass it in final_sets, scored once at the end"
            )
        if set(self.eval_sets) & set(self.final_sets):
            raise ValueError(
                f"sets in both eval_sets and final_sets: {sorted(set(self.eval_sets) & set(self.final_sets))}"
            )
        self.bottom_layer_sizes = tuple(int(x) for x in self.bottom_layer_sizes)
        self.top_layer_sizes = tuple(int(x) for x in self.top_layer_sizes)
        self.ks = tuple(int(k) for k in self.ks)
        if self.sharding_types is not None:
            self.sharding_types = tuple(self.sharding_types)
        if self.selection_set is not None:
            if self.selection_set not in self.eval_sets:
                raise ValueError(
                    f"selection_set {self.selection_set!r} is not one of the eval sets {sorted(self.eval_sets)}"
                )
        if self.batch_size <= 0 or self.epochs <= 0 or self.patience <= 0:
            raise ValueError("batch_size, epochs and patience must be positive")
        if self.sparse_lr <= 0 or self.dense_lr <= 0 or self.weight_decay < 0:
            raise ValueError("sparse_lr and dense_lr must be > 0 and weight_decay >= 0")
        list_metrics = {f"{m}@{k}" for k in self.ks for m in ("hr", "ndcg")}
        if self.early_stopping_metric not in {"auroc", "logloss", *list_metrics}:
            raise ValueError(
                f"early_stopping_metric {self.early_stopping_metric!r} is not auroc, logloss or one of "
                f"{sorted(list_metrics)}"
            )
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
    final_metrics: dict[str, dict[str, float]]  # eval and final set -> metrics of the returned weights
    eval_scores: dict[str, np.ndarray]  # eval and final set -> logits of the returned weights, in row order
    stopped_early: bool
    plan_text: str
    samples_per_second: float
    world_size: int
    peak_rss_mb: list[float]
    total_seconds: float
    resumed_from_step: int | None = None  # the checkpoint step this launch continued from (None: fresh)

    def load_model(self, device: str | torch.device = "cpu"):
        from recsys_assets.models.dlrm import DLRMModelConfig, layout_from_dicts, load_dlrm

        return load_dlrm(
            self.state_dict, layout_from_dicts(self.layout), DLRMModelConfig.from_dict(self.model_config), device
        )


@torch.no_grad()
def sharded_logits(dlrm, layout, config, data: PairSet, env: DistEnv, batch_size: int) -> np.ndarray:
    """Collective. Logits [n] of every pair, on every rank: each rank scores a contiguous part in the same
    number of equally sized calls (short calls padded with row 0), then the parts are gathered in rank order."""
    from recsys_assets.models.dlrm import batch_to_kjt, dense_tensor

    n = data.n
    start, end = distributed.shard_bounds(n, env.rank, env.world_size)
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
    return distributed.all_gather_variable(local.to(env.device), env).cpu().numpy()


def score_final_sets(result: DLRMTrainResult, config: DLRMTrainConfig | Mapping[str, Any]) -> DLRMTrainResult:
    """`result`, trained without `config.final_sets` (a settings-search trial of the same settings), with those
    sets scored once by its returned weights, in this process: what a fit adds to the same training at its end."""
    from recsys_assets.models.dlrm import DLRMModelConfig, DLRMScorer

    if not isinstance(config, DLRMTrainConfig):
        config = DLRMTrainConfig.from_dict(config)
    layout, size = config.sparse_layout(), config.eval_batch_size
    scorer = DLRMScorer(result.load_model(), layout, DLRMModelConfig.from_dict(result.model_config)).eval()
    metrics, scores = dict(result.final_metrics), dict(result.eval_scores)
    for name, path in config.final_sets.items():
        pairs = load_pair_set(path, layout, config.dense_in_features)
        parts = [scorer(pairs.rows(lo, min(lo + size, pairs.n))) for lo in range(0, pairs.n, size)]
        scores[name] = torch.cat(parts).float().numpy() if parts else np.zeros(0, np.float32)
        metrics[name] = pair_metrics(pairs.labels, scores[name], pairs.query_ids, config.ks)
    return dataclasses.replace(result, final_metrics=metrics, eval_scores=scores, config=config.to_dict())


# --------------------------------------------------------------------------------------------------- train
def train_block_columns(config: DLRMTrainConfig) -> list:
    """The MDS block columns the DLRM reads: label, the dense vector and each sparse feature's ids."""
    from recsys_assets.data.blocks import BlockColumn

    sparse = [BlockColumn(f.name, "int32", None if f.multi_valued else 0) for f in config.sparse_layout()]
    return [BlockColumn(LABEL, "float32"), BlockColumn(DENSE, "float32", config.dense_in_features), *sparse]


def validate_train_mds(config: DLRMTrainConfig) -> None:
    """Each training MDS folder's files against its index.json, and its block layout against the columns read."""
    from recsys_assets.data.mds import validate_mds
    from recsys_assets.training.block_loader import check_layouts

    for folder in config.train_mds:
        validate_mds(folder)
    check_layouts(config.train_mds, train_block_columns(config))


def train_dlrm(config: DLRMTrainConfig | Mapping[str, Any], callbacks: Sequence[loop.Callback] = ()) -> DLRMTrainResult:
    """Train on the MDS pairs; score the eval sets each epoch and the final sets once, with the returned weights.
    Every rank returns the same result."""
    return trainer_config.run_trainer(config, DLRMTrainConfig, functools.partial(_train, callbacks=callbacks))


class DLRMHooks(loop.TrainerHooks):
    """The DLRM's part of the loop: BCE on labelled pairs; every evaluation set scored on the sharded model."""

    def __init__(
        self,
        config: DLRMTrainConfig,
        env: DistEnv,
        eval_sets: Mapping[str, PairSet],
        final_sets: Mapping[str, PairSet],
        sharded: sharding.ShardedModel,
        optimizer: Any,
    ) -> None:
        self.config, self.env, self.eval_sets, self.final_sets = config, env, eval_sets, final_sets
        self.layout, self.model_config = config.sparse_layout(), config.model_config()
        self.sharded, self.optimizer = sharded, optimizer
        self.scores: dict[str, np.ndarray] = {}  # set -> logits of the last `evaluate()` / `evaluate_final()`

    def train_step(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, int]:
        from recsys_assets.models.dlrm import batch_to_kjt, dense_tensor

        device = self.env.device
        kjt = batch_to_kjt(batch, self.layout).to(device)
        dense = dense_tensor(batch, self.config.dense_in_features).to(device)
        labels = torch.as_tensor(batch[LABEL]).float().reshape(-1).to(device)
        loss, _ = self.sharded.dmp(dense, kjt, labels)
        return loss, int(batch[LABEL].shape[0])

    def evaluate(self) -> dict[str, dict[str, float]]:
        """Collective. The eval sets' metrics (each epoch)."""
        return self._score(self.eval_sets)

    def evaluate_final(self) -> dict[str, dict[str, float]]:
        """Collective. Every set's metrics, the final sets' for the only time."""
        return self._score({**self.eval_sets, **self.final_sets})

    def _score(self, sets: Mapping[str, PairSet]) -> dict[str, dict[str, float]]:
        metrics, self.scores = {}, {}
        for name, s in sets.items():
            logits = sharded_logits(
                self.sharded.dmp.module.dlrm, self.layout, self.model_config, s, self.env, self.config.eval_batch_size
            )
            self.scores[name] = logits
            metrics[name] = pair_metrics(s.labels, logits, s.query_ids, self.config.ks)
        return metrics

    def flat_metrics(self, metrics: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
        return {f"{name}_{k}": v for name, m in metrics.items() for k, v in m.items()}


def _build(config: DLRMTrainConfig, env: DistEnv) -> DLRMHooks:
    """The evaluation sets and the sharded model of a run."""
    from recsys_assets.models.dlrm import DLRMTrainTask, build_dlrm, embedding_bag_configs

    layout, model_config = config.sparse_layout(), config.model_config()
    paths = {**config.eval_sets, **config.final_sets}
    sets = {name: load_pair_set(p, layout, config.dense_in_features) for name, p in paths.items()}
    for name, s in sets.items():
        if s.n == 0:
            raise ValueError(f"evaluation set {name!r} ({paths[name]}) is empty")
    dlrm = build_dlrm(layout, model_config, device=env.device, table_device="meta")
    tables = embedding_bag_configs(layout, model_config.embedding_dim)
    sharded, optimizer = sharding.shard_for_training(
        DLRMTrainTask(dlrm), [dlrm.sparse_arch.embedding_bag_collection], tables, env, config
    )
    eval_sets = {name: sets[name] for name in config.eval_sets}
    final_sets = {name: sets[name] for name in config.final_sets}
    return DLRMHooks(config, env, eval_sets, final_sets, sharded, optimizer)


def _train(
    config: DLRMTrainConfig, env: DistEnv, t_start: float, callbacks: Sequence[loop.Callback] = ()
) -> DLRMTrainResult:
    from recsys_assets.models.dlrm import strip_prefix

    distributed.seed_everything(config.seed)
    # corrupt shards, another layout, or an explicit resume without a checkpoint fail here, before any model
    validate_train_mds(config)
    resume_path = checkpoint.resolve_resume(config.checkpoint_dir, config.resume)
    hooks = _build(config, env)
    selection = None  # without a selection set: no early stopping, the last epoch is returned
    if config.selection_set is not None:
        selection = loop.Selection(
            f"{config.selection_set}_{config.early_stopping_metric}",
            lower_is_better=config.early_stopping_metric in LOWER_IS_BETTER,
            patience=config.patience,
            min_delta=config.min_delta,
        )
    settings = loop.LoopSettings.from_config(
        config, name="dlrm", phase=config.selection_set or "train", selection=selection, resume_path=resume_path
    )
    streaming.prepare_streaming()
    loader = streaming.block_loader(
        config.train_mds,
        train_block_columns(config),
        config.batch_size,
        env,
        seed=config.seed,
        num_workers=config.num_workers,
        epoch_size=config.epoch_size,
    )
    training = loop.TrainingLoop(
        settings, env, hooks, sharded=hooks.sharded, optimizer=hooks.optimizer, loader=loader, callbacks=callbacks
    )
    del loader  # the loop drops its reference when it is done, which frees the Streaming dataset
    out = training.run()
    # the returned weights' metrics and scores, evaluated once more (also right after a resume); the final sets
    # (test) are scored here for the first and only time
    final_metrics = hooks.evaluate_final()
    fields = training.result_fields(out, t_start)
    result = None
    if env.is_main:
        fields["state_dict"] = strip_prefix(fields["state_dict"])
        result = DLRMTrainResult(
            **fields,
            model_config=hooks.model_config.to_dict(),
            layout=[dict(x) for x in config.layout],
            final_metrics=final_metrics,
            eval_scores=hooks.scores,
        )
    return training.publish(result)


# ---------------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    return trainer_config.trainer_cli(
        argv,
        description="Train the DLRM ranker (run under torchrun).",
        config_cls=DLRMTrainConfig,
        train=train_dlrm,
    )


if __name__ == "__main__":
    # run the module's own copy, so a pickled DLRMTrainResult names recsys_assets.training.dlrm, not __main__
    from recsys_assets.training.dlrm import main as _main

    sys.exit(_main())
