"""Test-only fault injection for the trainers: a loop callback that ends one rank abruptly at a global step.

Launchers that start fresh interpreters (TorchDistributor's torchrun) import this module by name, so its folder
must be on their PYTHONPATH (test_checkpoint_resume.py sets it).
"""

from __future__ import annotations

import os

from recsys_assets.training.loop import Callback

EXIT_CODE = 17  # any non-zero code: the rank ends without a Python error, as a killed process would


class ExitAtStep(Callback):
    """Rank `rank` leaves with os._exit (no exception, no cleanup) right after global step `step`."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_step(self, step, env) -> None:
        if env.rank == self.rank and step == self.step:
            print(f"[fault injection] rank {env.rank} exits at step {step}", flush=True)
            os._exit(EXIT_CODE)


def train_two_tower_exiting(config, rank: int, step: int):
    """`train_two_tower(config)` in which rank `rank` exits abruptly at global step `step`."""
    from recsys_assets.training.two_tower import train_two_tower

    return train_two_tower(config, callbacks=[ExitAtStep(rank, step)])
