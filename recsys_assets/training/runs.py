"""Driver side of the model assets' training runs: the phases, launched through a launcher (TorchDistributor on
the Dagster side), and the model folder they fill (weights, result.json, sharding plan, training curves).

`launch(fn, config, progress_file=path)` runs ``fn(config)`` on every rank and returns rank 0's result;
`make_config(**phase_settings)` builds the run's training config with the given phase settings (a fresh config
per phase: the configs derive defaults from their phase)."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Launch = Callable[..., Any]
PROGRESS_FILE = "progress.jsonl"


@dataclasses.dataclass
class TwoTowerFit:
    selection: Any  # validation phase: fit on train, epochs chosen on validation (TwoTowerTrainResult)
    final: Any  # refit on train + validation for that epoch count (the served model), else `selection`
    train_seconds: float
    curves: dict[str, Path]  # "validation" / "refit" -> PNG in the model folder
    ranker: Any = None  # the ranker phase: fit on the train rows before the ranker window (None: no window)

    @property
    def refit(self) -> bool:
        return self.final is not self.selection

    def summary(self) -> dict[str, dict[str, float]]:
        """Final metrics per phase, named for the metrics table (test: ranked once, with the final weights)."""
        rows = {"validation (fit train)": self.selection.final_metrics}
        if self.refit:
            rows["test (refit train+validation)"] = self.final.final_metrics
        return rows

    def phase_metrics(self) -> dict[str, dict[str, float]]:
        """{"validation": ..., "test": ...} (test only after a refit)."""
        return {("validation" if name.startswith("validation") else "test"): m for name, m in self.summary().items()}


def fit_two_tower(
    launch: Launch,
    make_config: Callable[..., Any],
    out_dir: Path,
    checkpoints: Path,
    *,
    refit: bool,
    ranker_phase: bool = False,
    trained: Callable[[Any], Any] = lambda config: None,
    log: Callable[[str], None] = print,
) -> TwoTowerFit:
    """The validation phase (early-stopped on validation), then for the chosen epoch count and without looking
    at held-out rows in between: with `refit`, the same settings on train + validation (the served model; test
    is ranked once at the end), and with `ranker_phase`, on the train rows before the ranker window (the
    ranker's training candidates: data/phases.py). `trained(config)`: a result a settings search already
    launched for that validation config, else None; without one, every phase runs in a single launch.
    Writes model.pt (served), model_validation.pt, model_ranker.pt (training.model_files), plan.txt,
    result.json and the training curves into `out_dir`; checkpoints per phase under `checkpoints`."""
    from recsys_assets.training.model_files import save_two_tower

    progress = out_dir / PROGRESS_FILE
    t0 = time.time()

    def config_of(phase: str, **settings):
        return make_config(
            eval_phase=phase, progress_file=str(progress), checkpoint_dir=str(checkpoints / phase), **settings
        )

    later = {"test": "refit_"} if refit else {}
    if ranker_phase:
        later["ranker"] = "ranker_"
    selection, fitted = _launch_phases(launch, config_of, later, trained, progress, log)
    if selection.resumed_from_step is not None:
        log(f"validation phase resumed from step {selection.resumed_from_step} ({selection.resumed_from})")
    log(f"validation phase: best epoch {selection.best_epoch}, {selection.final_metrics}")
    final, ranker = fitted.get("test", selection), fitted.get("ranker")
    fit = TwoTowerFit(selection, final, time.time() - t0, {}, ranker)
    save_two_tower(out_dir, final, "test")
    save_two_tower(out_dir, selection, "validation")
    if ranker is not None:
        save_two_tower(out_dir, ranker, "ranker")
    (out_dir / "plan.txt").write_text(final.plan_text)
    _write_two_tower_result(out_dir, fit)
    fit.curves["validation"] = training_curves(selection.history, out_dir / "training_curves.png", "validation")
    if fit.refit:
        fit.curves["refit"] = training_curves(final.history, out_dir / "training_curves_refit.png", "refit")
    return fit


def _launch_phases(launch: Launch, config_of, later: dict[str, str], trained, progress: Path, log):
    """(validation result, {later phase: result}): one launch for every phase, or, when a search already
    trained the validation config, one launch for the later phases at its epoch count."""
    from recsys_assets.training.two_tower import train_two_tower_phases, train_two_tower_selected

    validation = config_of("validation")
    selection = trained(validation)
    if selection is None:
        # the later phases' epochs are set in the launch, from the validation phase's best epoch
        configs = [validation, *(config_of(phase, mlflow_prefix=prefix) for phase, prefix in later.items())]
        selection, *rest = launch(train_two_tower_selected, configs, progress_file=progress)
        return selection, dict(zip(later, rest))
    log("validation phase: the search trial with these settings is reused, not retrained")
    if not later:
        return selection, {}
    epochs = selection.best_epoch + 1  # the fixed-epoch fits below: same settings, no selection
    configs = [config_of(phase, mlflow_prefix=prefix, epochs=epochs) for phase, prefix in later.items()]
    return selection, dict(zip(later, launch(train_two_tower_phases, configs, progress_file=progress)))


def _write_two_tower_result(out_dir: Path, fit: TwoTowerFit) -> None:
    fits = {"validation": fit.selection, "test": fit.final if fit.refit else None, "ranker": fit.ranker}
    (out_dir / "result.json").write_text(
        json.dumps(
            {
                "validation": fit.selection.final_metrics,
                "test": fit.final.final_metrics if fit.refit else None,
                "best_epoch": fit.selection.best_epoch,
                "history_validation": fit.selection.history,
                "history_refit": fit.final.history if fit.refit else None,
                "history_ranker": fit.ranker.history if fit.ranker is not None else None,
                "fit_folders": {phase: list(r.fit_folders) for phase, r in fits.items() if r is not None},
            },
            indent=2,
            default=float,
        )
    )


CURVE_TITLES = {
    "validation": "two_tower: train loss, validation metrics",
    "refit": "two_tower refit (train+validation): train loss (test is ranked once, after the last epoch)",
}


def training_curves(history: list, path: Path, which: str) -> Path:
    from recsys_assets.evaluation.plots import training_curves_png

    return training_curves_png(history, path, CURVE_TITLES[which])


@dataclasses.dataclass
class DLRMFit:
    result: Any  # DLRMTrainResult
    gate: dict[str, Any]  # evaluation.gates.holdout_gate's evidence
    train_seconds: float
    curves: Path | None  # None when the picture could not be drawn


def dlrm_data_settings(ranking_root: str | Path, info: dict[str, Any], layout: list[dict]) -> dict[str, Any]:
    """The DLRMTrainConfig fields that point at a ranking dataset folder (`info`: its meta.json): MDS training
    pairs, the holdout lists scored each epoch (they select the epochs), the test pairs scored once at the end."""
    root = Path(ranking_root)
    return dict(
        train_mds=(str(root / "mds" / "train"),),
        layout=tuple(layout),
        dense_in_features=len(info["dense_features"]),
        selection_set="holdout",
        eval_sets={"holdout": str(root / "holdout.parquet")},
        final_sets={"test": str(root / "test.parquet")},
    )


def fit_dlrm(
    launch: Launch, make_config: Callable[..., Any], out_dir: Path, ranking_root: str | Path, *, min_gain: float, k: int
) -> DLRMFit:
    """Trains the DLRM; writes model.pt, plan.txt, result.json (with the gate's evidence on the holdout lists:
    the DLRM order vs the Two Tower's own order at `k`) and the training curves into `out_dir`."""
    from recsys_assets.evaluation.gates import holdout_gate
    from recsys_assets.training.dlrm import train_dlrm
    from recsys_assets.training.model_files import save_dlrm

    progress = out_dir / PROGRESS_FILE
    t0 = time.time()
    result = launch(train_dlrm, make_config(progress_file=str(progress)), progress_file=progress)
    train_seconds = time.time() - t0
    save_dlrm(out_dir, result)
    gate = holdout_gate(Path(ranking_root) / "holdout.parquet", result.eval_scores["holdout"], min_gain=min_gain, k=k)
    (out_dir / "result.json").write_text(
        json.dumps(
            {
                "best_epoch": result.best_epoch,
                "final_metrics": result.final_metrics,
                "history": result.history,
                "gate": gate,
                "samples_per_second": result.samples_per_second,
            },
            indent=2,
            default=float,
        )
    )
    (out_dir / "plan.txt").write_text(result.plan_text)
    return DLRMFit(result, gate, train_seconds, _dlrm_curves(result.history, out_dir / "training_curves.png"))


def _dlrm_curves(history: list, path: Path) -> Path | None:
    from recsys_assets.evaluation.plots import training_curves_png

    flat = [{"epoch": h["epoch"], "loss": h["loss"], "metrics": h["metrics"].get("holdout", {})} for h in history]
    try:
        return training_curves_png(flat, path, title="DLRM: train loss, holdout lists")
    except Exception:  # noqa: BLE001 - a picture must never fail a training run
        return None
