"""The one training loop of the TorchRec trainers (Two Tower, DLRM): epochs, early stopping, the best epoch's
weights, checkpoints, resume and per-epoch reports. A model supplies only `TrainerHooks`.

    loop = TrainingLoop(LoopSettings.from_config(config, name="dlrm", phase="validation", ...), env, hooks,
                        sharded=sharded, optimizer=optimizer, loader=loader)
    out = loop.run()                               # LoopResult; collective, on every rank
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from recsys_assets.training import checkpoint, distributed, reporting, sharding
from recsys_assets.training.distributed import DistEnv

# Global sums of an epoch in progress: loss * samples, samples, steps, training seconds.
_NO_PARTIAL = (0.0, 0.0, 0.0, 0.0)
_MIN_SECONDS = 1e-9  # keeps the throughput finite when no training time was measured


class TrainerHooks:
    """What a model gives the loop. `train_step` runs the forward pass of one batch and returns
    (loss tensor, batch size); the loop zeroes the gradients, calls backward and steps the optimizer."""

    def train_step(self, batch: Any) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def evaluate(self) -> dict[str, Any]:
        """Collective. The metrics stored in the epoch's history record (identical on every rank)."""
        raise NotImplementedError

    def flat_metrics(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        """`evaluate()`'s metrics as reported names -> values (MLflow, progress file, the printed line)."""
        return dict(metrics)

    def on_load_checkpoint(self, trainer_state: Mapping[str, Any], path: Path) -> None:
        """After a resume loaded `path` into the model (collective): refuse an incompatible checkpoint here."""


class Callback:
    """Observes the loop on every rank (e.g. test fault injection); the default methods do nothing."""

    def on_step(self, step: int, env: DistEnv) -> None:
        """After global step `step` (and its checkpoint, if one was due)."""

    def on_epoch_end(self, epoch: int, record: Mapping[str, Any], env: DistEnv) -> None:
        """After epoch `epoch` was evaluated, reported and checkpointed."""


@dataclasses.dataclass(frozen=True)
class Selection:
    """Best-epoch selection on one reported metric (a key of `TrainerHooks.flat_metrics`)."""

    metric: str
    lower_is_better: bool = False
    patience: int = 3
    min_delta: float = 0.0
    early_stopping: bool = True  # stop after `patience` epochs without a gain of more than min_delta
    restore_best: bool = True  # return the best epoch's weights (else the last epoch's)
    # the signal is the metric's mean over the last `window` epochs: on a few hundred held-out rows one epoch's
    # value is noisy enough to stop a still-improving run or pick an epoch for its noise
    window: int = 1

    def __post_init__(self) -> None:
        if self.window < 1 or self.patience < 1:
            raise ValueError(f"window and patience must be >= 1, got {self.window} and {self.patience}")

    def score(self, value: float) -> float:
        return -value if self.lower_is_better else value


def replay_selection(values: Sequence[float], selection: Selection) -> tuple[int, int]:
    """(best epoch, epochs run) that `selection` gives a series of one metric, one value per epoch, through the
    loop's own selection step (no model: `restore_best` must be off). For tests and benchmarks of the rule."""
    if selection.restore_best:
        raise ValueError("replaying a selection keeps no weights: pass restore_best=False")
    loop = object.__new__(TrainingLoop)  # the selection step reads only these three attributes
    loop.settings = LoopSettings(name="replay", epochs=len(values), phase="replay", selection=selection)
    loop.state = LoopState()
    loop.hooks = _ReplayHooks(selection.metric)
    for epoch, value in enumerate(values):
        loop.state.history.append({"epoch": epoch, "metrics": {selection.metric: value}})
        loop._select(epoch, {selection.metric: value})
        if loop._patience_exhausted():
            return loop.state.best_epoch, epoch + 1
    return loop.state.best_epoch, len(values)


@dataclasses.dataclass(frozen=True)
class _ReplayHooks:
    metric: str

    def flat_metrics(self, metrics: Mapping[str, float]) -> dict[str, float]:
        return {self.metric: metrics[self.metric]}


@dataclasses.dataclass
class LoopSettings:
    name: str  # prefix of the printed lines
    epochs: int
    phase: str  # reported with every epoch
    selection: Selection | None = None  # None: no selection, the last epoch is returned
    # False: no evaluation between epochs (a fixed-epoch fit whose held-out rows may be read only at the end)
    evaluate_each_epoch: bool = True
    checkpoint_dir: str | None = None
    checkpoint_every_n_steps: int = 0  # also checkpoint mid-epoch every N global steps (0: at epoch ends only)
    checkpoint_keep: int = 2
    resume_path: Path | None = None  # the checkpoint to continue from (checkpoint.resolve_resume)
    run_config: dict[str, Any] = dataclasses.field(default_factory=dict)  # saved with every checkpoint
    reporting: dict[str, Any] = dataclasses.field(default_factory=dict)  # reporting.ProgressReporter keywords

    def __post_init__(self) -> None:
        if self.selection is not None and not self.evaluate_each_epoch:
            raise ValueError("selecting an epoch needs an evaluation after each epoch")

    @classmethod
    def from_config(cls, config: Any, **fields: Any) -> LoopSettings:
        """The settings both trainer configs share (epochs, checkpoints, MLflow, progress file) + `fields`."""
        reporting = {
            k: getattr(config, k) for k in ("mlflow_tracking_uri", "mlflow_run_id", "progress_file", "mlflow_prefix")
        }
        return cls(
            epochs=config.epochs,
            checkpoint_dir=config.checkpoint_dir,
            checkpoint_keep=config.checkpoint_keep,
            run_config=config.to_dict(),
            reporting=reporting,
            **fields,
        )


@dataclasses.dataclass
class LoopState:
    """What a checkpoint keeps of the loop (its trainer_state.json; the global step is the checkpoint's)."""

    epoch: int = 0  # the epoch to run next (mid-epoch: the current one)
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    best_value: float | None = None  # Selection.score of the best epoch
    best_epoch: int = -1
    bad_epochs: int = 0
    best_checkpoint: str | None = None  # the checkpoint holding the best epoch's weights (pinned)
    stopped_early: bool = False
    train_seconds_total: float = 0.0
    samples_total: int = 0
    partial_epoch: tuple[float, ...] = _NO_PARTIAL  # see _NO_PARTIAL; set by a mid-epoch checkpoint
    world_size: int = 1
    config: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LoopState:
        known = {f.name for f in dataclasses.fields(cls)}
        state = cls(**{k: v for k, v in d.items() if k in known})
        state.history = list(state.history)
        state.partial_epoch = tuple(float(x) for x in state.partial_epoch)
        return state


@dataclasses.dataclass
class LoopResult:
    history: list[dict[str, Any]]  # one record per epoch: epoch, loss, metrics, samples, steps, seconds
    best_epoch: int  # the epoch whose weights the model holds now
    stopped_early: bool
    restored: bool  # the best epoch was not the last: its weights were put back
    samples_per_second: float  # global training throughput (evaluation excluded)
    global_steps: int
    resumed_from_step: int | None  # None: started fresh
    resumed_from: str | None


class TrainingLoop:
    """Runs `settings.epochs` epochs of `hooks` over `loader` (collective: every rank, same order)."""

    def __init__(
        self,
        settings: LoopSettings,
        env: DistEnv,
        hooks: TrainerHooks,
        *,
        sharded: sharding.ShardedModel,
        optimizer: Any,
        loader: Any,
        generators: Mapping[str, torch.Generator] | None = None,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        self.settings, self.env, self.hooks = settings, env, hooks
        self.sharded, self.model, self.optimizer, self.loader = sharded, sharded.dmp, optimizer, loader
        self.generators = dict(generators or {})
        self.callbacks = list(callbacks)
        self.reporter = reporting.ProgressReporter(env, **settings.reporting)
        self.state = LoopState(world_size=env.world_size, config=settings.run_config)
        self.global_step = 0
        self.resumed_from_step: int | None = None
        self._snapshot: dict[str, Any] | None = None  # this rank's part of the best epoch's weights
        self.manager = None
        if settings.checkpoint_dir:
            self.manager = checkpoint.CheckpointManager(
                settings.checkpoint_dir,
                env,
                every_n_steps=settings.checkpoint_every_n_steps,
                keep=settings.checkpoint_keep,
            )

    # ------------------------------------------------------------------------------------------------ run
    def run(self) -> LoopResult:
        """Collective. Resume if asked, train the epochs, put the best epoch's weights back."""
        self.reporter.event(
            {
                "event": "start",
                "world_size": self.env.world_size,
                "plan": self.sharded.plan_text,
                "config": self.settings.run_config,
            }
        )
        if self.settings.resume_path is not None:
            self._resume(self.settings.resume_path)
        try:
            for epoch in range(self.state.epoch, self.settings.epochs):
                if self.state.stopped_early or self._patience_exhausted():
                    break
                self._run_epoch(epoch)
        finally:
            self.loader = None  # releases the Streaming dataset before the final evaluation and gathers
        return self._finish()

    def _patience_exhausted(self) -> bool:
        sel = self.settings.selection
        return sel is not None and sel.early_stopping and self.state.bad_epochs >= sel.patience

    def _resume(self, path: Path) -> None:
        loaded = self.manager.load(
            path, model=self.model, optimizer=self.optimizer, loader=self.loader, generators=self.generators
        )
        self.state = LoopState.from_dict(loaded.trainer_state)
        self.global_step = self.resumed_from_step = int(loaded.step)
        self.hooks.on_load_checkpoint(loaded.trainer_state, path)
        self.state.world_size, self.state.config = self.env.world_size, self.settings.run_config
        if self.env.is_main:
            print(
                f"[{self.settings.name}] resumed from {path} (step {self.global_step}, epoch {self.state.epoch}, "
                f"saved by {loaded.saved_world_size} process(es))",
                flush=True,
            )
        self.reporter.event(
            {
                "event": "resume",
                "step": self.global_step,
                "epoch": self.state.epoch,
                "path": str(path),
                "saved_world_size": loaded.saved_world_size,
                "phase": self.settings.phase,
            }
        )

    # ---------------------------------------------------------------------------------------------- epoch
    def _run_epoch(self, epoch: int) -> None:
        train_s, (loss_sum, samples, steps) = self._train_epoch(epoch)
        self.state.train_seconds_total += train_s
        self.state.samples_total += int(samples)
        t1 = time.time()
        metrics = self.hooks.evaluate() if self.settings.evaluate_each_epoch else {}
        eval_s = time.time() - t1
        record = {
            "epoch": epoch,
            "loss": loss_sum / max(1.0, samples),
            "metrics": metrics,
            "samples": int(samples),
            "steps": int(steps),
            "train_seconds": train_s,
            "eval_seconds": eval_s,
        }
        self.state.history.append(record)
        flat = self.hooks.flat_metrics(metrics)
        improved = self._select(epoch, flat)
        self._report(record, flat, improved)
        if self._patience_exhausted():
            self.state.stopped_early = epoch < self.settings.epochs - 1
        self.state.epoch = epoch + 1
        if self.manager is not None:
            self._save(self.loader.state_dict(), _NO_PARTIAL)  # an exhausted epoch's state: the next one's start
        for cb in self.callbacks:
            cb.on_epoch_end(epoch, record, self.env)

    def _train_epoch(self, epoch: int) -> tuple[float, list[float]]:
        """One pass over the loader: (training seconds, global [loss * samples, samples, steps])."""
        self.model.train()
        t0 = time.time()
        partial, self.state.partial_epoch = self.state.partial_epoch, _NO_PARTIAL
        # a resumed mid-epoch: what it had done before (global sums: rank 0 adds them once)
        sums = [partial[0], partial[1], partial[2]] if self.env.is_main else [0.0, 0.0, 0.0]
        seconds_before = partial[3]
        for batch in self.loader:
            self.optimizer.zero_grad()
            loss, size = self.hooks.train_step(batch)
            loss.backward()
            self.optimizer.step()
            sums[0] += float(loss.detach()) * size
            sums[1] += size
            sums[2] += 1
            self.global_step += 1
            if self.manager is not None and self.manager.due(self.global_step):
                self._save_mid_epoch(epoch, sums, seconds_before + time.time() - t0)
            for cb in self.callbacks:
                cb.on_step(self.global_step, self.env)
        return seconds_before + time.time() - t0, distributed.all_reduce_sum(sums, self.env)

    def _select(self, epoch: int, flat: Mapping[str, float]) -> bool:
        """Track the best epoch (snapshot its weights if they are to be restored); True if this one is it."""
        sel, st = self.settings.selection, self.state
        if sel is None:
            return False
        score = sel.score(self._signal(flat))
        if st.best_epoch >= 0 and not score > st.best_value + sel.min_delta:
            st.bad_epochs += 1
            return False
        st.best_value, st.best_epoch, st.bad_epochs = score, epoch, 0
        if sel.restore_best:
            self._snapshot = sharding.snapshot_local_state(self.model)
            st.best_checkpoint = checkpoint.checkpoint_name(self.global_step) if self.manager is not None else None
        return True

    def _signal(self, flat: Mapping[str, float]) -> float:
        """The selection metric of this epoch (the last of `history`), averaged over the last `window` epochs."""
        sel = self.settings.selection
        earlier = [self.hooks.flat_metrics(h["metrics"])[sel.metric] for h in self.state.history[-sel.window : -1]]
        return sum([*earlier, flat[sel.metric]]) / (len(earlier) + 1)

    def _report(self, record: Mapping[str, Any], flat: Mapping[str, float], improved: bool) -> None:
        train_s, eval_s, loss = record["train_seconds"], record["eval_seconds"], record["loss"]
        self.reporter.log_epoch(
            record["epoch"],
            {"train_loss": loss, **flat, "epoch_seconds": train_s + eval_s},
            loss=loss,
            best_epoch=self.state.best_epoch,
            phase=self.settings.phase,
        )
        if self.env.is_main:
            shown = " ".join(f"{k}={v:.4f}" for k, v in flat.items())
            print(
                f"[{self.settings.name}] epoch {record['epoch']} loss {loss:.4f} {shown} "
                f"({train_s:.1f}s train, {eval_s:.1f}s eval){' *' if improved else ''}",
                flush=True,
            )

    # ---------------------------------------------------------------------------------------- checkpoints
    def _save_mid_epoch(self, epoch: int, local_sums: Sequence[float], seconds: float) -> None:
        lstate = self.loader.state_dict()  # collective
        sums = distributed.all_reduce_sum(local_sums, self.env)
        self.state.epoch = epoch
        self._save(lstate, (*sums, seconds))

    def _save(self, loader_state: Mapping[str, Any] | None, partial: Sequence[float]) -> None:
        state = dataclasses.replace(self.state, partial_epoch=tuple(float(x) for x in partial))
        best = self.state.best_checkpoint
        self.manager.save(
            self.global_step,
            model=self.model,
            optimizer=self.optimizer,
            loader_state=loader_state,
            trainer_state=dataclasses.asdict(state),
            generators=self.generators,
            pinned=[best] if best else [],
        )

    # --------------------------------------------------------------------------------------------- finish
    def _finish(self) -> LoopResult:
        st, sel = self.state, self.settings.selection
        if not st.history:
            raise RuntimeError("no epoch was trained (epochs=0 or a checkpoint without history)")
        last = st.history[-1]["epoch"]
        best_epoch = st.best_epoch if sel is not None and sel.restore_best else last
        if best_epoch != last:
            if self._snapshot is not None:
                sharding.restore_local_state(self.model, self._snapshot)
            elif self.manager is not None and st.best_checkpoint:  # the best epoch was before this launch resumed
                self.manager.load_model(Path(self.settings.checkpoint_dir) / st.best_checkpoint, self.model)
            else:
                raise RuntimeError(f"the weights of the best epoch {best_epoch} are not available to restore")
        self._snapshot = None
        path = self.settings.resume_path
        return LoopResult(
            history=st.history,
            best_epoch=best_epoch,
            stopped_early=st.stopped_early,
            restored=best_epoch != last,
            samples_per_second=st.samples_total / max(st.train_seconds_total, _MIN_SECONDS),
            global_steps=self.global_step,
            resumed_from_step=self.resumed_from_step,
            resumed_from=str(path) if path is not None else None,
        )

    def result_fields(self, out: LoopResult, t_start: float) -> dict[str, Any]:
        """Collective. The fields both trainers' results share; the unsharded `state_dict` only on rank 0."""
        state_dict = sharding.gather_state_dict(self.model.state_dict(), self.env)
        rss = distributed.all_gather_object(reporting.peak_rss_mb(), self.env)
        return dict(
            state_dict=state_dict,
            config=self.settings.run_config,
            history=out.history,
            best_epoch=out.best_epoch,
            stopped_early=out.stopped_early,
            plan_text=self.sharded.plan_text,
            samples_per_second=out.samples_per_second,
            world_size=self.env.world_size,
            peak_rss_mb=[float(x) for x in rss],
            total_seconds=time.time() - t_start,
            resumed_from_step=out.resumed_from_step,
        )

    def publish(self, result: Any) -> Any:
        """Collective. Rank 0 reports the end and broadcasts `result` (None elsewhere); every rank returns it."""
        if self.env.is_main:
            self.reporter.event(
                {
                    "event": "end",
                    "best_epoch": result.best_epoch,
                    "final_metrics": result.final_metrics,
                    "samples_per_second": result.samples_per_second,
                    "stopped_early": result.stopped_early,
                }
            )
        return distributed.broadcast_object(result, self.env)
