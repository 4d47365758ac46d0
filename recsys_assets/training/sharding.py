"""Sharding the TorchRec models and their state: planner constraints, `shard_model` (fused in-backward sparse
optimizer, plan, DistributedModelParallel), `make_optimizer` (fused + Adam over the dense parameters),
`shard_for_training` (both from a trainer config), gathering the unsharded state dict and local snapshots of
this rank's shards (restored after a rejected epoch). Every function documented as "collective" must be called
on every rank, in the same order. No Dagster / Spark here.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from recsys_assets.training.distributed import DistEnv

CPU_SHARDING_TYPES = ("table_wise", "column_wise")
# Sharding types the planner may consider on CUDA (RW/TWRW need GPUs; data_parallel would ignore the
# in-backward optimizer).
GPU_SHARDING_TYPES = ("table_wise", "column_wise", "table_column_wise", "row_wise", "table_row_wise")

log = logging.getLogger(__name__)


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
    """Collective. Fuse `sparse_optimizer` into the backward of `embedding_modules` (EmbeddingBagCollections and
    EmbeddingCollections, tables on the meta device), plan, and wrap `model` in DistributedModelParallel with the
    plan.

    sparse_optimizer: "row_wise_adagrad" | "adagrad" | "sgd" (the fused optimizers that run on CPU).
    sharding_types: allowed ShardingType values per table; default table_wise/column_wise on CPU (the only
        ones that run there), a broader set on GPU.
    """
    from torch.distributed.optim import _apply_optimizer_in_backward
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
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
    sharders = [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]
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
        dense, lambda params: torch.optim.Adam(params, lr=dense_lr, weight_decay=weight_decay, fused=True)
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
        if _is_sharded(value) and env.world_size == 1:
            out[key] = _assembled_locally(value)
        elif _is_sharded(value):
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


def _assembled_locally(value) -> torch.Tensor:
    """A one-process ShardedTensor from its local shards, without a collective. ShardedTensor.gather's gloo
    gather copies the shards on gloo's worker thread; that starts a second OpenMP thread team, and from then on
    every parallel op of the process waits on futexes: later fits in the same process ran 1.6x slower per epoch."""
    full = torch.empty(tuple(value.size()), dtype=value.dtype)
    for shard in value.local_shards():
        at = tuple(slice(o, o + n) for o, n in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes))
        full[at] = shard.tensor.detach().cpu()
    return full


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
