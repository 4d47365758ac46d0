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


# Settings whose changed value needs a partner to stay valid, or is not a number or a flag.
CHANGED_TOGETHER = {
    DLRMTrainConfig: {
        "embedding_dim": {"embedding_dim": 32, "bottom_layer_sizes": [64, 32]},  # the bottom MLP ends at it
        "bottom_layer_sizes": {"bottom_layer_sizes": [32, 16]},
        "top_layer_sizes": {"top_layer_sizes": [16, 1]},
        "early_stopping_metric": {"early_stopping_metric": "hr@10"},
    },
    TwoTowerTrainConfig: {
        "layer_sizes": {"layer_sizes": [48, 32]},
        "max_history": {"max_history": 5},
        "query_encoder": {"query_encoder": "bag"},
    },
}


def _changed(value):
    """A value other than the default, of its type."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1 if isinstance(value, int) else (value * 0.5 or 0.5)
    raise AssertionError(f"no changed value for {value!r}: add the setting to CHANGED_TOGETHER")


@pytest.mark.parametrize(
    ("train_cls", "dagster_cls", "run"),
    [(DLRMTrainConfig, DLRMConfig, DLRM_RUN), (TwoTowerTrainConfig, TwoTowerConfig, TWO_TOWER_RUN)],
    ids=["dlrm", "two_tower"],
)
def test_every_training_setting_set_on_the_asset_reaches_the_training_run(train_cls, dagster_cls, run):
    fields = dagster_cls.model_fields
    defaults = train_cls.from_dict(run)
    for f in exposed_fields(train_cls):
        assert fields[f.name].description == f.metadata["help"], f.name  # the UI shows the training help
        settings = CHANGED_TOGETHER[train_cls].get(f.name) or {f.name: _changed(f.default)}
        trained = train_config(train_cls, dagster_cls(**settings), **run)
        for name, value in settings.items():
            value = tuple(value) if isinstance(value, list) else value
            assert getattr(trained, name) == value != getattr(defaults, name), name


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
    bag = TwoTowerConfig(query_encoder="bag", max_history=5, recent_items=2)
    spec = train_config(TwoTowerTrainConfig, bag, **TWO_TOWER_RUN).feature_spec(meta)
    assert (spec.max_history, spec.recent_items) == (5, 2)
    # the sequence encoder reads the recent items in order: its spec has no recent-item feature
    sequence = TwoTowerConfig(query_encoder="sequence", max_history=5, recent_items=2)
    spec = train_config(TwoTowerTrainConfig, sequence, **TWO_TOWER_RUN).feature_spec(meta)
    assert (spec.max_history, spec.recent_items, spec.query_encoder) == (5, 0, "sequence")


def test_the_sparse_switches_are_declared_once():
    """The asset's switches, the layout and the search all read ranker_features.SPARSE_SWITCHES."""
    from recsys_assets.data.ranker_features import SPARSE_SWITCHES
    from recsys_assets.data.ranking import sparse_layout
    from recsys_assets.training.search import dlrm_space

    fields = DLRMConfig.model_fields
    for name, (default, meaning) in SPARSE_SWITCHES.items():
        assert (fields[name].default, fields[name].description) == (default, meaning), name
    assert set(SPARSE_SWITCHES) <= set(dlrm_space(epochs=10))
    info = {"num_users": 7, "num_items": 5, "num_categories": 3, "attribute_columns": ["age"]}
    info["attribute_cardinalities"] = {"age": 4}
    defaults = {name: default for name, (default, _) in SPARSE_SWITCHES.items()}
    assert [f["name"] for f in sparse_layout(info, defaults)] == ["categories", "age"]
    everything = sparse_layout(info, dict.fromkeys(SPARSE_SWITCHES, True))
    assert [f["table"] for f in everything] == ["user", "item", "item", "category", "age"]
    with pytest.raises(ValueError, match="use_history"):
        sparse_layout(info, {name: v for name, v in defaults.items() if name != "use_history"})
