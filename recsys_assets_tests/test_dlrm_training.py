"""The DLRM trainer alone (one gloo process, in this process): learning a planted signal, id handling in the
KJT, and epoch checkpoints with resume. The 2-process path runs in test_funnel.py through TorchDistributor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

LAYOUT = (
    {"name": "user", "table": "user", "num_embeddings": 40},
    {"name": "item", "table": "item", "num_embeddings": 60},
    {"name": "history", "table": "item", "num_embeddings": 60, "multi_valued": True},
)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """Label = item is even XOR dense[0] > 1: learnable from the item table and the dense part together."""
    from recsys_assets.data.blocks import BlockLayout, write_blocks

    root = tmp_path_factory.mktemp("dlrm_pairs")
    rng = np.random.default_rng(0)
    n = 3000
    user, item = rng.integers(0, 40, n), rng.integers(0, 60, n)
    item[:50] = 0  # id 0 is a real id
    hist = np.full((n, 5), -1, dtype=np.int32)
    for i in range(n):
        k = rng.integers(0, 6)
        hist[i, :k] = rng.integers(0, 60, k)
    dense = rng.normal(size=(n, 3)).astype(np.float32)
    label = ((item % 2 == 0) ^ (dense[:, 0] > 1)).astype(np.float32)
    cut = 2400
    write_blocks(
        root / "train",
        {"label": label[:cut], "dense": dense[:cut], "user": user[:cut], "item": item[:cut], "history": hist[:cut]},
        BlockLayout.of(
            {
                "label": ("float32", 0),
                "dense": ("float32", 3),
                "user": ("int32", 0),
                "item": ("int32", 0),
                "history": ("int32", 5),
            }
        ),
    )
    pd.DataFrame(
        {
            "label": label[cut:],
            "dense": list(dense[cut:]),
            "user": user[cut:],
            "item": item[cut:],
            "history": [h[h >= 0].tolist() for h in hist[cut:]],
            "query_id": np.arange(n - cut) // 10,
        }
    ).to_parquet(root / "validation.parquet")
    return root


def _config(pairs: Path, **kw):
    from recsys_assets.training.dlrm import DLRMTrainConfig

    settings = dict(
        train_mds=(str(pairs / "train"),),
        layout=LAYOUT,
        dense_in_features=3,
        eval_sets={"validation": str(pairs / "validation.parquet")},
        selection_set="validation",
        early_stopping_metric="auroc",
        epochs=4,
        patience=4,
        embedding_dim=8,
        bottom_layer_sizes=(16, 8),
        dense_lr=3e-3,
        sparse_lr=0.05,
        batch_size=256,
        ks=(1, 3),
    )
    settings.update(kw)
    return DLRMTrainConfig(**settings)


def test_dlrm_learns_a_planted_signal_and_reloads(pairs):
    from recsys_assets.training.dlrm import train_dlrm

    result = train_dlrm(_config(pairs))
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.final_metrics["validation"]["auroc"] > 0.75
    model = result.load_model()
    # the reloaded unsharded model scores the validation pairs as the sharded one did
    from recsys_assets.data.pairs import load_pair_set
    from recsys_assets.models.dlrm import DLRMScorer, layout_from_dicts

    layout = layout_from_dicts(LAYOUT)
    data = load_pair_set(pairs / "validation.parquet", layout, 3)
    scores = DLRMScorer(model, layout, _model_config(result)).forward(data.rows(0, data.n))
    np.testing.assert_allclose(scores.numpy(), result.eval_scores["validation"], rtol=1e-4, atol=1e-4)


def _model_config(result):
    from recsys_assets.models.dlrm import DLRMModelConfig

    return DLRMModelConfig.from_dict(result.model_config)


def test_kjt_keeps_id_zero_and_refuses_ids_beyond_the_table():
    from recsys_assets.models.dlrm import batch_to_kjt, layout_from_dicts

    layout = layout_from_dicts(LAYOUT)
    batch = {
        "user": torch.tensor([0, 1]),
        "item": torch.tensor([0, 0]),
        "history": torch.tensor([[0, -1, -1], [3, 0, -1]], dtype=torch.int32),
    }
    kjt = batch_to_kjt(batch, layout).to_dict()
    assert kjt["item"].values().tolist() == [0, 0]
    assert kjt["history"].values().tolist() == [0, 3, 0] and kjt["history"].lengths().tolist() == [1, 2]
    with pytest.raises(ValueError, match="item.*id 60.*only 60 rows"):
        batch_to_kjt({**batch, "item": torch.tensor([0, 60])}, layout)


def test_resume_continues_after_the_last_checkpointed_epoch(pairs, tmp_path):
    from recsys_assets.training.dlrm import train_dlrm

    ckpt = tmp_path / "ckpt"
    first = train_dlrm(_config(pairs, epochs=2, checkpoint_dir=str(ckpt)))
    steps_two_epochs = sum(h["steps"] for h in first.history)
    assert first.resumed_from_step is None
    assert (ckpt / "latest").read_text().strip() == f"step-{steps_two_epochs:09d}"
    resumed = train_dlrm(_config(pairs, epochs=3, checkpoint_dir=str(ckpt)))
    assert resumed.resumed_from_step == steps_two_epochs
    assert len(resumed.history) == 3
    assert [h["loss"] for h in resumed.history[:2]] == [h["loss"] for h in first.history]
    assert resumed.history[2]["steps"] == first.history[1]["steps"]  # a whole new epoch, not a partial one
    # a fresh run of 3 epochs on the same seed ends at the same quality (within noise)
    fresh = train_dlrm(_config(pairs, epochs=3))
    assert abs(fresh.final_metrics["validation"]["auroc"] - resumed.final_metrics["validation"]["auroc"]) < 0.05


def test_explicit_resume_without_checkpoint_is_refused(pairs, tmp_path):
    from recsys_assets.training.checkpoint import CheckpointNotFoundError
    from recsys_assets.training.dlrm import train_dlrm

    with pytest.raises(CheckpointNotFoundError, match=str(tmp_path / "none")):
        train_dlrm(_config(pairs, checkpoint_dir=str(tmp_path / "none"), resume=True))


def test_the_test_set_is_never_scored_between_epochs(pairs):
    """ "test" cannot be an eval set (scored each epoch, selectable); as a final set it is scored once, at the end:
    the per-epoch report names only the sets selection may see."""
    from recsys_assets.training.dlrm import train_dlrm

    with pytest.raises(ValueError, match="final_sets"):
        _config(pairs, eval_sets={"test": str(pairs / "validation.parquet")}, selection_set="test")
    result = train_dlrm(_config(pairs, epochs=2, final_sets={"test": str(pairs / "validation.parquet")}))
    assert all(set(h["metrics"]) == {"validation"} for h in result.history)
    assert set(result.final_metrics) == {"validation", "test"} and set(result.eval_scores) == {"validation", "test"}


def test_a_trial_without_final_sets_scored_afterwards_equals_the_fit_that_scores_them(pairs):
    """What lets the dlrm_model fit reuse its search trial: the same settings trained without the test set, then
    scored on it by `score_final_sets`, give the fit's weights, metrics and test scores."""
    from recsys_assets.training.dlrm import score_final_sets, train_dlrm

    final = {"test": str(pairs / "validation.parquet")}
    fit = train_dlrm(_config(pairs, epochs=2, final_sets=final))
    trial = train_dlrm(_config(pairs, epochs=2))
    assert set(trial.final_metrics) == {"validation"}
    completed = score_final_sets(trial, _config(pairs, epochs=2, final_sets=final))
    assert [h["loss"] for h in completed.history] == [h["loss"] for h in fit.history]
    assert set(completed.final_metrics) == {"validation", "test"}
    np.testing.assert_allclose(completed.eval_scores["test"], fit.eval_scores["test"], rtol=1e-4, atol=1e-4)
    for metric, value in fit.final_metrics["test"].items():
        assert completed.final_metrics["test"][metric] == pytest.approx(value, abs=1e-4), metric
    assert completed.config["final_sets"] == final


def test_training_pairs_in_another_layout_are_refused_before_training(pairs):
    """dense_in_features=4 against blocks of 3-wide dense vectors: refused before any model is built, naming
    the folder and both widths."""
    from recsys_assets.data.blocks import LayoutMismatchError
    from recsys_assets.training.dlrm import train_dlrm

    with pytest.raises(LayoutMismatchError, match=r"dense: float32\[4\] \(found dense: float32\[3\]\)") as err:
        train_dlrm(_config(pairs, dense_in_features=4))
    assert str(pairs / "train") in str(err.value)
