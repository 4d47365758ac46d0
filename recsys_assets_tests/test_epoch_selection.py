"""Best-epoch selection of the training loop (training.loop.Selection): the early-stopping signal, its window
and patience, on planted metric series (no training: the loop's selection step alone)."""

import pytest

from recsys_assets.training.loop import Selection, replay_selection

METRIC = "validation_ndcg@10"
# a one-epoch spike at epoch 1, then a real rise that peaks at epochs 3-5, then a fall
SPIKY = [0.10, 0.30, 0.12, 0.22, 0.24, 0.23, 0.10, 0.10, 0.10, 0.10]


def select(values, *, window: int, patience: int = 3) -> tuple[int, int]:
    """(best epoch, last epoch run) of the loop's selection over `values`, one per epoch."""
    best, run = replay_selection(values, Selection(METRIC, patience=patience, window=window, restore_best=False))
    return best, run - 1


def test_one_epoch_signal_takes_the_spike_and_stops_early():
    # the spike is the best; three epochs below it exhaust the patience before the real peak is seen whole
    assert select(SPIKY, window=1) == (1, 4)


def test_trailing_mean_signal_selects_the_sustained_peak():
    # trailing means: .10 .20 .173 .213 .193 .23 .19 .143 .10: the best is epoch 5, and epochs 6-8 end the run
    assert select(SPIKY, window=3) == (5, 8)


def test_the_mean_covers_the_epochs_there_are():
    # epoch 0 is its own mean, epoch 1 the mean of two: a rising series is selected at its last epoch either way
    assert select([0.1, 0.2, 0.3], window=3) == (2, 2)
    assert select([0.3, 0.2, 0.1, 0.1], window=3, patience=3) == (0, 3)


def test_window_and_patience_must_be_positive():
    with pytest.raises(ValueError, match="window and patience must be >= 1"):
        Selection(METRIC, window=0)
    with pytest.raises(ValueError, match="window and patience must be >= 1"):
        Selection(METRIC, patience=0)


def test_replaying_needs_no_weights():
    with pytest.raises(ValueError, match="restore_best=False"):
        replay_selection([0.1], Selection(METRIC))
