"""Tests of the SASRec reference baseline (recsys_assets.evaluation.sasrec)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from recsys_assets.defs.evaluation_assets import EvaluationConfig
from recsys_assets.evaluation import EvalTask, evaluate, leave_last_out_splits
from recsys_assets.evaluation.baselines import MostPopular, tune
from recsys_assets.evaluation.sasrec import SASRec

N_USERS, N_ITEMS, PER_USER = 200, 30, 10
TINY = {"hidden": 32, "blocks": 1, "max_len": 12, "dropout": 0.1, "lr": 5e-3, "batch_size": 32}


def _planted_runs(seed: int = 0) -> pd.DataFrame:
    """Every user's sequence is a run of consecutive items (mod N_ITEMS) from a random start: the next item
    is always the last one + 1, while every item is about as popular as any other."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(N_USERS):
        start = int(rng.integers(N_ITEMS))
        rows += [(user, (start + step) % N_ITEMS, step) for step in range(PER_USER)]
    return leave_last_out_splits(pd.DataFrame(rows, columns=["user", "item", "timestamp"]))


def test_sasrec_learns_a_planted_sequence_most_popular_does_not() -> None:
    splits = _planted_runs()
    tuned = tune(lambda **p: SASRec(**TINY, **p), {"epochs": [30]}, splits, ks=(1, 3, 10))
    assert tuned.validation["hr@1"] >= 0.9
    assert tuned.test["hr@1"] >= 0.9

    task = EvalTask.from_splits(splits, "test")
    popular = evaluate(MostPopular().fit(task).score, task, ks=(1, 3, 10))
    assert popular["hr@1"] <= 0.2

    # seeded: the same settings give the same scores; score rows follow the requested users
    users = np.array([5, 0, 17])
    first = SASRec(**TINY, epochs=3).fit(task)
    again = SASRec(**TINY, epochs=3).fit(task)
    torch.testing.assert_close(first.score(users), again.score(users), rtol=0, atol=0)
    assert first.score(users).shape == (3, N_ITEMS)
    torch.testing.assert_close(first.score(users)[1], first.score(np.array([0]))[0])


def test_sasrec_is_off_in_the_evaluation_config_by_default() -> None:
    assert EvaluationConfig().sasrec is False
