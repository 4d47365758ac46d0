"""The model assets' MLflow Model Registry step (logic: recsys_assets.serving.registry): the run's input data as
MLflow datasets, a new registered model version tagged with the Dagster run and the data version, and the
champion / challenger decision, returned as asset metadata."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import dagster as dg

from recsys_assets.data.checks import CheckOutcome
from recsys_assets.defs.constants import TOP_K
from recsys_assets.defs.resources import MLflowRun, StateResource, root_run_id

DATA_VERSION_TAG = "dagster/data_version"


def input_data_version(context, asset: str) -> str | None:
    """The Dagster data version of `asset`'s latest materialization (the one this run reads), if recorded."""
    event = context.instance.get_latest_materialization_event(dg.AssetKey(asset))
    return None if event is None else (event.tags or {}).get(DATA_VERSION_TAG)


def register_model(
    context,
    run: MLflowRun,
    model_info: Any,
    *,
    model: str,
    build: Path,
    data: tuple[str, str, Mapping[str, tuple[Path, int]]],
    gate: CheckOutcome,
    score: Callable[[Path], float] | None,
    metric: str,
) -> tuple[str, dict]:
    """Logs the inputs (`data`: input asset, its published folder, {context: (path, rows)}), registers the model
    `model_info` of `run` as a version of serving.registry.REGISTERED_MODELS[model] and promotes it (`gate`: the
    asset's own quality gate; `score(model folder)`: `metric` on the new validation data, for this model (its
    `build` folder) and the champion (its stored folder: `champion_folder`); None: passing the gate is enough,
    registry.promote). Returns (version, metadata)."""
    from recsys_assets.serving import registry as R

    asset, data_path, splits = data
    version = input_data_version(context, asset)
    client = run.resource.client()
    R.log_input_folders(
        client,
        run.id,
        {
            split: {"name": f"{asset}/{split}", "path": str(path), "rows": int(rows), "data_version": version}
            for split, (path, rows) in splits.items()
        },
    )
    name = R.REGISTERED_MODELS[model]
    tags = {
        "dagster.run_id": context.run.run_id,
        "dagster.root_run_id": root_run_id(context),
        "dagster.asset_key": context.asset_key.to_user_string(),
        "data_path": data_path,
        "data_version": version or "",
        "gates_passed": gate.passed,
        R.METRIC_TAG: metric,
    }
    mv = R.register_version(client, name, model_info, run.id, tags)
    decision = R.promote(
        client,
        name,
        mv.version,
        None if score is None else lambda: score(build),
        None
        if score is None
        else lambda champion: score(champion_folder(context.instance, champion, context.resources.state)),
        gate.passed,
        gate_reason=gate.description or "",
        metric=metric,
    )
    context.log.info(f"{name} v{mv.version}: {decision.alias} ({decision.reason})")
    return str(mv.version), {
        "registered_model": name,
        "model_version": str(mv.version),
        "model_version_url": dg.MetadataValue.url(R.model_version_url(run.resource.ui_url, name, mv.version)),
        "registry_alias": decision.alias,
        "registry_reason": decision.reason,
        "registry_previous_champion": decision.champion_version or "",
        "data_version": version or "",
    }


def register_two_tower(context, run: MLflowRun, model_info, build: Path, mds_root: str, meta) -> tuple[str, dict]:
    """`register_model` for the Two Tower: gate = validation NDCG@K beats MostPopular (the blocking check's
    code); champion comparison = the train-only fits' validation NDCG@K on the new mds_splits."""
    from recsys_assets.data import schema as S
    from recsys_assets.evaluation.gates import two_tower_beats_most_popular
    from recsys_assets.serving.registry import two_tower_validation_score

    paths = S.DatasetPaths(Path(mds_root))
    return register_model(
        context,
        run,
        model_info,
        model="two_tower",
        build=build,
        data=("mds_splits", mds_root, {split: (paths.mds(split), rows) for split, rows in meta.rows.items()}),
        gate=two_tower_beats_most_popular(build, mds_root, k=TOP_K),
        score=lambda folder: two_tower_validation_score(folder, mds_root, TOP_K),
        metric=f"validation_ndcg@{TOP_K}",
    )


def register_dlrm(
    context, run: MLflowRun, model_info, build: Path, ranking_root: str, info: dict, gate_evidence: dict
) -> tuple[str, dict]:
    """`register_model` for the DLRM: gate = the holdout-list gate (DLRM order >= Two Tower order + min gain);
    champion comparison = both DLRMs' NDCG@K over the new ranking_dataset's holdout lists."""
    from recsys_assets.evaluation.gates import two_stage_at_least_two_tower
    from recsys_assets.serving.registry import dlrm_holdout_score

    root = Path(ranking_root)
    files = {"train": root / "mds" / "train", "holdout": root / "holdout.parquet", "test": root / "test.parquet"}
    return register_model(
        context,
        run,
        model_info,
        model="dlrm",
        build=build,
        data=("ranking_dataset", ranking_root, {k: (p, info["rows"].get(k, 0)) for k, p in files.items()}),
        gate=two_stage_at_least_two_tower(gate_evidence, k=TOP_K),
        score=lambda folder: dlrm_holdout_score(folder, ranking_root, TOP_K),
        metric=f"holdout_ndcg@{TOP_K}",
    )


def register_two_stage(context, run: MLflowRun, model_info, bundle: Path, gate: CheckOutcome) -> tuple[str, dict]:
    """`register_model` for the online funnel: gate = `evaluation.gates.two_stage_model_gate`; no champion
    comparison of its own (its models were compared with theirs when they were registered)."""
    from recsys_assets.serving.online import QUERIES_FILE

    return register_model(
        context,
        run,
        model_info,
        model="two_stage",
        build=bundle,
        data=("recommendations", str(bundle), {"queries": (bundle / QUERIES_FILE, 0)}),
        gate=gate,
        score=None,
        metric="online_equals_batch",
    )


def champion_folder(instance: dg.DagsterInstance, champion, state: StateResource) -> Path:
    """The stored folder of a champion ModelVersion: the materialization of its asset by its Dagster run (the
    version's ``dagster.asset_key`` / ``dagster.run_id`` tags), as the I/O manager recorded it. ChampionDoesNotFit
    when it cannot be found or read (never materialized, pruned, deleted)."""
    from recsys_assets.defs.storage import stored_folder
    from recsys_assets.serving.registry import ChampionDoesNotFit

    tags = champion.tags or {}
    asset, run_id = tags.get("dagster.asset_key"), tags.get("dagster.run_id")
    if not asset or not run_id:
        raise ChampionDoesNotFit("its version has no dagster.asset_key / dagster.run_id tags: its folder is missing")
    try:
        folder = stored_folder(instance, dg.AssetKey.from_user_string(asset), run_id, state)
    except dg.Failure as exc:
        raise ChampionDoesNotFit(f"its model folder is missing: {exc.description}") from exc
    if folder is None:
        raise ChampionDoesNotFit(f"its model folder is missing: run {run_id} stored no {asset} in this instance")
    return folder


def served_versions(mlflow, two_tower_run_id: str, dlrm_model) -> dict[str, Any]:
    """The registered versions behind a recommendations table, as metadata: the DLRM's from its asset value, the
    Two Tower's (the run that proposed the candidates) looked up by its MLflow run; links to their pages."""
    from recsys_assets.serving import registry as R

    versions = {
        "two_tower": R.version_of_run(mlflow.client(), R.REGISTERED_MODELS["two_tower"], two_tower_run_id),
        "dlrm": dlrm_model.model_version,
    }
    metadata: dict[str, Any] = {f"{m}_version": v or "" for m, v in versions.items()}
    for m, v in versions.items():
        if v:
            url = R.model_version_url(mlflow.ui_url, R.REGISTERED_MODELS[m], v)
            metadata[f"{m}_version_url"] = dg.MetadataValue.url(url)
    return metadata
