"""The MLflow Model Registry step (recsys_assets.serving.registry) on a real SQLite tracking store: versions of
small real torch scorers logged with mlflow.pytorch, loaded back from the registry and scored on validation data
through the project's evaluator; the champion alias moves only to a gated version that is not worse."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from types import SimpleNamespace

import mlflow
import mlflow.pytorch
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from recsys_assets.evaluation.protocol import EvalTask, evaluate
from recsys_assets.serving import registry as R

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_mds import write_synthetic_dataset  # noqa: E402

NUM_USERS, NUM_ITEMS = 40, 12
NAME = "recsys_test_model"


@pytest.fixture()
def client(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    c = MlflowClient(tracking_uri=uri)
    c.create_experiment("registry", artifact_location=(tmp_path / "artifacts").as_uri())
    yield c
    mlflow.set_tracking_uri(None)


def _validation_task() -> EvalTask:
    """Users 0..39: train items u%12 and (u+1)%12, validation item (u+2)%12."""
    rows = []
    for u in range(NUM_USERS):
        rows += [(u, u % NUM_ITEMS, 1, "train"), (u, (u + 1) % NUM_ITEMS, 2, "train")]
        rows.append((u, (u + 2) % NUM_ITEMS, 3, "validation"))
    frame = pd.DataFrame(rows, columns=["user", "item", "timestamp", "split"])
    return EvalTask.from_splits(frame, "validation", num_users=NUM_USERS, num_items=NUM_ITEMS)


def _scorer(hit_share: float, seed: int) -> torch.nn.Embedding:
    """A user → item-scores table that puts the validation item first for `hit_share` of the users."""
    g = torch.Generator().manual_seed(seed)
    table = torch.nn.Embedding(NUM_USERS, NUM_ITEMS)
    with torch.no_grad():
        table.weight.copy_(torch.rand(NUM_USERS, NUM_ITEMS, generator=g))
        for u in range(int(hit_share * NUM_USERS)):
            table.weight[u, (u + 2) % NUM_ITEMS] = 10.0
    return table


def _ndcg(model: torch.nn.Module, task: EvalTask) -> float:
    with torch.no_grad():
        return float(evaluate(lambda users: model(torch.as_tensor(users)), task, ks=(10,))["ndcg@10"])


def _register(client, model: torch.nn.Module) -> str:
    run = client.create_run(client.get_experiment_by_name("registry").experiment_id)
    with mlflow.start_run(run_id=run.info.run_id):
        info = mlflow.pytorch.log_model(model, name="model", serialization_format="pickle", pip_requirements=[])
    client.set_terminated(run.info.run_id)
    mv = R.register_version(client, NAME, info, run.info.run_id, {"dagster.run_id": f"dagster-{run.info.run_id}"})
    return str(mv.version)


def _promote(client, version: str, task: EvalTask, gates_passed: bool = True, gate_reason: str = "") -> R.Decision:
    """The champion and the candidate, both loaded back from the registry and scored on `task`."""

    def score(v: str) -> float:
        return _ndcg(mlflow.pytorch.load_model(f"models:/{NAME}/{v}"), task)

    return R.promote(
        client,
        NAME,
        version,
        lambda: score(version),
        lambda champion: score(champion.version),
        gates_passed,
        gate_reason=gate_reason,
        metric="validation_ndcg@10",
    )


def test_champion_stays_on_a_better_old_version_and_moves_to_a_better_new_one(client):
    task = _validation_task()
    v1 = _register(client, _scorer(0.6, seed=1))
    first = _promote(client, v1, task)
    assert (first.alias, first.champion_version) == ("champion", None)
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == v1

    v2 = _register(client, _scorer(0.1, seed=2))  # worse on the validation data
    second = _promote(client, v2, task)
    assert second.alias == "challenger" and second.champion_version == v1
    assert second.candidate_score < second.champion_score
    assert f"< champion v{v1}'s" in second.reason and "stays champion" in second.reason
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == v1
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == v2
    tags = client.get_model_version(NAME, v2).tags
    assert tags[R.ALIAS_TAG] == "challenger" and tags[R.REASON_TAG] == second.reason
    assert float(tags[R.SCORE_TAG]) == pytest.approx(second.candidate_score, abs=1e-6)
    assert R.SCORE_TAG not in client.get_model_version(NAME, v1).tags  # the first version had nothing to beat
    assert tags["dagster.run_id"].startswith("dagster-")

    v3 = _register(client, _scorer(1.0, seed=3))  # better
    third = _promote(client, v3, task)
    assert third.promoted and third.champion_version == v1
    assert third.candidate_score > third.champion_score
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == v3
    assert client.get_model_version(NAME, v3).tags[R.ALIAS_TAG] == "champion"


def test_a_failing_gate_never_moves_the_champion(client):
    task = _validation_task()
    v1 = _register(client, _scorer(0.3, seed=1))
    assert _promote(client, v1, task).promoted
    v2 = _register(client, _scorer(1.0, seed=2))  # far better on validation, but its gate failed
    decision = _promote(client, v2, task, gates_passed=False, gate_reason="does not beat MostPopular")
    assert decision.alias == "challenger"
    assert decision.reason == "quality gate failed: does not beat MostPopular"
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == v1
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == v2


def test_a_first_version_with_a_failing_gate_is_no_champion(client):
    v1 = _register(client, _scorer(1.0, seed=1))
    decision = _promote(client, v1, _validation_task(), gates_passed=False, gate_reason="gate")
    assert decision.alias == "challenger"
    assert R.current_champion(client, NAME) is None


def test_a_champion_that_does_not_fit_the_new_data_loses(client):
    task = _validation_task()
    v1 = _register(client, _scorer(1.0, seed=1))
    assert _promote(client, v1, task).promoted
    v2 = _register(client, _scorer(0.0, seed=2))

    def unfit(champion):
        raise R.ChampionDoesNotFit("feature tables (model, data): {'num_items': (12, 20)}")

    decision = R.promote(client, NAME, v2, 0.0, unfit, True, metric="validation_ndcg@10")
    assert decision.promoted and decision.champion_version == v1
    assert "cannot be scored on the new data" in decision.reason and "num_items" in decision.reason
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == v2


def _two_tower_folder(folder: Path, meta) -> Path:
    """An (untrained) Two Tower model folder in the layout training.model_files saves."""
    from recsys_assets.models.features import FeatureSpec
    from recsys_assets.models.two_tower import TwoTowerModelConfig, build_two_tower
    from recsys_assets.training.model_files import save_two_tower

    spec, cfg = FeatureSpec.from_meta(meta), TwoTowerModelConfig(embedding_dim=8, layer_sizes=(8,))
    torch.manual_seed(0)
    model = build_two_tower(spec, cfg)
    folder.mkdir(parents=True)
    fit = SimpleNamespace(
        state_dict=model.state_dict(),
        model_config=cfg.to_dict(),
        feature_spec=dataclasses.asdict(spec),
        fit_folders=("train",),
    )
    save_two_tower(folder, fit, "validation")
    return folder


def test_two_tower_score_is_the_evaluator_on_validation_and_refuses_a_changed_catalogue(tmp_path):
    data = write_synthetic_dataset(tmp_path / "ds", num_users=60, num_items=40, min_len=5, max_len=8)
    write_synthetic_dataset(tmp_path / "ds2", num_users=60, num_items=50, min_len=5, max_len=8)
    folder = _two_tower_folder(tmp_path / "model", data.meta)
    score = R.two_tower_validation_score(folder, tmp_path / "ds", k=10)
    assert 0.0 <= score <= 1.0
    assert R.two_tower_validation_score(folder, tmp_path / "ds", k=10) == score  # deterministic
    # the message names the table that changed, the model's size and the data's
    with pytest.raises(R.ChampionDoesNotFit, match=r"'num_items': \(40, 50\)") as err:
        R.two_tower_validation_score(folder, tmp_path / "ds2", k=10)
    assert "num_users" not in str(err.value)  # unchanged tables are not reported


def test_inputs_are_logged_as_mlflow_datasets(client, tmp_path):
    run = client.create_run(client.get_experiment_by_name("registry").experiment_id)
    R.log_input_folders(
        client,
        run.info.run_id,
        {
            "train": {"name": "mds_splits/train", "path": tmp_path / "train", "rows": 123, "data_version": "abc"},
            "validation": {"name": "mds_splits/validation", "path": tmp_path / "val", "rows": 7, "data_version": None},
        },
    )
    inputs = client.get_run(run.info.run_id).inputs.dataset_inputs
    by_name = {i.dataset.name: i for i in inputs}
    assert set(by_name) == {"mds_splits/train", "mds_splits/validation"}
    train = by_name["mds_splits/train"]
    assert train.dataset.digest == "abc" and str(tmp_path / "train") in train.dataset.source
    assert '"rows": 123' in train.dataset.profile
    assert {t.key: t.value for t in train.tags}["mlflow.data.context"] == "train"
    assert len(by_name["mds_splits/validation"].dataset.digest) == 36  # no data version: a hash of the entry


def test_version_url_and_lookup_by_run(client):
    v1 = _register(client, _scorer(0.5, seed=1))
    run_id = client.get_model_version(NAME, v1).run_id
    assert R.version_of_run(client, NAME, run_id) == v1
    assert R.version_of_run(client, NAME, "no-such-run") is None
    assert R.model_version_url("http://h:5000/", NAME, v1) == f"http://h:5000/#/models/{NAME}/versions/{v1}"
