"""Two Tower model + distributed training (TorchRec, 2 gloo processes on CPU), incl. the recency feature.

The data is the planted-structure fixture of `synthetic_mds` (items in clusters, next item mostly from the
cluster of the previous one, long-tailed popularity), small enough that a 2-process run takes ~15 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from recsys_assets.data.schema import HISTORY, HISTORY_LEN, ITEM, USER
from recsys_assets.evaluation.protocol import metrics_from_ranks, ranks_from_scores

sys.path.insert(0, str(Path(__file__).resolve().parent))
from elastic import elastic_run  # noqa: E402
from synthetic_mds import write_synthetic_dataset  # noqa: E402

pytestmark = pytest.mark.timeout(600)

# Enough epochs that early stopping (patience 2) triggers and the best weights are restored. Column-wise
# shards of width 8 put 2 column shards of every table on each rank (the harder case for gathering and for
# restoring the best weights); the torchrun test below uses the planner's default (table-wise) choice and the
# default features (user id + a recent_items bag of 1). This run takes the non-default feature paths: no user-id
# table, and two position slots of recent items, all on the shared item table.
TRAIN_SETTINGS = dict(
    query_encoder="bag",  # the sequence encoder's run: test_sequence_tower.py
    use_user_id=False,
    recent_items=2,
    recent_slots=True,
    sharding_types=["column_wise"],
    column_wise_min_partition=8,
    epochs=12,
    patience=2,
    batch_size=128,
    num_uniform_negatives=64,
    embedding_dim=32,
    layer_sizes=[64, 32],
    seed=0,
    num_threads=1,
    lookup_check_ids=[0, 7, 199],
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("two_tower") / "ds")


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory):
    """A real 2-process run of `train_two_tower` under torch's elastic launcher; {rank: result}."""
    from recsys_assets.training.two_tower import TwoTowerTrainConfig, train_two_tower

    tmp = tmp_path_factory.mktemp("two_tower_run")
    config = TwoTowerTrainConfig(
        data_root=str(dataset.root), progress_file=str(tmp / "progress.jsonl"), **TRAIN_SETTINGS
    )
    t0 = time.time()
    results = elastic_run(train_two_tower, config, 2, tmp)
    seconds = time.time() - t0
    r = results[0]
    print(
        f"\n2-process run: {seconds:.1f}s, epochs {len(r.history)}, best {r.best_epoch}, "
        f"final {r.final_metrics}, {r.samples_per_second:.0f} samples/s, peak RSS {r.peak_rss_mb} MiB"
    )
    return results, config


def _most_popular_metrics(dataset, phase: str, fit_splits: tuple[str, ...]):
    from recsys_assets.data.splits import load_splits_frame
    from recsys_assets.training.two_tower import load_eval_data

    data = load_eval_data(dataset.root, phase, dataset.meta, dataset.meta.history_length)
    frame = load_splits_frame(dataset.root, [ITEM, "split"])
    counts = np.bincount(frame.loc[frame["split"].isin(fit_splits), ITEM], minlength=dataset.meta.num_items)
    scores = torch.as_tensor(counts, dtype=torch.float32).expand(len(data.users), -1)
    return metrics_from_ranks(ranks_from_scores(scores, data.targets, data.exclude_indptr, data.exclude_indices))


def _last_item_markov_metrics(dataset, phase: str):
    """The sequential baseline (transition counts from the user's last fit item) on the same split."""
    from recsys_assets.evaluation.baselines import LastItemMarkov
    from recsys_assets.evaluation.protocol import EvalTask, evaluate

    frame = dataset.splits[[USER, ITEM, "timestamp", "split"]]
    task = EvalTask.from_splits(frame, phase, num_users=dataset.meta.num_users, num_items=dataset.meta.num_items)
    return evaluate(LastItemMarkov().fit(task).score, task).as_dict()


# ------------------------------------------------------------------------------------------ unit tests
def test_kjt_keeps_id_zero_and_respects_lengths(dataset):
    from recsys_assets.models.features import FeatureSpec, FeatureStore, batch_to_kjt

    spec = FeatureSpec.from_meta(dataset.meta, recent_items=2, use_user_id=True)
    assert spec.query_keys == ["user_id", "history", "recent_items", "attr_group", "attr_region"]
    store = FeatureStore.load(dataset.root, spec)
    h = spec.history_length
    history = torch.full((3, h), -1, dtype=torch.int32)
    history[0, :3] = torch.tensor([0, 5, 0], dtype=torch.int32)  # id 0 twice (most recent first)
    history[1, :2] = torch.tensor([4, 0], dtype=torch.int32)  # history_len says 1: only [4]
    batch = {  # int32, as Streaming delivers MDS int32 columns
        USER: torch.tensor([0, 3, 0], dtype=torch.int32),
        ITEM: torch.tensor([0, 9, 2], dtype=torch.int32),
        HISTORY: history,
        HISTORY_LEN: torch.tensor([3, 1, 0], dtype=torch.int32),
    }
    kjt = batch_to_kjt(batch, spec, store, extra_items=torch.tensor([0, 1]))
    d = kjt.to_dict()
    assert kjt.stride() == 5  # 3 rows + 2 extra negatives
    assert d["user_id"].values().tolist() == [0, 3, 0]
    assert d["user_id"].lengths().tolist() == [1, 1, 1, 0, 0]
    assert d["history"].values().tolist() == [0, 5, 0, 4]
    assert d["history"].lengths().tolist() == [3, 1, 0, 0, 0]
    assert d["recent_items"].values().tolist() == [0, 5, 4]  # the 2 most recent of each row, within history_len
    assert d["recent_items"].lengths().tolist() == [2, 1, 0, 0, 0]
    assert d["item_id"].values().tolist() == [0, 9, 2, 0, 1]
    assert d["item_id"].lengths().tolist() == [1, 1, 1, 1, 1]
    assert kjt.values().dtype == torch.int64
    # categories of item 0 come from item_features (cluster 0 is category 0), and are a real bag
    cats0 = list(dataset.item_features.loc[dataset.item_features[ITEM] == 0, "categories"].iloc[0])
    n0 = int(d["item_categories"].lengths()[0])
    assert d["item_categories"].values()[:n0].tolist() == cats0
    attrs = dataset.user_features.set_index(USER)
    assert d["attr_group"].values().tolist() == [int(attrs.loc[u, "attr_group"]) for u in (0, 3, 0)]


def test_training_batches_contain_id_zero(dataset):
    """Real block batches of the train split -> KJTs that contain user 0 and item 0 (no `if value:`)."""
    from recsys_assets.models.features import FeatureSpec, FeatureStore, batch_to_kjt
    from recsys_assets.training.block_loader import open_loader
    from recsys_assets.training.streaming import prepare_streaming
    from recsys_assets.training.two_tower import train_block_columns

    spec = FeatureSpec.from_meta(dataset.meta, recent_items=1, use_user_id=True)
    store = FeatureStore.load(dataset.root, spec)
    needed = train_block_columns(dataset.meta.history_length)
    folder = dataset.paths.mds("train")
    prepare_streaming()
    loader = open_loader([folder], needed, 512, seed=0)
    seen = {"user_id": False, "history": False, "recent_items": False, "item_id": False}
    n_hist = n_recent = 0
    for batch in loader:
        assert batch[USER].dtype == torch.int32
        d = batch_to_kjt(batch, spec, store).to_dict()
        for k in seen:
            seen[k] |= bool((d[k].values() == 0).any())
        n_hist += int(d["history"].values().numel())
        # the recent item of every row with a history is its most recent one (column 0 of the MDS row)
        has = batch[HISTORY_LEN] > 0
        assert d["recent_items"].values().tolist() == batch[HISTORY][has, 0].tolist()
        n_recent += int(has.sum())
    assert all(seen.values()), seen
    train = dataset.splits.loc[dataset.splits["split"] == "train"]
    assert n_hist == int(train[HISTORY_LEN].sum())
    assert n_recent == int((train[HISTORY_LEN] > 0).sum())


def _histories(h: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded histories (most recent first) with id 0 in the most recent position, a short history, a
    history_len shorter than the real ids, and an empty history."""
    history = torch.full((5, h), -1, dtype=torch.int32)
    history[0, :3] = torch.tensor([0, 5, 3], dtype=torch.int32)  # most recent item is id 0
    history[1, :2] = torch.tensor([7, 0], dtype=torch.int32)  # id 0 second
    history[2, :1] = torch.tensor([0], dtype=torch.int32)  # only id 0
    history[3, :2] = torch.tensor([4, 6], dtype=torch.int32)  # history_len 1: only [4] counts
    history_len = torch.tensor([3, 2, 1, 1, 0], dtype=torch.int32)  # row 4: no history at all
    return history, history_len


def test_recent_items_carry_the_most_recent_history_item(dataset):
    """The bag encoder's default recency feature: `recent_items` holds each row's most recent real history item (position
    0), id 0 included, independently of how many items the mean-pooled history bag keeps."""
    from recsys_assets.models.features import FeatureSpec, FeatureStore, build_kjt
    from recsys_assets.training.two_tower import TwoTowerTrainConfig

    config = TwoTowerTrainConfig(data_root=str(dataset.root), query_encoder="bag", max_history=0)
    spec = config.feature_spec(dataset.meta)
    assert (spec.recent_items, spec.recent_slots, spec.use_user_id, spec.max_history) == (1, False, True, 0)
    assert spec.query_keys == ["user_id", "history", "recent_items", "attr_group", "attr_region"]
    store = FeatureStore.load(dataset.root, spec)
    history, history_len = _histories(spec.history_length)
    users = torch.tensor([0, 1, 2, 3, 0])
    d = build_kjt(spec, store, stride=7, users=users, history=history, history_len=history_len).to_dict()
    assert d["recent_items"].values().tolist() == [0, 7, 0, 4]
    assert d["recent_items"].lengths().tolist() == [1, 1, 1, 1, 0, 0, 0]
    assert d["history"].lengths().tolist() == [0] * 7  # max_history 0: no history bag, the recent item stays
    assert d["user_id"].values().tolist() == [0, 1, 2, 3, 0]
    no_user = FeatureSpec.from_meta(dataset.meta, recent_items=1, use_user_id=False)
    d = build_kjt(no_user, store, stride=5, users=users, history=history, history_len=history_len).to_dict()
    assert "user_id" not in d and d["recent_items"].values().tolist() == [0, 7, 0, 4]

    # without history_len, the padding alone ends a row (row 3 then has 2 real ids; row 4 none)
    d = build_kjt(spec, store, stride=5, users=users, history=history).to_dict()
    assert d["recent_items"].values().tolist() == [0, 7, 0, 4]
    assert d["recent_items"].lengths().tolist() == [1, 1, 1, 1, 0]

    # position slots: recent_items_j holds the item at position j, or nothing where the history is shorter
    slots = FeatureSpec.from_meta(dataset.meta, recent_items=3, recent_slots=True)
    assert slots.recent_keys == ["recent_items_0", "recent_items_1", "recent_items_2"]
    d = build_kjt(slots, store, stride=5, users=users, history=history, history_len=history_len).to_dict()
    assert d["recent_items_0"].values().tolist() == [0, 7, 0, 4]
    assert d["recent_items_0"].lengths().tolist() == [1, 1, 1, 1, 0]
    assert d["recent_items_1"].values().tolist() == [5, 0]
    assert d["recent_items_1"].lengths().tolist() == [1, 1, 0, 0, 0]
    assert d["recent_items_2"].values().tolist() == [3]
    assert d["recent_items_2"].lengths().tolist() == [1, 0, 0, 0, 0]
    # k beyond the data's history length is refused, not silently capped
    h = dataset.meta.history_length
    assert FeatureSpec.from_meta(dataset.meta, recent_items=h).recent_items == h
    with pytest.raises(ValueError, match=rf"recent_items=99 must be within \[0, history_length={h}\]"):
        FeatureSpec.from_meta(dataset.meta, recent_items=99)


def test_recent_items_share_the_item_table_with_history_and_candidates(dataset):
    """One t_item table is read by history, recent_items and item_id: the pooled recent item of a query is
    exactly the candidate-side embedding of that item (id 0 included), and an empty recent bag pools to 0."""
    from recsys_assets.models.features import FeatureSpec, FeatureStore, build_kjt
    from recsys_assets.models.two_tower import TwoTowerModelConfig, build_two_tower, embedding_bag_configs

    spec = FeatureSpec.from_meta(dataset.meta, recent_items=1)
    [item_table] = [t for t in embedding_bag_configs(spec, 8) if t.name == "t_item"]
    assert item_table.feature_names == ["history", "recent_items", "item_id"]
    torch.manual_seed(0)
    model = build_two_tower(spec, TwoTowerModelConfig(embedding_dim=8, layer_sizes=(8,))).eval()
    store = FeatureStore.load(dataset.root, spec)
    history, history_len = _histories(spec.history_length)
    items = torch.tensor([0, 7, 0, 4, 9])  # = each row's most recent item (row 4 has none)
    kjt = build_kjt(spec, store, stride=5, users=torch.arange(5), history=history, history_len=history_len, items=items)
    with torch.no_grad():
        pooled = model.pooled(kjt)
    weight = model.ebc.embedding_bags["t_item"].weight.detach()
    torch.testing.assert_close(pooled["recent_items"][:4], pooled["item_id"][:4])
    torch.testing.assert_close(pooled["recent_items"][:4], weight[items[:4]])
    assert torch.equal(pooled["recent_items"][4], torch.zeros(8))
    # the query vector follows the most recent item: change only position 0 and it changes
    other = history.clone()
    other[0, 0] = 1
    with torch.no_grad():
        q = model.query(
            build_kjt(spec, store, stride=5, users=torch.arange(5), history=history, history_len=history_len)
        )
        q2 = model.query(
            build_kjt(spec, store, stride=5, users=torch.arange(5), history=other, history_len=history_len)
        )
    assert not torch.allclose(q[0], q2[0]) and torch.allclose(q[1:], q2[1:])


def test_feature_spec_of_a_model_saved_before_recent_items_loads_unchanged():
    """A feature_spec dict written before recent_items / use_user_id existed means: user id, no recent items."""
    from recsys_assets.models.features import FeatureSpec

    old = dict(
        num_users=5,
        num_items=9,
        num_categories=3,
        user_attributes=(("attr_group", 4),),
        history_length=8,
        max_history=8,
    )
    spec = FeatureSpec(**old)
    assert spec.query_keys == ["user_id", "history", "attr_group"]
    assert spec.recent_items == 0 and spec.use_user_id


def test_sampled_softmax_masks_duplicates_and_applies_logq():
    from recsys_assets.models.two_tower import sampled_softmax_loss

    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(3, 4), dim=1)
    c = torch.nn.functional.normalize(torch.randn(5, 4), dim=1)
    items = torch.tensor([7, 8, 7, 1, 8])  # row 0's positive (7) appears again at col 2; row 1's (8) at col 4
    log_q = torch.log(torch.tensor([0.5, 0.2, 0.5, 0.1, 0.2]))
    loss, logits = sampled_softmax_loss(q, c, items, 20.0, log_q)
    expected = (q @ c.T) * 20.0 - log_q[None, :]
    mask = torch.tensor(
        [[False, False, True, False, False], [False, False, False, False, True], [True, False, False, False, False]]
    )
    manual = torch.nn.functional.cross_entropy(expected.masked_fill(mask, -1e30), torch.arange(3))
    assert torch.allclose(loss, manual, atol=1e-5)
    assert torch.allclose(logits[~mask], expected[~mask], atol=1e-5)
    assert (logits[mask] < -1e30).all()


# ------------------------------------------------------------------------------------- distributed run
@pytest.mark.multiprocess
def test_two_process_training_learns_and_beats_most_popular(run, dataset):
    results, config = run
    assert sorted(results) == [0, 1]
    r0, r1 = results[0], results[1]
    # identical on every rank (broadcast), including the gathered weights
    assert r0.history == r1.history and r0.final_metrics == r1.final_metrics and r0.best_epoch == r1.best_epoch
    assert r0.state_dict.keys() == r1.state_dict.keys()
    assert all(torch.equal(r0.state_dict[k], r1.state_dict[k]) for k in r0.state_dict)
    assert r0.world_size == 2 and len(r0.peak_rss_mb) == 2 and min(r0.peak_rss_mb) > 100
    assert r0.samples_per_second > 0

    # each epoch covers the train split exactly once across the 2 ranks (disjoint halves)
    assert all(h["samples"] == dataset.meta.rows["train"] for h in r0.history)
    losses = [h["loss"] for h in r0.history]
    assert losses[-1] < 0.8 * losses[0], losses

    mp = _most_popular_metrics(dataset, "validation", ("train",))
    best = r0.final_metrics
    print(f"\nvalidation HR@10: two tower {best['hr@10']:.4f} vs MostPopular {mp['hr@10']:.4f}")
    assert best["hr@10"] > mp["hr@10"] + 0.15, (best, mp)
    assert best["ndcg@10"] > mp["ndcg@10"] + 0.1, (best, mp)
    # ... and the sequential baseline: the query tower sees the latest item (recent_items) besides the history
    lim = _last_item_markov_metrics(dataset, "validation")
    print(f"validation HR@10 / NDCG@10: LastItemMarkov {lim['hr@10']:.4f} / {lim['ndcg@10']:.4f}")
    assert best["hr@10"] > lim["hr@10"] and best["ndcg@10"] > lim["ndcg@10"], (best, lim)

    # early stopping on ndcg@10 (its mean over the last `early_stopping_window` epochs) ran out of patience; the
    # best epoch's weights (and metrics) were kept
    assert r0.stopped_early and r0.best_epoch < len(r0.history) - 1
    ndcgs = [h["metrics"]["ndcg@10"] for h in r0.history]
    window = config.early_stopping_window
    assert window == 3  # the default
    trailing = [np.mean(ndcgs[max(0, e - window + 1) : e + 1]) for e in range(len(ndcgs))]
    assert r0.best_epoch == int(np.argmax(trailing))
    assert r0.final_metrics == r0.history[r0.best_epoch]["metrics"]

    # the plan is the constrained one: every table column-wise, with shards on both ranks
    assert "t_user" not in r0.plan_text  # use_user_id=False: no user table at all
    for table in ("t_item", "t_category", "t_attr_group", "t_attr_region"):
        lines = [x for x in r0.plan_text.splitlines() if x.strip().startswith(table + " ")]
        assert any("column_wise" in x for x in lines), r0.plan_text
        assert any("rank:0" in x for x in lines) and any("rank:1" in x for x in lines), r0.plan_text
    assert "table_wise" not in r0.plan_text and "row_wise" not in r0.plan_text

    # rank 0 appended one JSON line per epoch to the progress file
    lines = [json.loads(x) for x in Path(config.progress_file).read_text().splitlines()]
    epochs = [x for x in lines if x["event"] == "epoch"]
    assert [x["epoch"] for x in epochs] == list(range(len(r0.history)))
    assert lines[-1]["event"] == "end" and lines[-1]["best_epoch"] == r0.best_epoch


@pytest.mark.multiprocess
def test_sharded_lookups_equal_gathered_tables(run, dataset):
    results, _ = run
    r = results[0]
    spec = r.spec()
    assert spec.query_keys == ["history", "recent_items_0", "recent_items_1", "attr_group", "attr_region"]
    sizes = {
        "t_item": spec.num_items,
        "t_category": spec.num_categories,
        "t_attr_group": 4,
        "t_attr_region": 3,
    }
    assert set(r.lookup_check) == set(sizes)
    for table, n in sizes.items():
        w = r.state_dict[f"two_tower.ebc.embedding_bags.{table}.weight"]
        assert tuple(w.shape) == (n, 32)
        ids, rows = r.lookup_check[table]["ids"], r.lookup_check[table]["rows"]
        assert 0 in ids.tolist() and n - 1 in ids.tolist()
        torch.testing.assert_close(w[ids], rows, atol=1e-6, rtol=0)
    assert 7 in r.lookup_check["t_item"]["ids"].tolist() and 199 in r.lookup_check["t_item"]["ids"].tolist()
    # the tables were trained (not left at their initial uniform(-1/sqrt(n), 1/sqrt(n)) values)
    w_item = r.state_dict["two_tower.ebc.embedding_bags.t_item.weight"]
    assert w_item.abs().max() > 1.5 / np.sqrt(spec.num_items)


@pytest.mark.multiprocess
def test_unsharded_encoders_reproduce_reported_metrics(run, dataset):
    from recsys_assets.models.features import FeatureStore
    from recsys_assets.models.two_tower import ItemEncoder, QueryEncoder, TwoTowerTrainTask, build_two_tower
    from recsys_assets.training.two_tower import load_eval_data

    results, _ = run
    r = results[0]
    model = r.load_model()  # strict load of the gathered state dict into an unsharded model
    # the train-task keys also load as they are
    from recsys_assets.models.two_tower import TwoTowerModelConfig

    TwoTowerTrainTask(build_two_tower(r.spec(), TwoTowerModelConfig.from_dict(r.model_config))).load_state_dict(
        r.state_dict, strict=True
    )
    store = FeatureStore.load(dataset.root, r.spec())
    data = load_eval_data(dataset.root, "validation", dataset.meta, dataset.meta.history_length)
    with torch.no_grad():
        items = ItemEncoder(model, store).encode_all(batch_size=64)
        queries = QueryEncoder(model, store)(data.users, data.history, data.history_len)
        ranks = ranks_from_scores(queries @ items.T, data.targets, data.exclude_indptr, data.exclude_indices)
    metrics = metrics_from_ranks(ranks)
    n = len(data.users)
    for k, v in r.final_metrics.items():
        assert abs(metrics[k] - v) <= 1.0 / n + 1e-9, (k, metrics[k], v)
    assert items.shape == (dataset.meta.num_items, 32)
    assert torch.allclose(items.norm(dim=1), torch.ones(len(items)), atol=1e-5)


@pytest.mark.multiprocess
def test_torchrun_cli_refit_on_train_and_validation_logs_to_mlflow(dataset, tmp_path):
    """`torchrun -m recsys_assets.training.two_tower`: test phase (fit on two MDS streams), MLflow + result."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("two_tower_test", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(exp).info.run_id

    cfg = tmp_path / "cfg.json"
    cfg.write_text(
        json.dumps(
            {
                "data_root": str(dataset.root),
                "eval_phase": "test",
                "epochs": 2,
                "batch_size": 128,
                "num_threads": 1,
                "mlflow_tracking_uri": uri,
                "mlflow_run_id": run_id,
            }
        )
    )
    out = tmp_path / "result.pt"
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    t0 = time.time()
    proc = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "recsys_assets.training.two_tower",
            "--config",
            str(cfg),
            "--result",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    print(f"\ntorchrun CLI run: {time.time() - t0:.1f}s")

    r = torch.load(out, weights_only=False)
    assert type(r).__module__ == "recsys_assets.training.two_tower"
    assert r.eval_phase == "test" and r.fit_folders == ("train", "validation") and r.world_size == 2
    # no epoch selection on test metrics: all epochs run, the last one is returned; test is not ranked during
    # training, only once with the final weights
    assert len(r.history) == 2 and r.best_epoch == 1 and not r.stopped_early
    assert all(h["metrics"] == {} for h in r.history) and set(r.final_metrics) >= {"hr@10", "ndcg@10"}
    rows = dataset.meta.rows
    assert all(h["samples"] == rows["train"] + rows["validation"] for h in r.history)  # both streams, once
    mp = _most_popular_metrics(dataset, "test", ("train", "validation"))
    print(f"test HR@10: two tower {r.final_metrics['hr@10']:.4f} vs MostPopular {mp['hr@10']:.4f}")
    assert r.final_metrics["hr@10"] > mp["hr@10"] + 0.1
    assert r.final_metrics["hr@10"] > _last_item_markov_metrics(dataset, "test")["hr@10"]
    # the default features: user id, the history read in order (the sequence encoder: no recent-item feature),
    # attributes; the item table in the EmbeddingCollection, the others in the EmbeddingBagCollection
    assert r.config["query_encoder"] == "sequence" and r.config["use_user_id"]
    assert r.spec().query_keys == ["user_id", "history", "attr_group", "attr_region"]
    assert "t_user" in r.lookup_check and "t_item" in r.lookup_check

    assert "table_wise" in r.plan_text  # the planner's own pick without constraints beyond TW/CW
    for table, d in r.lookup_check.items():  # table-wise gather == lookups through the sharded model
        key = f"two_tower.ebc.embedding_bags.{table}.weight"
        weights = r.state_dict[key if key in r.state_dict else f"two_tower.ec.embeddings.{table}.weight"]
        torch.testing.assert_close(weights[d["ids"]], d["rows"])

    assert client.get_metric_history(run_id, "test_hr_at_10") == []  # no per-epoch test metric
    assert len(client.get_metric_history(run_id, "train_loss")) == 2


def test_category_bags_padded_gather_equals_the_csr_ranges():
    """The padded-matrix gather returns exactly the CSR ranges (values in row order, lengths; id 0 kept)."""
    from recsys_assets.models.features import _gather_ranges, _padded_rows

    rng = np.random.default_rng(0)
    lengths = torch.from_numpy(rng.integers(0, 5, 50))
    indptr = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)])
    indices = torch.from_numpy(rng.integers(0, 7, int(lengths.sum())))
    rows = _padded_rows(indptr, indices)
    items = torch.from_numpy(rng.integers(0, 50, 300))
    picked = rows[items]
    values, counts = picked[picked >= 0], (picked >= 0).sum(dim=1)
    assert torch.equal(counts, lengths[items]) and bool((indices == 0).any())
    assert torch.equal(values, _gather_ranges(indices, indptr[items], lengths[items]))


def test_the_ranker_phase_fits_the_rows_before_the_window_and_ranks_nothing(tmp_path):
    """eval_phase "ranker": one process trains on mds/ranker_fit (the train rows before the ranker window) for
    fixed epochs; no held-out row is ranked, during training or after; early stopping there is refused."""
    from recsys_assets.training.two_tower import TwoTowerTrainConfig, train_two_tower

    ds = write_synthetic_dataset(tmp_path / "ds", num_users=60, num_items=50, ranker_window=3)
    fit_rows = int(((ds.splits["split"] == "train") & ~ds.splits["ranker_window"]).sum())
    assert 0 < fit_rows < ds.meta.rows["train"] and ds.meta.ranker_queries == ds.meta.rows["train"] - fit_rows
    r = train_two_tower(
        TwoTowerTrainConfig(data_root=str(ds.root), eval_phase="ranker", epochs=2, batch_size=64, embedding_dim=8)
    )
    assert r.fit_folders == ("ranker_fit",) and len(r.history) == 2 and r.best_epoch == 1
    assert all(h["samples"] == fit_rows and h["metrics"] == {} for h in r.history)
    assert r.final_metrics == {}
    with pytest.raises(ValueError, match="early stopping selects on 'validation' only"):
        TwoTowerTrainConfig(data_root=str(ds.root), eval_phase="ranker", early_stopping=True)


def test_phases_in_one_launch_train_what_separate_launches_train(tmp_path):
    """`train_two_tower_phases` (the refit and the ranker phase in one launch): each phase gets the result a call
    of its own gives (same losses, metrics and weights), and the process group it made is gone afterwards."""
    import torch.distributed as dist

    from recsys_assets.training.two_tower import TwoTowerTrainConfig, train_two_tower, train_two_tower_phases

    ds = write_synthetic_dataset(tmp_path / "ds", num_users=60, num_items=50, ranker_window=3)
    common = dict(data_root=str(ds.root), epochs=2, batch_size=64, embedding_dim=8, num_threads=1)
    configs = [TwoTowerTrainConfig(eval_phase="test", **common), TwoTowerTrainConfig(eval_phase="ranker", **common)]
    together = train_two_tower_phases(configs)
    assert not dist.is_initialized()
    alone = [train_two_tower(config) for config in configs]
    assert [r.fit_folders for r in together] == [("train", "validation"), ("ranker_fit",)]
    for joint, single in zip(together, alone):
        assert [h["loss"] for h in joint.history] == [h["loss"] for h in single.history]
        assert joint.final_metrics == single.final_metrics
        for name, tensor in single.state_dict.items():
            torch.testing.assert_close(joint.state_dict[name], tensor, msg=name)
    assert train_two_tower_phases([]) == []


def test_selected_phases_train_the_epochs_validation_chose(tmp_path):
    """`train_two_tower_selected` (every phase of an asset without a search, in one launch): the later phases
    train for the validation phase's best epoch count, whatever their own `epochs`, and equal a separate call
    with that count."""
    import dataclasses

    import torch.distributed as dist

    from recsys_assets.training.two_tower import TwoTowerTrainConfig, train_two_tower, train_two_tower_selected

    ds = write_synthetic_dataset(tmp_path / "ds", num_users=60, num_items=50, ranker_window=3)
    common = dict(data_root=str(ds.root), batch_size=64, embedding_dim=8, num_threads=1)
    validation = TwoTowerTrainConfig(eval_phase="validation", epochs=4, **common)
    later = [TwoTowerTrainConfig(eval_phase=phase, epochs=9, **common) for phase in ("test", "ranker")]
    selection, *rest = train_two_tower_selected([validation, *later])
    assert not dist.is_initialized()
    chosen = selection.best_epoch + 1
    assert chosen <= 4  # not the later configs' own 9
    for config, joint in zip(later, rest):
        assert len(joint.history) == chosen
        single = train_two_tower(dataclasses.replace(config, epochs=chosen))
        assert [h["loss"] for h in joint.history] == [h["loss"] for h in single.history]
        for name, tensor in single.state_dict.items():
            torch.testing.assert_close(joint.state_dict[name], tensor, msg=name)


def test_an_asset_fit_without_a_search_is_one_launch(tmp_path):
    """`fit_two_tower` launches every phase at once when no search trained the validation config, and only the
    later phases, at the reused result's epoch count, when one did."""
    from recsys_assets.training.runs import fit_two_tower
    from recsys_assets.training.two_tower import TwoTowerTrainConfig

    launches = []

    def launch(fn, config, progress_file=None):  # in-process: what TorchDistributor would run on each rank
        launches.append(fn.__name__)
        return fn(config)

    ds = write_synthetic_dataset(tmp_path / "ds", num_users=60, num_items=50, ranker_window=3)
    common = dict(data_root=str(ds.root), epochs=3, batch_size=64, embedding_dim=8, num_threads=1)

    def make_config(**phase):
        return TwoTowerTrainConfig(**{**common, **phase})

    runs = []
    for name, trained in (("alone", lambda config: None), ("after_search", lambda config: runs[0].selection)):
        (tmp_path / name).mkdir()
        fit = fit_two_tower(
            launch, make_config, tmp_path / name, tmp_path / name / "ck", refit=True, ranker_phase=True, trained=trained
        )
        runs.append(fit)
        assert len(fit.final.history) == len(fit.ranker.history) == fit.selection.best_epoch + 1
        assert (tmp_path / name / "model_ranker.pt").exists()
    assert launches == ["train_two_tower_selected", "train_two_tower_phases"]
    assert runs[1].selection is runs[0].selection


def test_one_process_gather_assembles_the_column_shards_locally(tmp_path):
    """With one process the sharded tables are assembled from their local shards (no gloo gather, whose copies
    on gloo's thread slow every later fit in the process): two column shards per table, and the assembled
    rows equal the lookups through the sharded model."""
    from recsys_assets.training.two_tower import TwoTowerTrainConfig, train_two_tower

    ds = write_synthetic_dataset(tmp_path / "ds", num_users=60, num_items=50)
    config = TwoTowerTrainConfig(
        data_root=str(ds.root),
        eval_phase="test",
        epochs=1,
        batch_size=64,
        embedding_dim=16,
        query_encoder="bag",
        sharding_types=("column_wise",),
        column_wise_min_partition=8,
        lookup_check_ids=(0, 7, 49),
        num_threads=1,
    )
    r = train_two_tower(config)
    assert r.world_size == 1
    item_plan = [x for x in r.plan_text.splitlines() if x.strip().startswith("t_item ")]
    assert "column_wise" in item_plan[0] and sum("[50, 8]" in x and "rank:0" in x for x in item_plan) == 2, r.plan_text
    for table, d in r.lookup_check.items():
        weights = r.state_dict[f"two_tower.ebc.embedding_bags.{table}.weight"]
        assert weights.shape[1] == 16
        torch.testing.assert_close(weights[d["ids"]], d["rows"])
