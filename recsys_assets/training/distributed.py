"""The process group and collectives shared by the TorchRec trainers: `DistEnv` and `init_distributed` /
`shutdown_distributed` (from the torchrun environment, or a one-process group on localhost), seeding
(`seed_everything`, per-rank generators), `shard_bounds` (a rank's contiguous part of a range) and object /
tensor collectives (broadcast, all-gather, all-reduce). Every function documented as "collective" must be
called on every rank, in the same order. No Dagster / Spark here.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import random
import socket
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


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
