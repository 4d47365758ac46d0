"""The Two Tower's sequence query encoder (``query_encoder="sequence"``): causal self-attention over the history,
read unpooled through a TorchRec EmbeddingCollection from the item table the candidate tower reads.

- It learns a planted order that the bag encoder cannot see (same items, other order, other next item).
- Causality: a later item never changes the state at an earlier position.
- The attention block is the SASRec reference's, by import.
- Real 2-process training (gloo, the planner's plan over the EmbeddingCollection), gathered weights that
  reproduce the reported metrics unsharded, and a checkpoint that resumes in one process.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from recsys_assets.evaluation.protocol import metrics_from_ranks, ranks_from_scores
from recsys_assets.models.features import FeatureSpec, FeatureStore, batch_to_kjt, build_kjt
from recsys_assets.models.two_tower import (
    QueryEncoder,
    TwoTower,
    TwoTowerModelConfig,
    TwoTowerTrainTask,
    build_two_tower,
)

TESTS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS_DIR))
from elastic import elastic_run  # noqa: E402
from synthetic_mds import write_synthetic_dataset  # noqa: E402

pytestmark = pytest.mark.timeout(600)
PACKAGE = TESTS_DIR.parent / "recsys_assets"


def _spec(encoder: str, num_items: int, history: int, recent_items: int = 0) -> FeatureSpec:
    return FeatureSpec(
        num_users=1,
        num_items=num_items,
        num_categories=1,
        user_attributes=(),
        history_length=history,
        max_history=history,
        recent_items=recent_items,
        use_user_id=False,
        query_encoder=encoder,
    )


def _store(spec: FeatureSpec) -> FeatureStore:
    no_categories = torch.zeros(spec.num_items + 1, dtype=torch.long)
    return FeatureStore(spec, torch.zeros(spec.num_users, 0, dtype=torch.long), no_categories, torch.zeros(0))


# ------------------------------------------------------------------------------------------ planted order
A, B, X, Y = 0, 1, 2, 3  # the ordered pair and the two next items; the rest are fillers
NUM_ITEMS, FILLERS, HISTORY = 16, 3, 6


def _planted(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """n users of each group: (histories [2n, H] most recent first, next items [2n], group [2n]).

    Group 0 saw A then B, group 1 B then A, both before the same kind of `FILLERS` random fillers (so A and B are
    older than the last `FILLERS` items, which a recent-items feature sees); group 0's next item is X, group 1's Y.
    """
    fillers = rng.integers(4, NUM_ITEMS, size=(n, FILLERS))
    rows, targets, groups = [], [], []
    for group, (first, second, nxt) in enumerate(((A, B, X), (B, A, Y))):
        for f in fillers:  # the same fillers in both groups: only the order of A and B differs
            chronological = [first, second, *f.tolist()]
            rows.append(chronological[::-1] + [-1] * (HISTORY - len(chronological)))
            targets.append(nxt)
            groups.append(group)
    return torch.tensor(rows), torch.tensor(targets), np.array(groups)


def _fit(encoder: str, history: torch.Tensor, targets: torch.Tensor, steps: int = 150) -> QueryEncoder:
    """Trained with the training task's sampled softmax over the whole catalogue (unsharded, plain Adam)."""
    torch.manual_seed(0)
    spec = _spec(encoder, NUM_ITEMS, HISTORY, recent_items=FILLERS if encoder == "bag" else 0)
    config = TwoTowerModelConfig(embedding_dim=16, layer_sizes=(32, 16), sequence_dropout=0.0)
    task = TwoTowerTrainTask(build_two_tower(spec, config))
    store = _store(spec)
    optimizer = torch.optim.Adam(task.parameters(), lr=1e-2)
    catalogue = torch.arange(NUM_ITEMS)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        rows = torch.randint(len(targets), (64,), generator=gen)
        batch = {"user": torch.zeros(64, dtype=torch.long), "item": targets[rows], "history": history[rows]}
        kjt = batch_to_kjt(batch, spec, store, extra_items=catalogue)
        loss, _ = task(kjt, torch.cat([targets[rows], catalogue]), None, 64)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return QueryEncoder(task.two_tower.eval(), store)


def _item_vectors(encoder: QueryEncoder) -> torch.Tensor:
    from recsys_assets.models.two_tower import ItemEncoder

    return ItemEncoder(encoder.two_tower, encoder.store).encode_all()


@torch.no_grad()
def test_the_sequence_tower_learns_a_planted_order_the_bag_cannot_see():
    rng = np.random.default_rng(0)
    fit_history, fit_targets, _ = _planted(150, rng)
    history, _, groups = _planted(50, rng)  # new users, new fillers
    users = torch.zeros(len(groups), dtype=torch.long)
    accuracy = {}
    for encoder in ("bag", "sequence"):
        with torch.enable_grad():
            model = _fit(encoder, fit_history, fit_targets)
        queries = model(users, history)
        scores = queries @ _item_vectors(model).T
        says_x = (scores[:, X] > scores[:, Y]).numpy()
        accuracy[encoder] = float(np.mean(says_x == (groups == 0)))
        if encoder == "bag":
            # the two groups' rows hold the same items: the bag (and its recent fillers) gives the same query
            half = len(groups) // 2
            torch.testing.assert_close(queries[:half], queries[half:])
    print(f"\nplanted order, X-vs-Y accuracy on new users: {accuracy}")
    assert accuracy["sequence"] >= 0.95, accuracy
    assert accuracy["bag"] == 0.5, accuracy  # one answer for both groups: right for exactly one of them


# ------------------------------------------------------------------------------------------ causality
def _small_sequence_tower() -> tuple[FeatureSpec, TwoTower, FeatureStore]:
    torch.manual_seed(0)
    spec = _spec("sequence", 30, 8)
    return spec, build_two_tower(spec, TwoTowerModelConfig(embedding_dim=16, layer_sizes=(16,))).eval(), _store(spec)


@torch.no_grad()
def test_a_later_item_never_changes_the_state_at_an_earlier_position():
    spec, model, store = _small_sequence_tower()
    history = torch.tensor([[5, 4, 3, 2, 1, 0, -1, -1], [9, 8, 7, 6, 5, 4, 3, 2]])  # most recent first
    users = torch.zeros(2, dtype=torch.long)

    def states(h):
        return model.sequence_states(build_kjt(spec, store, 2, users=users, history=h))

    base, is_pad = states(history)
    assert is_pad[0].tolist() == [True, True, False, False, False, False, False, False]
    for ago in range(6):  # change the item `ago` steps back: columns before it keep their states
        changed = history.clone()
        changed[:, ago] = 29
        new, _ = states(changed)
        column = base.shape[1] - 1 - ago
        torch.testing.assert_close(new[:, :column], base[:, :column], rtol=0, atol=0)
        assert not torch.allclose(new[1, column:], base[1, column:])


@torch.no_grad()
def test_candidate_only_rows_are_not_attended_and_the_queries_are_unchanged():
    # uniform negatives add history-less candidate rows to a training batch: encoding them made it 2x slower
    spec, model, store = _small_sequence_tower()
    batch = {
        "user": torch.zeros(3, dtype=torch.long),
        "item": torch.tensor([1, 2, 3]),
        "history": torch.tensor([[5, 4, 3, -1, -1, -1, -1, -1], [-1] * 8, [9, 8, 7, 6, 5, 4, 3, 2]]),
    }
    kjt = batch_to_kjt(batch, spec, store, extra_items=torch.arange(10, 30))
    encoded_rows = []
    hook = model.sequence_encoder.register_forward_hook(lambda m, args, out: encoded_rows.append(args[0].shape[0]))
    query, candidate = model(kjt, query_rows=3)
    assert encoded_rows == [3]  # the 20 negatives' rows are never attended over
    all_query, all_candidate = model(kjt)
    hook.remove()
    assert encoded_rows == [3, 23]
    torch.testing.assert_close(query[:3], all_query[:3])  # the same numbers, up to the batch size's rounding
    torch.testing.assert_close(candidate, all_candidate, rtol=0, atol=0)


@torch.no_grad()
@pytest.mark.parametrize("blocks,heads", [(1, 1), (2, 2)])
def test_the_last_column_alone_equals_the_full_encoders_last_column(blocks, heads):
    """Training computes the last block for the last column only: the same numbers, short and empty rows too."""
    from recsys_assets.models.attention import CausalSequenceEncoder, left_padded

    torch.manual_seed(0)
    encoder = CausalSequenceEncoder(hidden=16, blocks=blocks, heads=heads, max_len=6, dropout=0.3).eval()
    lengths = torch.tensor([0, 1, 3, 6, 9])  # an empty history, short ones, one longer than max_len (cut)
    values = torch.randn(int(lengths.sum()), 16)
    x, is_pad = left_padded(values, lengths, 6)
    assert is_pad.sum(dim=1).tolist() == [6, 5, 3, 0, 0]
    # the most recent item (first of its jagged row) sits in the last column
    starts = torch.cumsum(lengths, 0) - lengths
    torch.testing.assert_close(x[1:, -1], values[starts[1:]])
    full = encoder(x, is_pad)[:, -1:]
    torch.testing.assert_close(encoder(x, is_pad, last_only=True), full, rtol=1e-5, atol=1e-5)


def test_the_attention_block_is_the_sasrec_references_by_import():
    from recsys_assets.evaluation.sasrec import SASRecNet
    from recsys_assets.models.attention import CausalSequenceEncoder

    sasrec = SASRecNet(10, hidden=8, blocks=1, heads=1, max_len=4, dropout=0.0)
    tower = build_two_tower(_spec("sequence", 10, 4), TwoTowerModelConfig(embedding_dim=8, layer_sizes=(8,)))
    assert type(sasrec.encoder) is CausalSequenceEncoder and type(tower.sequence_encoder) is CausalSequenceEncoder
    # nobody else builds attention layers: one implementation
    builders = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("TransformerEncoderLayer", "MultiheadAttention"):
                builders.add(str(path.relative_to(PACKAGE)))
    assert builders == {"models/attention.py"}, builders


def test_the_sequence_encoder_refuses_recent_item_features_and_bad_heads(tmp_path):
    from recsys_assets.training.two_tower import TwoTowerTrainConfig

    with pytest.raises(ValueError, match="recent_items must be 0"):
        _spec("sequence", 10, 4, recent_items=1)
    with pytest.raises(ValueError, match="query_encoder"):
        _spec("lstm", 10, 4)
    with pytest.raises(ValueError, match="sequence_heads=3 must divide embedding_dim=32"):
        TwoTowerTrainConfig(data_root=str(tmp_path), query_encoder="sequence", sequence_heads=3, embedding_dim=32)
    with pytest.raises(ValueError, match="query_encoder must be one of"):
        TwoTowerTrainConfig(data_root=str(tmp_path), query_encoder="transformer")


# ------------------------------------------------------------------------------------- distributed run
SETTINGS = dict(
    query_encoder="sequence",
    sequence_blocks=1,
    sequence_heads=2,
    sequence_dropout=0.1,
    epochs=3,
    patience=5,
    batch_size=128,
    num_uniform_negatives=32,
    embedding_dim=16,
    layer_sizes=[32, 16],
    seed=0,
    num_threads=1,
    checkpoint_every_n_steps=4,
    lookup_check_ids=[0, 7, 199],
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("sequence") / "ds")


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory):
    """A 2-process run of the sequence tower with checkpoints; ({rank: result}, config)."""
    from recsys_assets.training.two_tower import TwoTowerTrainConfig, train_two_tower

    tmp = tmp_path_factory.mktemp("sequence_run")
    config = TwoTowerTrainConfig(data_root=str(dataset.root), checkpoint_dir=str(tmp / "ck"), **SETTINGS)
    t0 = time.time()
    results = elastic_run(train_two_tower, config, 2, tmp)
    r = results[0]
    print(f"\n2-process sequence run: {time.time() - t0:.1f}s, {r.samples_per_second:.0f} samples/s, {r.final_metrics}")
    return results, config


@pytest.mark.multiprocess
def test_two_process_sequence_training_learns_and_shards_the_embedding_collection(run, dataset):
    from recsys_assets.training.two_tower import load_eval_data

    results, _ = run
    r0, r1 = results[0], results[1]
    assert r0.world_size == 2 and r0.final_metrics == r1.final_metrics
    assert all(torch.equal(r0.state_dict[k], r1.state_dict[k]) for k in r0.state_dict)
    losses = [h["loss"] for h in r0.history]
    assert losses[-1] < 0.8 * losses[0], losses
    # beats MostPopular on validation by a wide margin (the planted next item follows the previous one)
    data = load_eval_data(dataset.root, "validation", dataset.meta, dataset.meta.history_length)
    counts = np.bincount(
        dataset.splits.loc[dataset.splits["split"] == "train", "item"], minlength=dataset.meta.num_items
    )
    popular = torch.as_tensor(counts, dtype=torch.float32).expand(len(data.users), -1)
    mp = metrics_from_ranks(ranks_from_scores(popular, data.targets, data.exclude_indptr, data.exclude_indices))
    assert r0.final_metrics["hr@10"] > mp["hr@10"] + 0.1, (r0.final_metrics, mp)
    # the item table lives in the EmbeddingCollection (history and candidates), planned and gathered
    assert r0.spec().query_encoder == "sequence" and r0.spec().recent_items == 0
    assert "two_tower.ebc.embedding_bags.t_item.weight" not in r0.state_dict
    w_item = r0.state_dict["two_tower.ec.embeddings.t_item.weight"]
    assert tuple(w_item.shape) == (dataset.meta.num_items, 16)
    assert any(line.strip().startswith("t_item ") for line in r0.plan_text.splitlines()), r0.plan_text
    check = r0.lookup_check["t_item"]
    torch.testing.assert_close(w_item[check["ids"]], check["rows"], atol=1e-6, rtol=0)


@pytest.mark.multiprocess
def test_gathered_sequence_weights_reproduce_the_reported_metrics_unsharded(run, dataset):
    from recsys_assets.models.two_tower import ItemEncoder
    from recsys_assets.training.two_tower import load_eval_data

    r = run[0][0]
    model = r.load_model()  # strict load into an unsharded model
    store = FeatureStore.load(dataset.root, r.spec())
    data = load_eval_data(dataset.root, "validation", dataset.meta, dataset.meta.history_length)
    with torch.no_grad():
        items = ItemEncoder(model, store).encode_all(batch_size=64)
        queries = QueryEncoder(model, store)(data.users, data.history, data.history_len)
    metrics = metrics_from_ranks(
        ranks_from_scores(queries @ items.T, data.targets, data.exclude_indptr, data.exclude_indices)
    )
    for k, v in r.final_metrics.items():
        assert abs(metrics[k] - v) <= 1.0 / len(data.users) + 1e-9, (k, metrics[k], v)


@pytest.mark.multiprocess
def test_a_two_process_sequence_checkpoint_resumes_in_one_process(run, dataset, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from recsys_assets.training.checkpoint import latest_checkpoint
    from recsys_assets.training.two_tower import train_two_tower

    (results, config) = run
    ref = results[0]
    copy = tmp_path / "ck"
    shutil.copytree(config.checkpoint_dir, copy)
    dcp_to_torch_save(str(latest_checkpoint(copy)), str(tmp_path / "merged.pt"))
    saved = torch.load(tmp_path / "merged.pt", weights_only=False)["model"]["two_tower.ec.embeddings.t_item.weight"]
    resumed = train_two_tower(dataclasses.replace(config, checkpoint_dir=str(copy), epochs=4, resume=True))
    assert resumed.world_size == 1 and resumed.resumed_from_step == ref.global_steps
    rows = resumed.resume_check["t_item"]
    assert torch.equal(saved[rows["ids"]], rows["rows"])  # the EmbeddingCollection's table, right after loading
    assert resumed.history[:3] == ref.history and len(resumed.history) == 4
    assert math.isfinite(resumed.history[3]["loss"]) and resumed.history[3]["loss"] < resumed.history[0]["loss"]
