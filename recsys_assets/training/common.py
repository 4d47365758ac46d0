"""Distributed helpers shared by the TorchRec trainers: process group, sharding + optimizers, gathering sharded
state, collectives, Streaming loaders and progress reporting. No Dagster / Spark here.

Every function documented as "collective" must be called on every rank, in the same order.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import random
import resource
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

CPU_SHARDING_TYPES = ("table_wise", "column_wise")
# Sharding types the planner may consider on CUDA (RW/TWRW need GPUs; data_parallel would ignore the
# in-backward optimizer).
GPU_SHARDING_TYPES = ("table_wise", "column_wise", "table_column_wise", "row_wise", "table_row_wise")

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- configs
def setting(default: Any, help: str) -> Any:
    """A training-config field that the model's Dagster config exposes too, with this description
    (recsys_assets.defs.configs derives the Dagster Config from these fields: one declaration)."""
    return dataclasses.field(default=default, metadata={"help": help})


class JsonConfig:
    """Mixin for the trainers' dataclass configs: JSON round trip (tuples as lists); unknown fields refused."""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
        return cls(**dict(d))

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))


def run_trainer(config: Any, config_cls: type, train: Any) -> Any:
    """What every trainer's public entry does: the config from a dict if needed, torch threads, the process group
    (destroyed at the end if created here), then ``train(config, env, t_start)``."""
    if not isinstance(config, config_cls):
        config = config_cls.from_dict(config)
    t_start = time.time()
    if config.num_threads:
        torch.set_num_threads(int(config.num_threads))
    env = init_distributed(config.use_gpu, single_node=config.single_node)
    try:
        return train(config, env, t_start)
    finally:
        shutdown_distributed(env)


# What a torchrun run prints of its result (both trainers' results have these fields).
CLI_SUMMARY_FIELDS = ("best_epoch", "final_metrics", "samples_per_second", "world_size", "total_seconds")


def trainer_cli(argv: Sequence[str] | None, *, description: str, config_cls: type, train: Any) -> int:
    """``--config cfg.json [--result out.pt]`` under torchrun: rank 0 writes the result with torch.save and prints
    the result's CLI_SUMMARY_FIELDS as one JSON line."""
    import argparse
    import logging

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help=f"JSON file of {config_cls.__name__} fields")
    parser.add_argument("--result", default=None, help="where rank 0 writes the result (torch.save)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("recsys_assets").setLevel(logging.INFO)
    result = train(config_cls.from_json(Path(args.config).read_text()))
    if int(os.environ.get("RANK", "0")) == 0:
        if args.result:
            Path(args.result).parent.mkdir(parents=True, exist_ok=True)
            torch.save(result, args.result)
        summary = {k: getattr(result, k) for k in CLI_SUMMARY_FIELDS}
        print(json.dumps(summary, default=_json_default), flush=True)
    return 0


# --------------------------------------------------------------------------------------------- process group
@dataclasses.dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str
    owns_process_group: bool  # False when the caller had already initialized one
    env_added: tuple[str, ...] = ()  # environment variables init_distributed set (removed by shutdown)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed(use_gpu: bool = False, *, single_node: bool = False, timeout_s: float = 1800.0) -> DistEnv:
    """Initialize (or join) the default process group from RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT /
    LOCAL_RANK / LOCAL_WORLD_SIZE. Without RANK in the environment: a one-process group on localhost.

    single_node: all ranks run on this machine although the launcher says otherwise (TorchDistributor with
        local_mode=False on one host runs one torchrun per Spark task, so each sees LOCAL_WORLD_SIZE=1 and
        Mosaic Streaming's per-node shared memory collides); sets LOCAL_RANK=RANK, LOCAL_WORLD_SIZE=WORLD_SIZE.
    """
    before = set(os.environ)
    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0",
            WORLD_SIZE="1",
            LOCAL_RANK="0",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR=os.environ.get("MASTER_ADDR") or "127.0.0.1",
            MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()),
        )
    if single_node:
        os.environ["LOCAL_RANK"] = os.environ["RANK"]
        os.environ["LOCAL_WORLD_SIZE"] = os.environ["WORLD_SIZE"]
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(local_world))

    if use_gpu:
        if not torch.cuda.is_available():
            raise RuntimeError("use_gpu=True but CUDA is not available")
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"

    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend=backend, timeout=_dt.timedelta(seconds=timeout_s))
    else:
        if dist.get_rank() != rank or dist.get_world_size() != world:
            raise RuntimeError("an existing process group disagrees with RANK / WORLD_SIZE")
    added = tuple(sorted(set(os.environ) - before))
    return DistEnv(rank, world, local_rank, local_world, device, dist.get_backend(), owns, added)


def shutdown_distributed(env: DistEnv) -> None:
    """Destroy the process group if `init_distributed` created it; drop the variables it added."""
    if env.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()
    for key in env.env_added:
        os.environ.pop(key, None)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


# Spaces the per-rank seeds of one run seed apart: a prime larger than any world size, so (seed, rank) pairs of
# nearby seeds never share a generator seed.
RANK_SEED_STRIDE = 1_000_003


def rank_generator(seed: int, rank: int) -> torch.Generator:
    """A torch.Generator of its own for `rank` (e.g. sampled negatives that differ between ranks)."""
    return torch.Generator().manual_seed(seed * RANK_SEED_STRIDE + rank)


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of rank's contiguous part of range(n); parts differ in size by at most one."""
    per, extra = divmod(n, world_size)
    start = rank * per + min(rank, extra)
    return start, start + per + (1 if rank < extra else 0)


# ------------------------------------------------------------------------------------------------- sharding
def sharding_constraints(
    tables: Iterable[Any], sharding_types: Sequence[str], min_partition: int | None = None
) -> dict[str, Any]:
    """ParameterConstraints allowing only `sharding_types` (ShardingType values) for every table;
    `min_partition` bounds column-wise shard widths from below (smaller -> more column shards)."""
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.distributed.types import ShardingType

    allowed = [ShardingType(s).value for s in sharding_types]  # validates the names
    return {t.name: ParameterConstraints(sharding_types=list(allowed), min_partition=min_partition) for t in tables}


@dataclasses.dataclass
class ShardedModel:
    dmp: nn.Module  # DistributedModelParallel
    plan: Any  # ShardingPlan
    plan_text: str
    sharders: list


def shard_model(
    model: nn.Module,
    embedding_modules: Sequence[nn.Module],
    tables: Sequence[Any],
    env: DistEnv,
    *,
    sparse_optimizer: str = "row_wise_adagrad",
    sparse_lr: float = 0.05,
    sparse_eps: float = 1e-8,
    sharding_types: Sequence[str] | None = None,
    min_partition: int | None = None,
) -> ShardedModel:
    """Collective. Fuse `sparse_optimizer` into the backward of `embedding_modules` (EmbeddingBagCollections,
    tables on the meta device), plan, and wrap `model` in DistributedModelParallel with the plan.

    sparse_optimizer: "row_wise_adagrad" | "adagrad" | "sgd" (the fused optimizers that run on CPU).
    sharding_types: allowed ShardingType values per table; default table_wise/column_wise on CPU (the only
        ones that run there), a broader set on GPU.
    """
    from torch.distributed.optim import _apply_optimizer_in_backward
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    optimizers = {
        "row_wise_adagrad": (RowWiseAdagrad, {"lr": sparse_lr, "eps": sparse_eps}),
        "adagrad": (torch.optim.Adagrad, {"lr": sparse_lr, "eps": sparse_eps}),
        "sgd": (torch.optim.SGD, {"lr": sparse_lr}),
    }
    if sparse_optimizer not in optimizers:
        raise ValueError(f"unknown sparse_optimizer {sparse_optimizer!r}; expected one of {sorted(optimizers)}")
    opt_cls, opt_kwargs = optimizers[sparse_optimizer]
    for module in embedding_modules:
        _apply_optimizer_in_backward(opt_cls, module.parameters(), opt_kwargs)

    if sharding_types is None:
        sharding_types = GPU_SHARDING_TYPES if env.device.type == "cuda" else CPU_SHARDING_TYPES
    sharders = [EmbeddingBagCollectionSharder()]
    planner = EmbeddingShardingPlanner(
        topology=Topology(
            world_size=env.world_size,
            local_world_size=env.local_world_size,
            compute_device=env.device.type,
        ),
        constraints=sharding_constraints(tables, sharding_types, min_partition),
    )
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(module=model, device=env.device, plan=plan, sharders=sharders)
    return ShardedModel(dmp=dmp, plan=plan, plan_text=str(plan), sharders=sharders)


def shard_for_training(
    model: nn.Module,
    embedding_modules: Sequence[nn.Module],
    tables: Sequence[Any],
    env: DistEnv,
    config: Any,
    min_partition: int | None = None,
) -> tuple[ShardedModel, Any]:
    """Collective. `shard_model` + `make_optimizer` with a trainer config's optimizer and sharding fields."""
    sharded = shard_model(
        model,
        embedding_modules,
        tables,
        env,
        sparse_optimizer=config.sparse_optimizer,
        sparse_lr=config.sparse_lr,
        sharding_types=config.sharding_types,
        min_partition=min_partition,
    )
    if env.is_main:
        log.info("sharding plan:\n%s", sharded.plan_text)
    return sharded, make_optimizer(sharded.dmp, config.dense_lr, config.weight_decay)


def make_optimizer(dmp: nn.Module, dense_lr: float, weight_decay: float = 0.0):
    """CombinedOptimizer of the DMP's fused (in-backward) optimizer and Adam over the dense parameters.
    Call `.zero_grad()` / `.step()` each step; the fused part updates during backward."""
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    dense = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    dense = {k: p for k, p in dense.items() if p.requires_grad}
    dense_opt = KeyedOptimizerWrapper(
        dense, lambda params: torch.optim.Adam(params, lr=dense_lr, weight_decay=weight_decay)
    )
    return CombinedOptimizer([dmp.fused_optimizer, dense_opt])


# ------------------------------------------------------------------------------------------- state dicts
def _is_sharded(v: Any) -> bool:
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    return isinstance(v, ShardedTensor)


def _is_dtensor(v: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(v, DTensor)


def gather_state_dict(state_dict: Mapping[str, Any], env: DistEnv, dst: int = 0) -> dict[str, torch.Tensor] | None:
    """Collective. The unsharded CPU state dict on rank `dst` (None elsewhere), keys in state-dict order.

    ShardedTensors are gathered with ShardedTensor.gather on every rank; DTensors with
    full_tensor(); plain tensors (replicated dense parameters and buffers) are taken as they are.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if _is_sharded(value):
            buf = torch.empty(tuple(value.size()), dtype=value.dtype, device=env.device) if env.rank == dst else None
            value.gather(dst=dst, out=buf)
            if env.rank == dst:
                out[key] = buf.detach().cpu()
        elif _is_dtensor(value):
            full = value.full_tensor()
            if env.rank == dst:
                out[key] = full.detach().cpu()
        elif isinstance(value, torch.Tensor):
            if env.rank == dst:
                out[key] = value.detach().cpu().clone()
        # other entries (extra state) are skipped
    return out if env.rank == dst else None


def snapshot_local_state(module: nn.Module) -> dict[str, Any]:
    """A local copy of this rank's part of the model state (shards of sharded tensors, full dense tensors).
    Not collective; restore with `restore_local_state` on the same sharding."""
    snap: dict[str, Any] = {}
    for key, value in module.state_dict().items():
        if _is_sharded(value):
            snap[key] = [s.tensor.detach().clone() for s in value.local_shards()]
        elif _is_dtensor(value):
            snap[key] = value.to_local().detach().clone()
        elif isinstance(value, torch.Tensor):
            snap[key] = value.detach().clone()
    return snap


def restore_local_state(module: nn.Module, snapshot: Mapping[str, Any]) -> None:
    """Write a `snapshot_local_state` back into the (same) sharded model."""
    state = module.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            if key not in snapshot:
                continue
            saved = snapshot[key]
            if _is_sharded(value):
                for shard, t in zip(value.local_shards(), saved, strict=True):
                    shard.tensor.copy_(t)
            elif _is_dtensor(value):
                value.to_local().copy_(saved)
            elif isinstance(value, torch.Tensor):
                value.copy_(saved)
    module.load_state_dict(state)


# ------------------------------------------------------------------------------------------ collectives
def broadcast_object(obj: Any, env: DistEnv, src: int = 0) -> Any:
    """Collective. `obj` of rank `src` on every rank (pickled; tensors travel as CPU tensors)."""
    if env.world_size == 1:
        return obj
    box = [obj if env.rank == src else None]
    dist.broadcast_object_list(box, src=src, device=env.device if env.backend == "nccl" else None)
    return box[0]


def all_gather_object(obj: Any, env: DistEnv) -> list[Any]:
    """Collective. [obj of rank 0, obj of rank 1, ...] on every rank."""
    if env.world_size == 1:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def all_gather_variable(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Collective. Concatenation (in rank order) of every rank's `t` (same trailing dims, any first dim)."""
    if env.world_size == 1:
        return t
    n = torch.tensor([t.shape[0]], dtype=torch.long, device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(env.world_size)]
    dist.all_gather(sizes, n)
    sizes_i = [int(s.item()) for s in sizes]
    m = max(sizes_i)
    padded = torch.zeros((m, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    bufs = [torch.zeros_like(padded) for _ in range(env.world_size)]
    dist.all_gather(bufs, padded)
    return torch.cat([b[:s] for b, s in zip(bufs, sizes_i)])


def all_reduce_sum(values: Sequence[float], env: DistEnv) -> list[float]:
    """Collective. Element-wise sum over ranks (float64)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=env.device)
    if env.world_size > 1:
        dist.all_reduce(t)
    return [float(x) for x in t.cpu()]


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --------------------------------------------------------------------------------------------- streaming
def block_loader(
    folders: Sequence[str | Path],
    needed: Sequence[Any],
    batch_size: int,
    env: DistEnv,
    *,
    seed: int,
    shuffle: bool = True,
    num_workers: int = 0,
    epoch_size: int | None = None,
    remotes: Sequence[str] | None = None,
):
    """A BlockBatchLoader (training/block_loader.py) over MDS block folders (one Stream each): `needed` columns
    (data.blocks.BlockColumn) are checked against the folders' layout first. Each iteration is one epoch.

    remotes: one remote MDS folder per entry of `folders` (s3://, gs://, dbfs:/, file://); `folders` are then
        the local cache folders Streaming downloads shards into (one per node, never shared by two open
        datasets).
    epoch_size: rows per epoch over all ranks (None: every row).

    Call `prepare_streaming()` on every rank before this (it has a barrier).
    """
    from recsys_assets.training.block_loader import open_loader

    return open_loader(
        folders,
        needed,
        batch_size,
        seed=seed,
        remotes=remotes,
        shuffle=shuffle,
        rank=env.rank,
        world_size=env.world_size,
        num_workers=num_workers,
        pin_memory=env.device.type == "cuda",
        epoch_rows=epoch_size,
    )


def default_mds_cache_dir(remote: str) -> Path:
    """A local cache folder for a remote MDS root: one per remote (and user) in the system temp folder, so
    the ranks of one node share it and two remotes never mix shards."""
    import getpass
    import hashlib
    import tempfile

    digest = hashlib.sha1(remote.rstrip("/").encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"recsys-mds-cache-{getpass.getuser()}" / digest


def prepare_streaming() -> None:
    """Collective (barrier inside): remove Streaming shared memory left by dead processes."""
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()


# ----------------------------------------------------------------------------------------------- reporting
def mlflow_key(name: str) -> str:
    """MLflow metric names may not contain '@': hr@10 -> hr_at_10."""
    return name.replace("@", "_at_")


class ProgressReporter:
    """Rank 0 only (others no-op): per-epoch metrics to MLflow (an existing run, via MlflowClient.log_metric)
    and/or one JSON object per line appended to `progress_file`."""

    def __init__(
        self,
        env: DistEnv,
        *,
        mlflow_tracking_uri: str | None = None,
        mlflow_run_id: str | None = None,
        progress_file: str | None = None,
        mlflow_prefix: str = "",
    ) -> None:
        self.active = env.is_main
        self.progress_file = Path(progress_file) if progress_file else None
        self.prefix = mlflow_prefix
        self.client = None
        self.run_id = mlflow_run_id
        if self.active and mlflow_tracking_uri and mlflow_run_id:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=mlflow_tracking_uri)
        if self.active and self.progress_file is not None:
            self.progress_file.parent.mkdir(parents=True, exist_ok=True)

    def event(self, record: Mapping[str, Any]) -> None:
        """Append one JSON line (rank 0, if a progress file is set)."""
        if not self.active or self.progress_file is None:
            return
        line = json.dumps({"time": time.time(), **record}, default=_json_default, sort_keys=True)
        with open(self.progress_file, "a") as f:
            f.write(line + "\n")
            f.flush()

    def log_epoch(self, epoch: int, metrics: Mapping[str, float], **extra: Any) -> None:
        if not self.active:
            return
        if self.client is not None:
            ts = int(time.time() * 1000)
            for k, v in metrics.items():
                if v is None or not np.isfinite(v):
                    continue
                self.client.log_metric(self.run_id, self.prefix + mlflow_key(k), float(v), timestamp=ts, step=epoch)
        self.event({"event": "epoch", "epoch": epoch, "metrics": dict(metrics), **extra})


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o)}")
