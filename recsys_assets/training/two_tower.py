"""Distributed training of the Two Tower retrieval model (TorchRec model parallel; CPU/gloo or GPU/nccl).

Run ``torchrun --nproc_per_node 2 -m recsys_assets.training.two_tower --config cfg.json [--result out.pt]``
(cfg.json: `TwoTowerTrainConfig` fields), or call ``train_two_tower(config)`` in every process of a launcher
(TorchDistributor, elastic_launch). The epochs, early stopping and checkpoints are `training.loop`'s; this
module builds the model, the data and the sharded full-ranking evaluation.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recsys_assets.data.phases import PHASES
from recsys_assets.data.schema import (
    HISTORY,
    HISTORY_LEN,
    ITEM,
    RANKER_WINDOW,
    SPLIT,
    TIMESTAMP,
    USER,
    DatasetMeta,
    DatasetPaths,
)
from recsys_assets.data.splits import load_splits_frame
from recsys_assets.training import checkpoint, distributed, loop, sharding, streaming, trainer_config
from recsys_assets.training.distributed import DistEnv
from recsys_assets.training.trainer_config import setting

log = logging.getLogger(__name__)
# the phase whose held-out rows choose the epochs (and the search's settings)
SELECTION_PHASE = "validation"


@dataclasses.dataclass
class TwoTowerTrainConfig(trainer_config.JsonConfig):
    """All settings of one training run (JSON-able: `to_json` / `from_json`)."""

    data_root: str  # dataset folder (schema.DatasetPaths)
    # the phase fitted (data/phases.py): "validation" (fit train; the validation item is ranked each epoch, the
    # early-stopping signal), "test" (fit train + validation for fixed epochs; test is ranked once, after
    # training) or "ranker" (fit the train rows before the ranker window for fixed epochs; nothing is ranked)
    eval_phase: str = "validation"

    # model
    # Width 64 with (128, 64) towers won on MovieLens's validation over 3 seeds (NDCG@10 0.0674 vs 0.0617 for 32
    # with (64, 32)) and tied on Last.fm, for 1.4x to 1.9x the sequence epoch (README "Training").
    embedding_dim: int = setting(64, "Embedding width of every table.")
    layer_sizes: tuple[int, ...] = setting((128, 64), "Tower MLP sizes; the last is the vector size.")
    normalize: bool = True
    temperature: float = setting(0.05, "Softmax temperature over dot products of normalized vectors.")
    learn_temperature: bool = False
    # The default won on validation on both dev sets (MovieLens, timestamped; Last.fm, in a random order):
    # NDCG@10 0.0646 vs 0.0619 and 0.1149 vs 0.1119, one block, seed 0. A second block did not help (0.0613) at
    # twice the cost.
    query_encoder: str = setting(
        "sequence",
        "How the query tower reads the history: 'bag' (mean pooled, + the recent-item features) or 'sequence' "
        "(causal self-attention over the last max_history items in order, through a TorchRec EmbeddingCollection).",
    )
    sequence_blocks: int = setting(1, "Self-attention blocks of the sequence encoder.")
    sequence_heads: int = setting(1, "Attention heads of the sequence encoder (they divide embedding_dim).")
    sequence_dropout: float = setting(0.2, "Dropout of the sequence encoder (embeddings, attention, blocks).")
    max_history: int | None = setting(
        None,
        "Most recent history items the query tower reads: the mean-pooled bag or the attended sequence (<= the "
        "splits' history_length; None: all).",
    )
    recent_items: int = setting(
        1,
        "The last k history items as their own query feature on the shared item table (0 = off; bag encoder "
        "only, the sequence encoder reads them in order): the next item depends most on the latest one, which "
        "a mean over the history dilutes.",
    )
    recent_slots: bool = False  # one feature per recent position (recent_items_0 = latest) instead of one bag
    use_user_id: bool = setting(
        True,
        "A per-user embedding in the query tower: keep it where users have many rows (MovieLens ~160); with "
        "25-40 rows per user (the synthetic sizes) it overfits.",
    )

    # loss
    logq_correction: bool = setting(True, "Subtract log of each candidate's sampling probability (in-batch negatives).")
    num_uniform_negatives: int = setting(0, "Extra uniformly sampled negatives per batch (shared by its rows).")

    # optimization
    # the sequence encoder's best epoch on MovieLens is about 10; early stopping ends the bag's sooner
    epochs: int = setting(20, "Most epochs of the validation fit; the refit runs the best epoch count.")
    batch_size: int = setting(256, "Per process.")
    early_stopping: bool | None = None  # default: on for eval_phase "validation", off (refused) for the others
    restore_best: bool | None = None  # return the best epoch's weights (default: = early_stopping), else the last
    # Window 3 and patience 5 won a split-half test on MovieLens's validation users (epochs chosen on one half,
    # NDCG@10 read on the other, 5 seeds x 200 splits): 0.0566 against 0.0525 for one epoch and patience 3, which
    # stopped still-rising runs at epoch 6 on average.
    patience: int = setting(5, "Epochs without a gain on the early-stopping signal before stopping.")
    min_delta: float = 0.0
    early_stopping_metric: str = "ndcg@10"
    early_stopping_window: int = setting(
        3,
        "Epochs whose mean early-stopping metric is the signal (patience, best epoch, refit epochs): one epoch's "
        "validation NDCG@10 over a few hundred users moves by about 0.005 from epoch to epoch.",
    )
    sparse_optimizer: str = "row_wise_adagrad"  # fused into backward: row_wise_adagrad | adagrad | sgd
    sparse_lr: float = setting(0.05, "RowWiseAdagrad on the tables, fused into backward.")
    dense_lr: float = setting(1e-3, "Adam on the MLPs.")
    weight_decay: float = setting(0.0, "Adam weight decay on the MLPs.")
    epoch_size: int | None = None  # rows per epoch over all ranks; None = all
    seed: int = setting(0, "Seeds the model, the data order and the negatives.")

    # distributed / runtime
    use_gpu: bool = False
    sharding_types: tuple[str, ...] | None = None  # default: table_wise/column_wise on CPU
    column_wise_min_partition: int | None = None  # planner's lower bound on column-shard width
    single_node: bool = False  # set LOCAL_RANK=RANK, LOCAL_WORLD_SIZE=WORLD_SIZE (see distributed.init_distributed)
    num_workers: int = 0  # DataLoader workers decoding MDS blocks ahead of the step (0: in the trainer; GPU: 2)
    num_threads: int | None = None  # torch.set_num_threads per process

    # evaluation
    eval_batch_size: int = 512
    ks: tuple[int, ...] = (10, 100)
    lookup_check_ids: tuple[int, ...] = (0,)  # extra ids for the sharded-lookup sample in the result

    # reporting (rank 0)
    mlflow_tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    mlflow_prefix: str = ""
    progress_file: str | None = None

    # checkpoints / resume (recsys_assets.training.checkpoint): sharded DCP state + loader/RNG/trainer state,
    # written every `checkpoint_every_n_steps` global steps (0 = off) and at every epoch end.
    checkpoint_dir: str | None = None
    checkpoint_every_n_steps: int = setting(
        0,
        "Also checkpoint every N global steps (0: at epoch ends only). A retry of a failed run resumes from the "
        "latest checkpoint of its root run; they are deleted once the asset succeeds.",
    )
    checkpoint_keep: int = 2
    # True: resume from the latest checkpoint in checkpoint_dir, a clear error if there is none; "auto": resume
    # if there is one (a relaunch with the same checkpoint_dir continues where it stopped); False: start fresh.
    resume: bool | str = "auto"
    validate_data: bool = True  # cheap checks of MDS files, columns and id ranges before building the model
    # MDS on object storage: stream the fit splits from `<mds_remote>/<split>/` (meta.json's mds_remote; s3://,
    # gs://, dbfs:/, file://) into `<mds_cache_dir>/<split>/` (default: a folder per remote in the system temp
    # dir) instead of reading `<data_root>/mds/<split>/` in place. The rest of data_root is still read locally.
    mds_remote: str | None = None
    mds_cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.eval_phase not in PHASES:
            raise ValueError(f"eval_phase must be one of {sorted(PHASES)}, got {self.eval_phase!r}")
        self.layer_sizes = tuple(int(x) for x in self.layer_sizes)
        self.ks = tuple(int(k) for k in self.ks)
        self.lookup_check_ids = tuple(int(i) for i in self.lookup_check_ids)
        if self.sharding_types is not None:
            self.sharding_types = tuple(self.sharding_types)
        if self.early_stopping is None:
            # Selecting epochs on the test metrics would leak the test set: the test phase trains for a
            # fixed `epochs` (chosen on validation) and returns the last epoch; test is ranked once, at the end.
            self.early_stopping = self.eval_phase == SELECTION_PHASE
        if self.early_stopping and self.eval_phase != SELECTION_PHASE:
            raise ValueError(f"early stopping selects on {SELECTION_PHASE!r} only, not on {self.eval_phase!r}")
        if self.restore_best is None:
            self.restore_best = bool(self.early_stopping)
        if self.batch_size <= 0 or self.epochs <= 0 or self.patience <= 0 or self.early_stopping_window <= 0:
            raise ValueError("batch_size, epochs, patience and early_stopping_window must be positive")
        if self.embedding_dim < 2 or not self.layer_sizes or min(self.layer_sizes) < 1:
            raise ValueError(
                f"embedding_dim must be >= 2 and layer_sizes positive, got {self.embedding_dim}, {self.layer_sizes}"
            )
        if self.temperature <= 0 or self.sparse_lr <= 0 or self.dense_lr <= 0 or self.weight_decay < 0:
            raise ValueError("temperature, sparse_lr and dense_lr must be > 0 and weight_decay >= 0")
        if self.num_uniform_negatives < 0:
            raise ValueError("num_uniform_negatives must be >= 0")
        if self.recent_items < 0 or (self.max_history is not None and self.max_history < 0):
            raise ValueError("recent_items and max_history must be >= 0")
        if self.query_encoder not in ("bag", "sequence"):  # models.features.QUERY_ENCODERS, without torchrec here
            raise ValueError(f"query_encoder must be one of ('bag', 'sequence'), got {self.query_encoder!r}")
        if self.sequence_blocks < 1 or self.sequence_heads < 1 or not 0.0 <= self.sequence_dropout < 1.0:
            raise ValueError("sequence_blocks and sequence_heads must be >= 1 and sequence_dropout in [0, 1)")
        if self.query_encoder == "sequence" and self.embedding_dim % self.sequence_heads:
            raise ValueError(f"sequence_heads={self.sequence_heads} must divide embedding_dim={self.embedding_dim}")
        if self.query_encoder == "sequence" and self.max_history == 0:
            raise ValueError("the sequence encoder needs max_history >= 1 (None: the whole history)")
        if self.resume not in (True, False, "auto"):
            raise ValueError(f"resume must be true, false or 'auto', got {self.resume!r}")
        if self.checkpoint_every_n_steps < 0 or self.checkpoint_keep < 1:
            raise ValueError("checkpoint_every_n_steps must be >= 0 and checkpoint_keep >= 1")
        metric_names = {f"{m}@{k}" for k in self.ks for m in ("hr", "ndcg")}
        if self.early_stopping_metric not in metric_names:
            raise ValueError(f"early_stopping_metric {self.early_stopping_metric!r} not in {sorted(metric_names)}")

    @property
    def fit_folders(self) -> tuple[str, ...]:
        """The MDS folders (schema.DatasetPaths.mds) holding the phase's fit rows."""
        return PHASES[self.eval_phase].mds_folders

    @property
    def ranks_each_epoch(self) -> bool:
        """Only the selection phase ranks its held-out rows every epoch; test is ranked once, the ranker phase
        never (its queries are the ranker's)."""
        return self.eval_phase == SELECTION_PHASE

    def model_config(self):
        from recsys_assets.models.two_tower import TwoTowerModelConfig

        return TwoTowerModelConfig(
            embedding_dim=self.embedding_dim,
            layer_sizes=self.layer_sizes,
            normalize=self.normalize,
            temperature=self.temperature,
            learn_temperature=self.learn_temperature,
            sequence_blocks=self.sequence_blocks,
            sequence_heads=self.sequence_heads,
            sequence_dropout=self.sequence_dropout,
        )

    def check_dataset(self, meta: DatasetMeta) -> None:
        """The settings that depend on the dataset: the history features read at most its history_length."""
        h = meta.history_length
        for name in ("max_history", "recent_items"):
            value = getattr(self, name)
            if value is not None and value > h:
                raise ValueError(
                    f"{name}={value} exceeds the dataset's history_length={h}: re-materialize "
                    f"interaction_splits with a longer history_length or lower {name}"
                )

    def feature_spec(self, meta: DatasetMeta):
        """The FeatureSpec of this run on a dataset."""
        from recsys_assets.models.features import FeatureSpec

        self.check_dataset(meta)
        sequence = self.query_encoder == "sequence"
        return FeatureSpec.from_meta(
            meta,
            self.max_history,
            recent_items=0 if sequence else self.recent_items,
            recent_slots=self.recent_slots and not sequence,
            use_user_id=self.use_user_id,
            query_encoder=self.query_encoder,
        )


@dataclasses.dataclass
class TwoTowerTrainResult:
    """What a training run returns (identical on every rank; plain types and CPU tensors, picklable).

    Attributes:
        state_dict: unsharded state dict of the best epoch, TwoTowerTrainTask keys (``two_tower.…``);
            `load_model()` rebuilds an unsharded TwoTower from it.
        model_config: TwoTowerModelConfig as a dict; feature_spec: FeatureSpec as a dict.
        config: the TwoTowerTrainConfig as a dict.
        eval_phase: the phase fitted (data/phases.py); fit_folders: the MDS folders trained on.
        history: one dict per epoch: epoch, loss (mean train loss over all ranks), metrics (hr@K/ndcg@K of
            eval_phase), train_seconds, eval_seconds, samples (global).
        best_epoch: index (0-based) of the epoch whose weights are returned: the best one by
            `early_stopping_metric` with `restore_best`, else the last (the test-phase default);
            `best_epoch + 1` is the epoch count to refit with.
        final_metrics: eval_phase metrics of the returned weights (recomputed after restoring them).
        stopped_early: True when patience ran out before `epochs`.
        plan_text: the ShardingPlan rendered as text.
        samples_per_second: global training throughput (eval excluded).
        world_size; peak_rss_mb: peak RSS (MiB) per rank, rank order.
        lookup_check: {table: {"ids": int64 [n], "rows": float [n, dim]}} rows looked up through the SHARDED
            model after restoring the best weights (compare with `state_dict` to check the gather).
        total_seconds: wall time of the whole call on rank 0.
    """

    state_dict: dict[str, torch.Tensor]
    model_config: dict[str, Any]
    feature_spec: dict[str, Any]
    config: dict[str, Any]
    eval_phase: str
    fit_folders: tuple[str, ...]
    history: list[dict[str, Any]]
    best_epoch: int
    final_metrics: dict[str, float]
    stopped_early: bool
    plan_text: str
    samples_per_second: float
    world_size: int
    peak_rss_mb: list[float]
    lookup_check: dict[str, dict[str, torch.Tensor]]
    total_seconds: float
    # resume: the global step / folder this launch continued from (None: started fresh), and rows looked up
    # through the sharded model right after loading the checkpoint (as `lookup_check`)
    resumed_from_step: int | None = None
    resumed_from: str | None = None
    resume_check: dict[str, dict[str, torch.Tensor]] | None = None
    checkpoint_dir: str | None = None
    global_steps: int = 0

    def spec(self):
        from recsys_assets.models.features import FeatureSpec

        d = dict(self.feature_spec)
        d["user_attributes"] = tuple(tuple(x) for x in d["user_attributes"])
        return FeatureSpec(**d)

    def load_model(self, device: str | torch.device = "cpu"):
        """An unsharded TwoTower (eval mode) with the returned weights."""
        from recsys_assets.models.two_tower import TwoTowerModelConfig, load_two_tower

        return load_two_tower(self.state_dict, self.spec(), TwoTowerModelConfig.from_dict(self.model_config), device)


# ----------------------------------------------------------------------------------------------- eval data
@dataclasses.dataclass
class EvalData:
    """The held-out rows of one phase (query users sorted by id) with their history and exclusion CSR."""

    users: torch.Tensor  # int64 [Q]
    targets: torch.Tensor  # int64 [Q]
    history: torch.Tensor  # int32 [Q, H]
    history_len: torch.Tensor  # int32 [Q]
    exclude_indptr: np.ndarray  # int64 [Q + 1]
    exclude_indices: np.ndarray  # int64


def load_eval_data(root: str | Path, phase: str, meta: DatasetMeta, history_length: int):
    """The EvalData of `phase` (validation or test), via the project's EvalTask."""
    from recsys_assets.evaluation.protocol import EvalTask
    from recsys_assets.models.features import stack_history

    frame = load_splits_frame(root, [USER, ITEM, TIMESTAMP, SPLIT])
    task = EvalTask.from_splits(frame, phase, num_users=meta.num_users, num_items=meta.num_items)
    held = load_splits_frame(root, [USER, ITEM, SPLIT, HISTORY, HISTORY_LEN])
    held = held.loc[held[SPLIT] == phase].sort_values(USER, kind="stable")
    if not np.array_equal(held[USER].to_numpy(np.int64), task.users) or not np.array_equal(
        held[ITEM].to_numpy(np.int64), task.targets
    ):
        raise ValueError(f"the {phase} rows of splits/ disagree with the evaluator's task")
    hist = stack_history(held[HISTORY].to_numpy(), history_length)
    data = EvalData(
        users=torch.as_tensor(task.users, dtype=torch.long),
        targets=torch.as_tensor(task.targets, dtype=torch.long),
        history=torch.from_numpy(hist),
        history_len=torch.as_tensor(held[HISTORY_LEN].to_numpy(np.int32)),
        exclude_indptr=task.exclude_indptr,
        exclude_indices=task.exclude_indices,
    )
    return data


# ---------------------------------------------------------------------------------------------- evaluation
def _chunks(start: int, end: int, n_calls: int, bs: int) -> list[tuple[int, int]]:
    return [(min(start + i * bs, end), min(start + (i + 1) * bs, end)) for i in range(n_calls)]


@torch.no_grad()
def sharded_item_vectors(two_tower, spec, store, env: DistEnv, batch_size: int) -> torch.Tensor:
    """Collective. [num_items, d] candidate vectors on every rank; each rank encodes a contiguous part, in
    fixed-size calls (padded with id 0) so every rank makes the same number of equally sized EBC calls."""
    from recsys_assets.models.features import build_kjt

    n = spec.num_items
    start, end = distributed.shard_bounds(n, env.rank, env.world_size)
    n_calls = max(1, math.ceil(math.ceil(n / env.world_size) / batch_size))
    parts = []
    for lo, hi in _chunks(start, end, n_calls, batch_size):
        ids = torch.zeros(batch_size, dtype=torch.long)
        ids[: hi - lo] = torch.arange(lo, hi)
        kjt = build_kjt(spec, store, stride=batch_size, items=ids).to(env.device)
        parts.append(two_tower.candidate(kjt)[: hi - lo])
    return distributed.all_gather_variable(torch.cat(parts), env)


@torch.no_grad()
def sharded_ranks(
    two_tower, spec, store, data: EvalData, item_vectors: torch.Tensor, env: DistEnv, batch_size: int
) -> torch.Tensor:
    """Collective. int64 [Q] rank of every query's held-out item, on every rank (rank 0's part first)."""
    from recsys_assets.evaluation.protocol import ranks_from_scores
    from recsys_assets.models.features import build_kjt

    q = int(data.users.numel())
    start, end = distributed.shard_bounds(q, env.rank, env.world_size)
    n_calls = max(1, math.ceil(math.ceil(q / env.world_size) / batch_size))
    out = []
    for lo, hi in _chunks(start, end, n_calls, batch_size):
        m = hi - lo
        users = torch.zeros(batch_size, dtype=torch.long)
        hist = torch.full((batch_size, data.history.shape[1]), -1, dtype=torch.int32)
        hlen = torch.zeros(batch_size, dtype=torch.int32)
        users[:m], hist[:m], hlen[:m] = data.users[lo:hi], data.history[lo:hi], data.history_len[lo:hi]
        kjt = build_kjt(spec, store, stride=batch_size, users=users, history=hist, history_len=hlen).to(env.device)
        qv = two_tower.query(kjt)[:m]
        if m:
            scores = qv @ item_vectors.T
            out.append(
                ranks_from_scores(
                    scores, data.targets[lo:hi].to(env.device), data.exclude_indptr[lo : hi + 1], data.exclude_indices
                ).cpu()
            )
    local = torch.cat(out) if out else torch.zeros(0, dtype=torch.long)
    return distributed.all_gather_variable(local.to(env.device), env).cpu()


def evaluate_sharded(
    two_tower, spec, store, data: EvalData, env: DistEnv, batch_size: int, ks: Sequence[int]
) -> dict[str, float]:
    """Collective. Metrics (identical on every rank) of the held-out rows in `data`."""
    from recsys_assets.evaluation.protocol import metrics_from_ranks

    was_training = two_tower.training
    two_tower.eval()
    try:
        items = sharded_item_vectors(two_tower, spec, store, env, batch_size)
        ranks = sharded_ranks(two_tower, spec, store, data, items, env, batch_size)
    finally:
        two_tower.train(was_training)
    return metrics_from_ranks(ranks, ks)


@torch.no_grad()
def sharded_lookup_sample(
    two_tower, spec, env: DistEnv, extra_ids: Sequence[int]
) -> dict[str, dict[str, torch.Tensor]]:
    """Collective. Rows of every table looked up through the (sharded) EBC for ids {0, n//2, n-1} ∪ extra_ids."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from recsys_assets.models.two_tower import feature_to_table, table_configs

    tables = {t.name: t for t in table_configs(spec, two_tower.config.embedding_dim)}
    feat_of = feature_to_table(spec)
    ids_of = {}
    for name, t in tables.items():
        n = t.num_embeddings
        ids_of[name] = sorted({0, n // 2, n - 1, *[i for i in extra_ids if 0 <= i < n]})
    stride = max(len(v) for v in ids_of.values())
    table_of_feature = {f: name for name, f in feat_of.items()}
    values, lengths = [], []
    for key in spec.keys:
        name = table_of_feature.get(key)
        ids = ids_of[name] if name is not None else []
        values.append(torch.tensor(ids, dtype=torch.long))
        lengths.append(torch.tensor([1] * len(ids) + [0] * (stride - len(ids)), dtype=torch.long))
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=spec.keys, values=torch.cat(values), lengths=torch.cat(lengths))
    pooled = two_tower.pooled(kjt.to(env.device))
    return {
        name: {
            "ids": torch.tensor(ids_of[name]),
            "rows": pooled[feat_of[name]][: len(ids_of[name])].detach().cpu().clone(),
        }
        for name in tables
    }


# ------------------------------------------------------------------------------------------------ training
# Floor of the expected copies before the log: an item never seen in the fit splits gets a finite log q.
MIN_EXPECTED_COPIES = 1e-12


def _sampling_log_q(counts: np.ndarray, batch_size: int, num_negatives: int, num_items: int) -> torch.Tensor:
    """log of each item's expected number of copies in a batch's candidate pool: B·p_pop(i) + N/num_items."""
    p = counts.astype(np.float64) / max(1, counts.sum())
    expected = batch_size * p + (num_negatives / num_items if num_negatives else 0.0)
    return torch.from_numpy(np.log(np.maximum(expected, MIN_EXPECTED_COPIES))).float()


# ------------------------------------------------------------------------------------- input validation
def train_block_columns(history_length: int) -> list:
    """The MDS block columns the training loop reads, as the Spark side writes them (data/mds.py split_layout)."""
    from recsys_assets.data.mds import split_layout

    layout = split_layout(history_length)
    return [layout.column(c) for c in (USER, ITEM, HISTORY, HISTORY_LEN)]


def validate_fit_mds(folders: Sequence[Path], meta: DatasetMeta) -> None:
    """Each MDS folder's files against its index.json (sizes, recorded hashes), and its block layout."""
    from recsys_assets.data.mds import validate_mds
    from recsys_assets.training.block_loader import check_layouts

    for folder in folders:
        validate_mds(folder)
    check_layouts(folders, train_block_columns(meta.history_length))


def validate_training_inputs(config: TwoTowerTrainConfig, paths: DatasetPaths, meta: DatasetMeta) -> None:
    """Cheap checks before any model is built (every rank runs them, so all fail together):
    each fit split's MDS files against its index.json (sizes, recorded hashes) and columns; the config's
    history settings against the dataset's history_length; the ids in the splits against the table sizes
    of meta.json (an id >= num_items would index past its embedding table)."""
    import pyarrow.parquet as pq

    if not config.mds_remote:  # remote shards: Streaming checks them, the loader their layout
        validate_fit_mds([paths.mds(folder) for folder in config.fit_folders], meta)
    config.check_dataset(meta)
    table = pq.read_table(paths.splits, columns=[USER, ITEM])
    for column, size, what in ((ITEM, meta.num_items, "num_items"), (USER, meta.num_users, "num_users")):
        values = table.column(column).to_numpy()
        if len(values) == 0:
            raise ValueError(f"the splits in {paths.splits} are empty")
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi >= size:
            raise ValueError(
                f"{column} ids in {paths.splits} span [{lo}, {hi}] but meta.json says {what}={size}: the "
                f"embedding table would be too small (ids must be in [0, {size}))"
            )


# Settings a checkpoint must agree on to be resumed (others, e.g. epochs or the MLflow run, may change).
RESUME_KEYS = (
    "data_root",
    "eval_phase",
    "embedding_dim",
    "layer_sizes",
    "normalize",
    "learn_temperature",
    "max_history",
    "recent_items",
    "recent_slots",
    "query_encoder",
    "sequence_blocks",
    "sequence_heads",
    "use_user_id",
    "sparse_optimizer",
    "num_uniform_negatives",
)


def _check_resume_compatible(config: TwoTowerTrainConfig, saved: Mapping[str, Any], path: Path) -> None:
    now = config.to_dict()
    diff = {k: (saved.get(k), now.get(k)) for k in RESUME_KEYS if k in saved and saved.get(k) != now.get(k)}
    if diff:
        raise ValueError(
            f"checkpoint {path} was written with other settings (saved, now): {diff}; "
            f"use another checkpoint_dir or resume=False"
        )


def train_two_tower(
    config: TwoTowerTrainConfig | Mapping[str, Any], callbacks: Sequence[loop.Callback] = ()
) -> TwoTowerTrainResult:
    """Train on the fit rows of `config.eval_phase`, rank its held-out rows as `TwoTowerTrainConfig` says.

    Call in every process of a distributed launch (or alone: a one-process group is created). Every rank
    returns the same result. The process group is destroyed at the end if this call created it. `callbacks`
    observe the loop on every rank (e.g. tests' fault injection).
    """
    return trainer_config.run_trainer(config, TwoTowerTrainConfig, functools.partial(_train, callbacks=callbacks))


def train_two_tower_phases(configs: Sequence[TwoTowerTrainConfig | Mapping[str, Any]]) -> list[TwoTowerTrainResult]:
    """`train_two_tower` of each config in turn, in one launch: fits that follow each other (the refit and the
    ranker phase) share one process start, one import of torch / TorchRec / Streaming and one process group
    instead of paying them per phase (about 10 s a launch on 2 cores). Returns the results in `configs`' order."""
    return _in_one_process_group(configs, chain_epochs=False)


def train_two_tower_selected(configs: Sequence[TwoTowerTrainConfig | Mapping[str, Any]]) -> list[TwoTowerTrainResult]:
    """The validation phase (`configs[0]`, early-stopped), then each later phase (`configs[1:]`: the refit, the
    ranker phase) for the epoch count it selected (best_epoch + 1; their own `epochs` is ignored), all in one
    launch. Without a settings search before it, a Two Tower asset needs no second process start."""
    return _in_one_process_group(configs, chain_epochs=True)


def _in_one_process_group(configs, *, chain_epochs: bool) -> list[TwoTowerTrainResult]:
    configs = [c if isinstance(c, TwoTowerTrainConfig) else TwoTowerTrainConfig.from_dict(c) for c in configs]
    if not configs:
        return []
    env = distributed.init_distributed(configs[0].use_gpu, single_node=configs[0].single_node)
    try:  # each fit joins this process group, so none destroys it before the next
        results = [train_two_tower(configs[0])]
        for config in configs[1:]:
            if chain_epochs:
                config = dataclasses.replace(config, epochs=results[0].best_epoch + 1)
            results.append(train_two_tower(config))
        return results
    finally:
        distributed.shutdown_distributed(env)


class TwoTowerHooks(loop.TrainerHooks):
    """The Two Tower's part of the loop: in-batch (+ uniform) negatives with logQ correction; full-ranking
    evaluation of `eval_phase` on the sharded model."""

    def __init__(
        self,
        config: TwoTowerTrainConfig,
        env: DistEnv,
        spec,
        store,
        eval_data: EvalData,
        log_q_table: torch.Tensor,
        sharded: sharding.ShardedModel,
        optimizer: Any,
    ) -> None:
        self.config, self.env, self.spec, self.store, self.eval_data = config, env, spec, store, eval_data
        self.store_dev = store.to(env.device)
        self.log_q_table = log_q_table.to(env.device)
        self.sharded, self.optimizer = sharded, optimizer
        self.tower = sharded.dmp.module.two_tower  # the sharded TwoTower without the DDP wrapper (evaluation)
        self.negatives = distributed.rank_generator(config.seed, env.rank)
        self.resume_check: dict[str, dict[str, torch.Tensor]] | None = None

    def train_step(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        from recsys_assets.models.features import batch_to_kjt

        b, n_neg = int(batch[ITEM].shape[0]), self.config.num_uniform_negatives
        extra = torch.randint(self.spec.num_items, (n_neg,), generator=self.negatives) if n_neg else None
        kjt = batch_to_kjt(batch, self.spec, self.store, extra).to(self.env.device)
        cand = batch[ITEM].long()
        if extra is not None:
            cand = torch.cat([cand, extra])
        cand = cand.to(self.env.device)
        log_q = self.log_q_table[cand] if self.config.logq_correction else None
        loss, _ = self.sharded.dmp(kjt, cand, log_q, b)
        return loss, b

    def evaluate(self) -> dict[str, float]:
        c, env = self.config, self.env
        return evaluate_sharded(self.tower, self.spec, self.store_dev, self.eval_data, env, c.eval_batch_size, c.ks)

    def flat_metrics(self, metrics: Mapping[str, float]) -> dict[str, float]:
        return {f"{self.config.eval_phase}_{k}": v for k, v in metrics.items()}

    def on_load_checkpoint(self, trainer_state: Mapping[str, Any], path: Path) -> None:
        _check_resume_compatible(self.config, trainer_state.get("config", {}), path)
        epoch = int(trainer_state["epoch"])
        if epoch > self.config.epochs:
            raise ValueError(f"checkpoint {path} is at epoch {epoch}, beyond this run's epochs={self.config.epochs}")
        self.resume_check = sharded_lookup_sample(self.tower, self.spec, self.env, self.config.lookup_check_ids)


def _build(config: TwoTowerTrainConfig, env: DistEnv, paths: DatasetPaths, meta: DatasetMeta) -> TwoTowerHooks:
    """The features, the evaluation data, the sampling correction and the sharded model of a run."""
    from recsys_assets.models.features import FeatureStore
    from recsys_assets.models.two_tower import TwoTowerTrainTask, build_two_tower, table_configs

    spec = config.feature_spec(meta)
    store = FeatureStore.load(paths.root, spec)
    # the ranker phase's queries are the ranker's, not ranked here: it has no evaluation data
    eval_data = None
    if PHASES[config.eval_phase].one_query_per_user:
        eval_data = load_eval_data(paths.root, config.eval_phase, meta, spec.history_length)
    frame = load_splits_frame(paths.root, [ITEM, SPLIT, RANKER_WINDOW])
    counts = np.bincount(frame.loc[PHASES[config.eval_phase].fit.mask(frame), ITEM], minlength=spec.num_items)
    del frame
    log_q_table = _sampling_log_q(counts, config.batch_size, config.num_uniform_negatives, spec.num_items)
    model_config = config.model_config()
    # tables on the meta device (the plan places them), dense layers on the device
    two_tower = build_two_tower(spec, model_config, device=env.device, table_device="meta")
    tables = table_configs(spec, model_config.embedding_dim)
    sharded, optimizer = sharding.shard_for_training(
        TwoTowerTrainTask(two_tower),
        [m for m in (two_tower.ebc, two_tower.ec) if m is not None],
        tables,
        env,
        config,
        min_partition=config.column_wise_min_partition,
    )
    return TwoTowerHooks(config, env, spec, store, eval_data, log_q_table, sharded, optimizer)


def _fit_loader(config: TwoTowerTrainConfig, paths: DatasetPaths, meta: DatasetMeta, env: DistEnv):
    """Collective. The block loader over the fit splits (local MDS, or remote MDS through a local cache)."""
    streaming.prepare_streaming()
    folders, remotes = [paths.mds(s) for s in config.fit_folders], None
    if config.mds_remote:
        from recsys_assets.data.mds import join_remote

        cache = Path(config.mds_cache_dir or streaming.default_mds_cache_dir(config.mds_remote))
        folders = [cache / s for s in config.fit_folders]
        remotes = [join_remote(config.mds_remote, s) for s in config.fit_folders]
    return streaming.block_loader(
        folders,
        train_block_columns(meta.history_length),
        config.batch_size,
        env,
        seed=config.seed,
        num_workers=config.num_workers,
        epoch_size=config.epoch_size,
        remotes=remotes,
    )


def _train(
    config: TwoTowerTrainConfig, env: DistEnv, t_start: float, callbacks: Sequence[loop.Callback] = ()
) -> TwoTowerTrainResult:
    distributed.seed_everything(config.seed)
    paths = DatasetPaths(Path(config.data_root))
    meta = DatasetMeta.load(paths.meta)
    if config.validate_data:
        validate_training_inputs(config, paths, meta)
    # an explicit resume without a checkpoint fails here, before any expensive work
    resume_path = checkpoint.resolve_resume(config.checkpoint_dir, config.resume)
    hooks = _build(config, env, paths, meta)
    selection = None  # the fixed-epoch phases (test, ranker) rank nothing during training
    if config.ranks_each_epoch:
        selection = loop.Selection(
            f"{config.eval_phase}_{config.early_stopping_metric}",
            patience=config.patience,
            min_delta=config.min_delta,
            early_stopping=bool(config.early_stopping),
            restore_best=bool(config.restore_best),
            window=config.early_stopping_window,
        )
    settings = loop.LoopSettings.from_config(
        config,
        name="two_tower",
        phase=config.eval_phase,
        selection=selection,
        evaluate_each_epoch=config.ranks_each_epoch,
        resume_path=resume_path,
        checkpoint_every_n_steps=config.checkpoint_every_n_steps,
    )
    training = loop.TrainingLoop(
        settings,
        env,
        hooks,
        sharded=hooks.sharded,
        optimizer=hooks.optimizer,
        loader=_fit_loader(config, paths, meta, env),
        generators={"negatives": hooks.negatives},
        callbacks=callbacks,
    )
    out = training.run()
    # the returned weights' metrics: the last epoch's, or evaluated again after the best epoch's were put back;
    # test is ranked here, once, with the final weights; the ranker phase has nothing to rank
    if config.ranks_each_epoch and not out.restored:
        final_metrics = dict(out.history[-1]["metrics"])
    else:
        final_metrics = hooks.evaluate() if hooks.eval_data is not None else {}
    lookup = sharded_lookup_sample(hooks.tower, hooks.spec, env, config.lookup_check_ids)
    fields = training.result_fields(out, t_start)
    result = None
    if env.is_main:
        feature_spec = dataclasses.asdict(hooks.spec)
        feature_spec["user_attributes"] = [list(x) for x in hooks.spec.user_attributes]
        result = TwoTowerTrainResult(
            **fields,
            model_config=config.model_config().to_dict(),
            feature_spec=feature_spec,
            eval_phase=config.eval_phase,
            fit_folders=tuple(config.fit_folders),
            final_metrics=final_metrics,
            lookup_check=lookup,
            resumed_from=out.resumed_from,
            resume_check=hooks.resume_check,
            checkpoint_dir=config.checkpoint_dir,
            global_steps=out.global_steps,
        )
    return training.publish(result)


# ---------------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    return trainer_config.trainer_cli(
        argv,
        description="Train the Two Tower model (run under torchrun).",
        config_cls=TwoTowerTrainConfig,
        train=train_two_tower,
    )


if __name__ == "__main__":
    # Run the copy imported under the package name, so that pickled results name
    # recsys_assets.training.two_tower.TwoTowerTrainResult rather than __main__.TwoTowerTrainResult.
    from recsys_assets.training.two_tower import main as _main

    sys.exit(_main())
