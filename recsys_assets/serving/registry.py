"""The MLflow Model Registry side of the model assets: each trained model becomes a version of a registered model
(`register_version`), and `promote` decides whether the alias ``champion`` moves to it.

The rule: a new version becomes champion only if its quality gate passed AND it is not worse than the current
champion re-scored on the NEW validation data with the same scorer (`two_tower_validation_score`,
`dlrm_holdout_score`); a champion that cannot be scored on the new data (catalogue changed: its tables do not fit,
or its model folder is gone) loses. Otherwise the new version gets ``challenger`` and the reason says why.
No Dagster here: a plain `MlflowClient` and published model folders."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

CHAMPION = "champion"
CHALLENGER = "challenger"
REGISTERED_MODELS = {"two_tower": "recsys_two_tower", "dlrm": "recsys_dlrm", "two_stage": "recsys_two_stage"}
# model version tags
ALIAS_TAG = "registry_alias"
REASON_TAG = "registry_reason"
SCORE_TAG = "registry_score"  # the new version's score on the new validation data, when compared with a champion
METRIC_TAG = "registry_metric"


class ChampionDoesNotFit(Exception):
    """The champion cannot be scored on the new data (its feature tables do not fit the new catalogue, or its
    files are gone): the new version wins."""


@dataclasses.dataclass(frozen=True)
class Decision:
    """Where `promote` put a new version: `alias` (champion / challenger) and why; `champion_version` is the
    champion before the decision (None: there was none), with both scores when they were compared."""

    alias: str
    reason: str
    champion_version: str | None = None
    candidate_score: float | None = None
    champion_score: float | None = None

    @property
    def promoted(self) -> bool:
        return self.alias == CHAMPION


def model_version_url(ui_url: str, name: str, version: str | int) -> str:
    """The version's page in the MLflow UI."""
    return f"{ui_url.rstrip('/')}/#/models/{name}/versions/{version}"


def current_champion(client, name: str):
    """The ModelVersion holding the `champion` alias of `name`, or None (no such model or alias yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def version_of_run(client, name: str, run_id: str) -> str | None:
    """The latest version of registered model `name` registered from MLflow run `run_id`, or None."""
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return str(max(int(v.version) for v in versions)) if versions else None


def register_version(client, name: str, model_info: Any, run_id: str, tags: Mapping[str, Any]):
    """A new version of registered model `name` (created if missing) from a model logged by `run_id`
    (`model_info`: mlflow's ModelInfo of that log_model), with `tags` (str values). Returns the ModelVersion."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    try:
        client.create_registered_model(name, description="Versions registered by the recsys_assets model assets.")
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    model_id = getattr(model_info, "model_id", None)
    source = f"models:/{model_id}" if model_id else model_info.model_uri
    return client.create_model_version(
        name, source, run_id=run_id, tags={k: str(v) for k, v in tags.items()}, model_id=model_id
    )


def promote(
    client,
    name: str,
    version: str | int,
    candidate_score: float | Callable[[], float] | None,
    champion_score_fn: Callable[[Any], float] | None,
    gates_passed: bool,
    *,
    gate_reason: str = "",
    metric: str = "score",
) -> Decision:
    """Sets ``champion`` on `version` of `name` when `gates_passed` and `candidate_score` (a number, or a function
    computing it, called only when there is a champion to compare with) >= `champion_score_fn(champion
    ModelVersion)` (the champion on the new data; may raise ChampionDoesNotFit), else ``challenger``. Without a
    `champion_score_fn` (a model made of registered models that were compared themselves: the two-stage funnel),
    passing the gates is enough. Records the decision as the version's tags; returns it. Ties go to the new
    version (it is trained on newer data)."""
    version = str(version)
    champion = current_champion(client, name)
    old = None if champion is None else str(champion.version)
    if not gates_passed:
        decision = Decision(CHALLENGER, f"quality gate failed: {gate_reason or 'no reason given'}", old)
    elif champion is None:
        decision = Decision(CHAMPION, "gates passed; no champion yet", None)
    elif old == version:
        decision = Decision(CHAMPION, "already the champion", old)
    elif champion_score_fn is None:
        decision = Decision(CHAMPION, f"gates passed; replaces v{old}", old)
    else:
        decision = _compare(old, candidate_score, champion, champion_score_fn, metric)
    client.set_registered_model_alias(name, decision.alias, version)
    client.set_model_version_tag(name, version, ALIAS_TAG, decision.alias)
    client.set_model_version_tag(name, version, REASON_TAG, decision.reason[:5000])
    if decision.candidate_score is not None:  # scored only when compared with a champion
        client.set_model_version_tag(name, version, SCORE_TAG, f"{decision.candidate_score:.6f}")
    return decision


def _compare(old: str, candidate_score, champion, champion_score_fn, metric: str) -> Decision:
    try:
        champ = float(champion_score_fn(champion))
    except ChampionDoesNotFit as exc:
        return Decision(
            CHAMPION, f"champion v{old} cannot be scored on the new data ({exc}): the new version wins", old
        )
    cand = float(candidate_score() if callable(candidate_score) else candidate_score)
    if cand >= champ:
        reason = f"{metric} {cand:.4f} >= champion v{old}'s {champ:.4f} on the new validation data"
        return Decision(CHAMPION, reason, old, cand, champ)
    reason = f"{metric} {cand:.4f} < champion v{old}'s {champ:.4f} on the new validation data: v{old} stays champion"
    return Decision(CHALLENGER, reason, old, cand, champ)


# ------------------------------------------------------------------------------------------------ scorers
def two_tower_validation_score(model_root, dataset_root: str | Path, k: int) -> float:
    """NDCG@k on the validation split of `dataset_root` of a Two Tower folder's train-only fit (its validation
    phase model: the served refit saw the validation rows), through the one evaluator (full ranking, fit items
    excluded). ChampionDoesNotFit when its feature spec's tables do not fit the dataset."""
    import torch

    from recsys_assets.data import schema as S
    from recsys_assets.data.splits import load_splits_frame
    from recsys_assets.evaluation.gates import EVAL_COLUMNS
    from recsys_assets.evaluation.protocol import EvalTask, evaluate
    from recsys_assets.models.features import FeatureSpec
    from recsys_assets.models.two_tower import ItemEncoder
    from recsys_assets.serving.candidates import serving_queries
    from recsys_assets.training.model_files import load_trained_two_tower

    meta = S.DatasetMeta.load(S.DatasetPaths(Path(dataset_root)).meta)
    _, spec = load_trained_two_tower(model_root, phase="validation")
    fresh = FeatureSpec.from_meta(meta)
    fields = ("num_users", "num_items", "num_categories", "user_attributes")
    diff = {f: (getattr(spec, f), getattr(fresh, f)) for f in fields if getattr(spec, f) != getattr(fresh, f)}
    if diff:
        raise ChampionDoesNotFit(f"feature tables (model, data): {diff}")
    frame = load_splits_frame(dataset_root, EVAL_COLUMNS)
    model, store, states, qv = serving_queries(model_root, dataset_root, "validation", all_users=False)
    with torch.no_grad():
        iv = ItemEncoder(model, store).encode_all()
    row_of = {int(u): i for i, u in enumerate(states.users)}
    task = EvalTask.from_splits(frame, "validation", num_users=meta.num_users, num_items=meta.num_items)
    result = evaluate(lambda users: qv[torch.as_tensor([row_of[int(u)] for u in users])] @ iv.T, task, ks=(k,))
    return float(result[f"ndcg@{k}"])


def dlrm_holdout_score(model_root, ranking_root: str | Path, k: int) -> float:
    """NDCG@k of a DLRM folder's order of the holdout users' candidate lists of `ranking_root` (the evidence of
    the ranker's gate, evaluation.gates.holdout_gate). ChampionDoesNotFit when its embedding tables or dense
    width do not fit that dataset."""
    from recsys_assets.evaluation.gates import holdout_gate
    from recsys_assets.serving.rerank import dlrm_scores
    from recsys_assets.training.model_files import load_dlrm_model

    info = json.loads((Path(ranking_root) / "meta.json").read_text())
    _, layout, cfg = load_dlrm_model(model_root)
    diff = {
        f.name: (f.num_embeddings, _table_size(info, f)) for f in layout if f.num_embeddings != _table_size(info, f)
    }
    if len(info["dense_features"]) != cfg.dense_in_features:
        diff["dense_features"] = (cfg.dense_in_features, len(info["dense_features"]))
    if diff:
        raise ChampionDoesNotFit(f"feature tables (model, data): {diff}")
    holdout = Path(ranking_root) / "holdout.parquet"
    gate = holdout_gate(holdout, dlrm_scores(model_root, holdout), min_gain=0.0, k=k)
    return float(gate["holdout_two_stage"][f"ndcg@{k}"])


def _table_size(info: Mapping[str, Any], feature) -> int | None:
    sizes = {"user": "num_users", "item": "num_items", "category": "num_categories"}
    if feature.table in sizes:
        return int(info[sizes[feature.table]])
    return info.get("attribute_cardinalities", {}).get(feature.table)


# ------------------------------------------------------------------------------------------------ inputs
def log_input_folders(client, run_id: str, folders: Mapping[str, Mapping[str, Any]]) -> None:
    """MLflow dataset tracking of a run's inputs: one dataset per `folders` entry, context = its key
    (e.g. "train"); each value: ``path`` (the published folder), ``name``, ``rows`` (row count) and optional
    ``data_version`` (Dagster's, also the digest when given) and other profile fields."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    inputs = []
    for context, info in folders.items():
        profile = {k: v for k, v in info.items() if k not in ("path", "name")}
        version = info.get("data_version")
        digest = (
            str(version)
            if version
            else hashlib.sha256(json.dumps(dict(info), sort_keys=True, default=str).encode()).hexdigest()
        )
        dataset = Dataset(
            name=str(info["name"]),
            digest=digest[:36],  # the tracking store's limit
            source_type="local",
            source=json.dumps({"uri": str(info["path"])}),
            profile=json.dumps(profile, default=str),
        )
        inputs.append(DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    client.log_inputs(run_id, datasets=inputs)
