"""One declaration per setting: the model assets' Dagster configs are derived from the training configs, so
``torchrun -m recsys_assets.training.<model> --config cfg.json`` and the asset train the same model."""

import json

import pytest

from recsys_assets.defs.configs import DLRMConfig, TwoTowerConfig, exposed_fields, train_config
from recsys_assets.training.dlrm import DLRMTrainConfig
from recsys_assets.training.two_tower import TwoTowerTrainConfig

DLRM_RUN = dict(
    train_mds=["/data/pairs/mds/train"],
    layout=[{"name": "item", "table": "item", "num_embeddings": 5}],
    dense_in_features=3,
    eval_sets={"holdout": "/data/pairs/holdout.parquet"},
    selection_set="holdout",
)
TWO_TOWER_RUN = dict(data_root="/data/mds_splits")


@pytest.mark.parametrize(
    ("train_cls", "dagster_cls", "run"),
    [(DLRMTrainConfig, DLRMConfig, DLRM_RUN), (TwoTowerTrainConfig, TwoTowerConfig, TWO_TOWER_RUN)],
    ids=["dlrm", "two_tower"],
)
def test_asset_and_torchrun_train_the_same_model_from_the_defaults(train_cls, dagster_cls, run):
    # what `trainer_cli` reads from --config (only the run's paths given: every setting at its default)
    from_torchrun = train_cls.from_json(json.dumps(run))
    from_asset = train_config(train_cls, dagster_cls(), **run)
    assert from_asset.to_dict() == from_torchrun.to_dict()


def test_dlrm_defaults_are_the_chosen_ones():
    """The settings chosen on the validation lists (README), wherever the DLRM is trained from."""
    cfg = DLRMTrainConfig.from_dict(DLRM_RUN)
    assert (cfg.epochs, cfg.patience, cfg.batch_size) == (15, 4, 512)
    assert (cfg.sparse_lr, cfg.dense_lr, cfg.early_stopping_metric) == (0.002, 3e-3, "ndcg@10")
    assert DLRMConfig().epochs == 15 and DLRMConfig().early_stopping_metric == "ndcg@10"


@pytest.mark.parametrize(
    ("train_cls", "dagster_cls"), [(DLRMTrainConfig, DLRMConfig), (TwoTowerTrainConfig, TwoTowerConfig)]
)
def test_dagster_config_fields_are_the_training_settings(train_cls, dagster_cls):
    exposed = {f.name: f for f in exposed_fields(train_cls)}
    fields = dagster_cls.model_fields
    assert set(exposed) <= set(fields)
    for name, f in exposed.items():
        default = list(f.default) if isinstance(f.default, tuple) else f.default
        assert fields[name].default == default, name
        assert fields[name].description == f.metadata["help"], name


def test_a_bad_setting_is_refused_by_the_one_validator():
    with pytest.raises(ValueError, match="batch_size, epochs and patience must be positive"):
        train_config(DLRMTrainConfig, DLRMConfig(epochs=0), **DLRM_RUN)
    with pytest.raises(ValueError, match="early_stopping_metric 'mrr'"):
        train_config(DLRMTrainConfig, DLRMConfig(early_stopping_metric="mrr"), **DLRM_RUN)
    with pytest.raises(ValueError, match="temperature"):
        train_config(TwoTowerTrainConfig, TwoTowerConfig(temperature=0.0), **TWO_TOWER_RUN)


def test_history_settings_beyond_the_dataset_are_refused_not_clamped():
    from recsys_assets.data.schema import DatasetMeta

    meta = DatasetMeta(
        num_users=3,
        num_items=4,
        num_categories=0,
        user_attribute_cardinalities={},
        history_length=5,
        rows={"train": 1, "validation": 1, "test": 1},
    )
    cfg = train_config(TwoTowerTrainConfig, TwoTowerConfig(max_history=8), **TWO_TOWER_RUN)
    with pytest.raises(ValueError, match="max_history=8 exceeds the dataset's history_length=5"):
        cfg.feature_spec(meta)
    ok = train_config(TwoTowerTrainConfig, TwoTowerConfig(max_history=5, recent_items=2), **TWO_TOWER_RUN)
    spec = ok.feature_spec(meta)
    assert (spec.max_history, spec.recent_items) == (5, 2)
