"""Resumable distributed checkpoints for the TorchRec trainers (Two Tower, DLRM): no Dagster / Spark here.

One checkpoint is a folder ``<root>/step-<global step, 9 digits>/``:

- the sharded model and optimizer state, written by ``torch.distributed.checkpoint`` (each rank writes its own
  shards: ``__<rank>_0.distcp`` + ``.metadata``); it loads into any world size (2 -> 1, 1 -> 2: DCP reshards);
- ``rank_<r>.pt`` per rank: the rank's ``BlockBatchLoader.state_dict()`` (taken mid-epoch, or pointing at
  the start of the next epoch for an end-of-epoch checkpoint) and its RNG states (python, numpy, torch and any
  named torch.Generator the trainer passes);
- ``trainer_state.json`` (rank 0): whatever the trainer needs to continue (epoch, step, best metric, history,
  ...), plus ``pinned``: names of older checkpoints that must survive pruning (e.g. the best epoch's weights).

Atomic: every rank writes into ``<root>/.tmp-step-<n>`` and rank 0 renames it to ``step-<n>`` once all ranks
are done, then rewrites the ``latest`` pointer (a text file holding the folder name, replaced with os.replace)
and deletes all but the newest ``keep`` checkpoints (pinned ones stay). A launch that dies while saving leaves
only a ``.tmp-`` folder, which the next save of that step replaces and `latest()` never returns.

Multi-node training needs ``root`` on a filesystem every node sees (the ranks write into the same folder).

Usage (collective calls on every rank, in the same order)::

    manager = CheckpointManager(root, env, every_n_steps=100, keep=2)
    path = resolve_resume(root, resume)            # None: start fresh
    if path is not None:
        loaded = manager.load(path, model=dmp, optimizer=opt, loader=loader, generators={"neg": gen})
        state = loaded.trainer_state              # continue from state["step"], state["epoch"], ...
    ... for batch in loader: ...; step += 1
        if manager.due(step): manager.save(step, model=dmp, optimizer=opt, loader=loader, trainer_state=...)

Load the loader state BEFORE ``iter(loader)`` (the loader applies it at the next iteration).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
_NAME = re.compile(r"^step-(\d{9,})$")


class CheckpointNotFoundError(FileNotFoundError):
    """Resume was requested explicitly but there is no (complete) checkpoint at the given path."""


def checkpoint_name(step: int) -> str:
    return f"step-{int(step):09d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root` (renamed from their temp folder), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found) if (p / TRAINER_STATE).is_file()]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint the ``latest`` pointer names (if it is complete), else the newest complete one."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if (target / TRAINER_STATE).is_file():
            return target
    found = list_checkpoints(root)
    return found[-1] if found else None


def resolve_resume(root: str | Path | None, resume: bool | str) -> Path | None:
    """Which checkpoint to resume from.

    resume: False -> None (start fresh); "auto" -> the latest checkpoint under `root` if there is one, else
    None; True -> the latest checkpoint, and a `CheckpointNotFoundError` naming the path when `root` is
    missing or holds no complete checkpoint. `root` may also be one checkpoint folder itself.
    """
    if resume not in (True, False, "auto"):
        raise ValueError(f"resume must be True, False or 'auto', got {resume!r}")
    if not resume:
        return None
    if root is None:
        if resume is True:
            raise CheckpointNotFoundError("resume=True but no checkpoint_dir is set")
        return None
    root = Path(root)
    if (root / TRAINER_STATE).is_file() and _NAME.match(root.name):
        return root
    found = latest_checkpoint(root)
    if found is None and resume is True:
        what = (
            "does not exist" if not root.exists() else "holds no complete checkpoint (step-*/ with trainer_state.json)"
        )
        raise CheckpointNotFoundError(f"resume=True but the checkpoint folder {root} {what}")
    return found


def _rng_state(generators: Mapping[str, torch.Generator] | None) -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    state["generators"] = {k: g.get_state() for k, g in (generators or {}).items()}
    return state


def _set_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    for k, g in (generators or {}).items():
        if k in state.get("generators", {}):
            g.set_state(state["generators"][k])


def init_optimizer_state(optimizer: Any) -> None:
    """Materialize lazy optimizer state (Adam's moments) so that DCP can load into it in place.

    Without this the dense Adam keys are missing from ``optimizer.state_dict()`` and are silently never
    restored. Fused (in-backward) embedding optimizers already have their state.
    """
    from torchrec.optim.fused import FusedOptimizer
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer

    if isinstance(optimizer, CombinedOptimizer):
        for _, sub in optimizer.optimizers:
            init_optimizer_state(sub)
    elif isinstance(optimizer, KeyedOptimizer) and not isinstance(optimizer, FusedOptimizer):
        optimizer.init_state()  # a zero-gradient step (overwritten by the load that follows)
        optimizer.zero_grad(set_to_none=True)


@dataclasses.dataclass
class LoadedCheckpoint:
    path: Path
    step: int
    trainer_state: dict[str, Any]  # what rank 0 saved (identical on every rank)
    rank_state: dict[str, Any] | None  # this rank's extra state (None: saved by fewer ranks)
    loader_state: dict[str, Any] | None  # the loader state applied (own rank's, else rank 0's)
    saved_world_size: int


class CheckpointManager:
    """Saves and loads resumable checkpoints under `root` (see the module docstring).

    env: anything with ``rank``, ``world_size`` and ``is_main`` (distributed.DistEnv). every_n_steps: `due(step)`
    is True every that many global steps (0 = only where the trainer saves explicitly, e.g. at epoch ends).
    keep: complete checkpoints kept (the newest), besides pinned ones.
    """

    def __init__(self, root: str | Path, env: Any, *, every_n_steps: int = 0, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError("keep must be >= 1")
        if every_n_steps < 0:
            raise ValueError("every_n_steps must be >= 0")
        self.root = Path(root)
        self.env = env
        self.every_n_steps = int(every_n_steps)
        self.keep = int(keep)

    # ------------------------------------------------------------------------------------------ queries
    def due(self, step: int) -> bool:
        return self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root)

    def _barrier(self) -> None:
        if self.env.world_size > 1 and dist.is_initialized():
            dist.barrier()

    # --------------------------------------------------------------------------------------------- save
    def save(
        self,
        step: int,
        *,
        model: torch.nn.Module,
        optimizer: Any = None,
        loader: Any = None,
        loader_state: Mapping[str, Any] | None = None,
        trainer_state: Mapping[str, Any],
        rank_state: Mapping[str, Any] | None = None,
        generators: Mapping[str, torch.Generator] | None = None,
        pinned: Sequence[str] = (),
    ) -> Path:
        """Collective. Write checkpoint `step` atomically; returns its folder.

        loader: a BlockBatchLoader whose ``state_dict()`` is taken now (mid-epoch, collective), or pass `loader_state`
        directly (e.g. the start of the next epoch at an epoch end). trainer_state: JSON-able, rank 0's is kept.
        rank_state: per-rank extras (torch.save-able). pinned: checkpoint names pruning must keep.
        """
        import torch.distributed.checkpoint as dcp

        name = checkpoint_name(step)
        final = self.root / name
        tmp = self.root / f".tmp-{name}"
        if self.env.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)  # left by a launch that died while saving
            tmp.mkdir()
        self._barrier()
        state: dict[str, Any] = {"model": model.state_dict()}
        if optimizer is not None:
            state["optim"] = optimizer.state_dict()
        dcp.save(state, checkpoint_id=str(tmp))
        if loader_state is None and loader is not None:
            loader_state = loader.state_dict()
        torch.save(
            {
                "rank": self.env.rank,
                "world_size": self.env.world_size,
                "loader": dict(loader_state) if loader_state is not None else None,
                "rng": _rng_state(generators),
                "extra": dict(rank_state) if rank_state is not None else None,
            },
            tmp / f"rank_{self.env.rank}.pt",
        )
        self._barrier()  # every rank's files are in place
        if self.env.is_main:
            doc = {
                "step": int(step),
                "world_size": self.env.world_size,
                "pinned": [p for p in pinned if p != name],
                "trainer": dict(trainer_state),
            }
            (tmp / TRAINER_STATE).write_text(json.dumps(doc, indent=1, default=_json_default))
            if final.exists():  # the same step saved again (a relaunch that repeated it)
                shutil.rmtree(final)
            os.replace(tmp, final)
            pointer_tmp = self.root / f".{LATEST}.tmp"
            pointer_tmp.write_text(name + "\n")
            os.replace(pointer_tmp, self.root / LATEST)
            self._prune(keep_names={name, *doc["pinned"]})
        self._barrier()
        return final

    def _prune(self, keep_names: set[str]) -> None:
        found = list_checkpoints(self.root)
        newest = {p.name for p in found[-self.keep :]}
        for p in found:
            if p.name not in newest and p.name not in keep_names:
                shutil.rmtree(p, ignore_errors=True)
        for p in self.root.glob(".tmp-step-*"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)

    # --------------------------------------------------------------------------------------------- load
    def load(
        self,
        path: str | Path,
        *,
        model: torch.nn.Module,
        optimizer: Any = None,
        loader: Any = None,
        generators: Mapping[str, torch.Generator] | None = None,
        restore_rng: bool = True,
    ) -> LoadedCheckpoint:
        """Collective. Restore model (+ optimizer) in place from checkpoint `path`, apply this rank's loader
        state to `loader` (call before ``iter(loader)``) and its RNG states. Works for any world size: the
        sharded state is resharded by DCP; a rank that did not exist at save time takes rank 0's loader
        state (its sample position is global) and keeps its own RNG seeds."""
        import torch.distributed.checkpoint as dcp

        path = Path(path)
        meta_file = path / TRAINER_STATE
        if not meta_file.is_file():
            raise CheckpointNotFoundError(f"no complete checkpoint at {path} (missing {TRAINER_STATE})")
        doc = json.loads(meta_file.read_text())
        if optimizer is not None:
            init_optimizer_state(optimizer)
        state: dict[str, Any] = {"model": model.state_dict()}
        if optimizer is not None:
            state["optim"] = optimizer.state_dict()
        dcp.load(state, checkpoint_id=str(path))
        model.load_state_dict(state["model"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optim"])

        own = path / f"rank_{self.env.rank}.pt"
        rank_file = torch.load(own, weights_only=False) if own.is_file() else None
        loader_state = rank_file["loader"] if rank_file is not None else None
        if loader_state is None:
            first = path / "rank_0.pt"
            if first.is_file():
                loader_state = torch.load(first, weights_only=False)["loader"]
        if loader is not None and loader_state is not None:
            loader.load_state_dict(loader_state)
        if restore_rng and rank_file is not None:
            _set_rng_state(rank_file["rng"], generators)
        self._barrier()
        return LoadedCheckpoint(
            path=path,
            step=int(doc["step"]),
            trainer_state=doc["trainer"],
            rank_state=rank_file["extra"] if rank_file is not None else None,
            loader_state=loader_state,
            saved_world_size=int(doc["world_size"]),
        )

    def load_model(self, path: str | Path, model: torch.nn.Module) -> None:
        """Collective. Only the model weights of checkpoint `path` (e.g. the pinned best epoch's)."""
        import torch.distributed.checkpoint as dcp

        path = Path(path)
        if not (path / TRAINER_STATE).is_file():
            raise CheckpointNotFoundError(f"no complete checkpoint at {path} (missing {TRAINER_STATE})")
        state = {"model": model.state_dict()}
        dcp.load(state, checkpoint_id=str(path))
        model.load_state_dict(state["model"])


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serializable: {type(o)}")
