"""A budgeted search of training settings with Optuna (seeded TPE), scored on a validation metric.

`search_settings` runs trials of an objective within a `SearchBudget` (trials and wall-clock); each trial can be a
nested MLflow run under the asset's run (`MlflowTrialRuns`), and a trial that raises or runs past its time is
recorded as FAIL and skipped. The first trial is the configured settings, so the chosen ones are never worse on
the validation metric. `search_two_tower` / `search_dlrm` are the two models' spaces and objectives; neither reads
test data: the Two Tower trains its validation phase (fit on train, early-stopped on validation), the DLRM
scores only its selection set (the holdout users' lists).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from recsys_assets.data.ranker_features import SPARSE_SWITCHES

# The trials' columns of the markdown table, in order.
TABLE_COLUMNS = ("trial", "state", "value", "seconds", "params", "mlflow run", "error")
# Longest error text kept per trial (table, MLflow tag).
ERROR_CHARS = 500


@dataclasses.dataclass(frozen=True)
class SearchBudget:
    trials: int = 0  # trials at most (0: no search)
    timeout_seconds: float = 600.0  # wall-clock of the whole search: no trial starts after it, a running one stops
    trial_timeout_seconds: float = 300.0  # a trial running longer is stopped and recorded as failed
    seed: int = 0  # seeds the sampler

    def __post_init__(self) -> None:
        if self.trials < 0 or self.timeout_seconds <= 0 or self.trial_timeout_seconds <= 0:
            raise ValueError(
                f"a search budget needs trials >= 0 and positive timeouts, got {self.trials}, "
                f"{self.timeout_seconds}, {self.trial_timeout_seconds}"
            )


# ------------------------------------------------------------------------------------------------ the space
@dataclasses.dataclass(frozen=True)
class FloatRange:
    low: float
    high: float
    log: bool = False

    def suggest(self, trial, name: str) -> float:
        return trial.suggest_float(name, self.low, self.high, log=self.log)

    def contains(self, value: Any) -> bool:
        return _is_number(value) and self.low <= value <= self.high


@dataclasses.dataclass(frozen=True)
class IntRange:
    low: int
    high: int

    def suggest(self, trial, name: str) -> int:
        return trial.suggest_int(name, self.low, self.high)

    def contains(self, value: Any) -> bool:
        return _is_number(value) and float(value).is_integer() and self.low <= value <= self.high


@dataclasses.dataclass(frozen=True)
class Choice:
    options: tuple[Any, ...]  # None, bool, int, float or str (Optuna's categorical values)

    def suggest(self, trial, name: str) -> Any:
        return trial.suggest_categorical(name, list(self.options))

    def contains(self, value: Any) -> bool:
        # True == 1 in Python: a switch and a count must not stand for each other
        return any(o == value and isinstance(o, bool) == isinstance(value, bool) for o in self.options)


Space = Mapping[str, FloatRange | IntRange | Choice]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --------------------------------------------------------------------------------------------- the trials
@dataclasses.dataclass(frozen=True)
class Trial:
    """What an objective gets besides the parameters."""

    number: int
    timeout_seconds: float  # the trial's training must stop by then (the launcher kills it)
    mlflow_run_id: str | None  # the trial's nested run: its training reports the epochs there


Objective = Callable[[dict[str, Any], Trial], float]


@dataclasses.dataclass
class TrialRecord:
    number: int
    params: dict[str, Any]
    value: float | None  # None: the trial failed
    state: str  # COMPLETE | FAIL
    seconds: float
    mlflow_run_id: str | None
    error: str | None = None


@dataclasses.dataclass
class SearchResult:
    metric: str  # the validation metric the trials were scored on
    direction: str  # maximize | minimize
    best_params: dict[str, Any] | None  # None: no trial succeeded
    best_value: float | None
    settings: dict[str, Any]  # the chosen settings (best_params as config values); {} when no trial succeeded
    trials: list[TrialRecord]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def markdown(self) -> str:
        """The trial table (number, state, value, seconds, params, MLflow run, error)."""
        rows = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
        for t in self.trials:
            params = ", ".join(f"{k}={_short(v)}" for k, v in t.params.items())
            value = "" if t.value is None else f"{t.value:.4f}"
            error = (t.error or "").replace("|", "/").replace("\n", " ")
            cells = (t.number, t.state, value, f"{t.seconds:.1f}", params, t.mlflow_run_id or "", error)
            rows.append("| " + " | ".join(str(c) for c in cells) + " |")
        return "\n".join(rows)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class MlflowTrialRuns:
    """Each trial as an MLflow run nested under the asset's run (tag ``mlflow.parentRunId``: the UI lists it
    below its parent): the trial's params, its metric and FINISHED, or FAILED with an ``error`` tag."""

    def __init__(self, tracking_uri: str, parent_run_id: str) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.parent_run_id = parent_run_id
        parent = self.client.get_run(parent_run_id)
        self.experiment_id = parent.info.experiment_id
        self.parent_name = parent.info.run_name or parent_run_id[:8]

    def start(self, number: int, params: Mapping[str, Any]) -> str:
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"{self.parent_name}-trial-{number}",
            tags={"mlflow.parentRunId": self.parent_run_id, "search.trial": str(number)},
        )
        for name, value in params.items():
            self.client.log_param(run.info.run_id, name, value)
        return run.info.run_id

    def end(self, record: TrialRecord, metric: str) -> None:
        from recsys_assets.training.reporting import mlflow_key

        run_id = record.mlflow_run_id
        if record.value is not None:
            self.client.log_metric(run_id, f"search_{mlflow_key(metric)}", record.value)
        self.client.log_metric(run_id, "search_trial_seconds", record.seconds)
        if record.error is not None:
            self.client.set_tag(run_id, "error", record.error)
        self.client.set_terminated(run_id, status="FINISHED" if record.state == "COMPLETE" else "FAILED")


class _TrialFailed(Exception):
    """Raised to Optuna for a trial already recorded as failed: it marks the trial FAIL and goes on."""


def search_settings(
    objective: Objective,
    space: Space,
    budget: SearchBudget,
    *,
    metric: str,
    direction: str = "maximize",
    baseline: Mapping[str, Any] | None = None,
    to_settings: Callable[[dict[str, Any]], dict[str, Any]] = dict,
    trial_runs: MlflowTrialRuns | None = None,
    log: Callable[[str], None] = print,
    clock: Callable[[], float] = time.monotonic,
) -> SearchResult:
    """Up to `budget.trials` trials of ``objective(params, trial) -> metric`` with a seeded TPE sampler.

    The first trial takes the `baseline` values that lie in `space` (the configured settings). A trial that raises
    an Exception, returns a non-finite value or runs past its limit is recorded as FAIL with the error and
    skipped. A trial's limit is `trial_timeout_seconds`, cut to what is left of `timeout_seconds`, and is handed
    to the objective to stop its training; no trial starts once `timeout_seconds` is spent. `to_settings` turns
    the best parameters into config values (`SearchResult.settings`). `clock` measures the budget and the trials
    (seconds; a test passes its own)."""
    import optuna

    if direction not in ("maximize", "minimize"):
        raise ValueError(f"direction must be maximize or minimize, got {direction!r}")
    study = optuna.create_study(direction=direction, sampler=optuna.samplers.TPESampler(seed=budget.seed))
    fixed = {name: v for name, v in (baseline or {}).items() if name in space and space[name].contains(v)}
    if fixed:
        study.enqueue_trial(fixed)
    records: list[TrialRecord] = []
    start = clock()

    def run_trial(optuna_trial) -> float:
        params = {name: dim.suggest(optuna_trial, name) for name, dim in space.items()}
        limit = max(0.0, min(budget.trial_timeout_seconds, budget.timeout_seconds - (clock() - start)))
        number = optuna_trial.number
        run_id = trial_runs.start(number, params) if trial_runs else None
        log(f"search trial {number} (limit {limit:.0f} s): {params}")
        t0 = clock()
        value, error = None, None
        try:
            value = float(objective(params, Trial(number, limit, run_id)))
            if not math.isfinite(value):
                error = f"the objective returned {value}"
        except Exception as exc:  # noqa: BLE001 - any failure of one trial is recorded and skipped
            error = f"{type(exc).__name__}: {exc}"
        except BaseException as exc:  # interrupted (Ctrl-C, run terminated): the nested run fails, then re-raise
            if trial_runs:
                trial_runs.end(_record(number, params, None, clock() - t0, run_id, repr(exc)), metric)
            raise
        seconds = clock() - t0
        if error is None and seconds > limit:
            # an objective that does not stop itself in time: its value is not used
            error = f"ran {seconds:.1f} s, past its limit of {limit:.1f} s"
        record = _record(number, params, None if error else value, seconds, run_id, error)
        records.append(record)
        if trial_runs:
            trial_runs.end(record, metric)
        outcome = f"{metric}={record.value}" if error is None else error
        log(f"search trial {number}: {record.state} in {seconds:.1f} s, {outcome}")
        if error is not None:
            raise _TrialFailed(error)
        return value

    def stop_when_spent(study, _trial) -> None:
        """No trial starts once the budget is spent (checked after each trial, as Optuna's own timeout is)."""
        if clock() - start >= budget.timeout_seconds:
            study.stop()

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial is logged above, without Optuna's traceback
    try:
        study.optimize(run_trial, n_trials=budget.trials, catch=(_TrialFailed,), callbacks=[stop_when_spent])
    finally:
        optuna.logging.set_verbosity(verbosity)
    return _result(records, metric, direction, to_settings, clock() - start)


def _record(number, params, value, seconds, run_id, error) -> TrialRecord:
    error = None if error is None else error[:ERROR_CHARS]
    state = "FAIL" if error is not None else "COMPLETE"
    return TrialRecord(number, dict(params), value, state, seconds, run_id, error)


def _result(records, metric, direction, to_settings, seconds) -> SearchResult:
    """The best completed trial (the earliest of equals: the configured settings win a tie)."""
    done = [r for r in records if r.state == "COMPLETE"]
    sign = 1.0 if direction == "maximize" else -1.0
    best = max(done, key=lambda r: (sign * r.value, -r.number)) if done else None
    return SearchResult(
        metric=metric,
        direction=direction,
        best_params=None if best is None else dict(best.params),
        best_value=None if best is None else best.value,
        settings={} if best is None else to_settings(dict(best.params)),
        trials=records,
        seconds=seconds,
    )


# ----------------------------------------------------------------------------------------- the two models
# Launch: ``launch(fn, config, progress_file=path, timeout_seconds=s)`` runs fn(config) on every rank (runs.py).
# MakeConfig: ``make_config(settings, **run_fields)`` -> the training config of the asset's config updated with
# `settings` (names of the asset's config fields) and the run's fields.
Launch = Callable[..., Any]
MakeConfig = Callable[..., Any]


def two_tower_space(epochs: int, history_length: int) -> dict[str, FloatRange | IntRange | Choice]:
    """Learning rates, width, temperature, log-Q correction, negatives, history features, the query encoder (bag
    or sequence: a table without order keeps the bag available) and its attention settings, weight decay and the
    most epochs (early stopping picks the count below it); history settings stay within the splits'. The
    attention settings are drawn in every trial and read only by the sequence encoder."""
    histories = tuple(h for h in (5, 10) if h < history_length)
    return {
        "sparse_lr": FloatRange(0.01, 0.2, log=True),
        "dense_lr": FloatRange(1e-4, 1e-2, log=True),
        "embedding_dim": Choice((16, 32, 64)),
        "temperature": FloatRange(0.02, 0.2, log=True),
        "logq_correction": Choice((True, False)),
        "num_uniform_negatives": Choice((0, 64, 256)),
        "max_history": Choice((None, *histories)),  # None: the whole history
        "recent_items": IntRange(0, min(3, history_length)),
        "use_user_id": Choice((True, False)),
        "query_encoder": Choice(("bag", "sequence")),
        "sequence_blocks": IntRange(1, 2),
        "sequence_heads": Choice((1, 2)),  # both divide every embedding_dim above
        "sequence_dropout": FloatRange(0.0, 0.5),
        "weight_decay": Choice((0.0, 1e-5, 1e-4)),
        "epochs": IntRange(max(1, epochs // 2), epochs),
    }


def search_two_tower(
    launch: Launch,
    make_config: MakeConfig,
    budget: SearchBudget,
    *,
    baseline: Mapping[str, Any],
    history_length: int,
    work_dir: Path,
    trial_runs: MlflowTrialRuns | None = None,
    log: Callable[[str], None] = print,
) -> SearchResult:
    """Each trial trains the validation phase (train only, early-stopped on validation) and scores its
    early-stopping metric on validation; trial progress files go to `work_dir`. `baseline`: the configured
    settings (the first trial, and the epoch cap)."""
    from recsys_assets.training.two_tower import train_two_tower

    metric = make_config({}).early_stopping_metric
    work_dir.mkdir(parents=True, exist_ok=True)

    def objective(params: dict[str, Any], trial: Trial) -> float:
        progress = work_dir / f"trial_{trial.number}.progress.jsonl"
        config = make_config(
            params,
            eval_phase="validation",
            mlflow_run_id=trial.mlflow_run_id,
            progress_file=str(progress),
            checkpoint_dir=None,  # a trial never resumes from (or leaves) the asset's checkpoints
        )
        result = launch(train_two_tower, config, progress_file=progress, timeout_seconds=trial.timeout_seconds)
        return result.final_metrics[metric]

    result = search_settings(
        objective,
        two_tower_space(int(baseline["epochs"]), history_length),
        budget,
        metric=f"validation_{metric}",
        baseline=baseline,
        trial_runs=trial_runs,
        log=log,
    )
    return _saved(result, work_dir)


def dlrm_space(epochs: int) -> dict[str, FloatRange | IntRange | Choice]:
    """Learning rates, width, weight decay, the sparse feature switches and the most epochs."""
    return {
        "sparse_lr": FloatRange(5e-4, 0.05, log=True),
        "dense_lr": FloatRange(3e-4, 1e-2, log=True),
        "embedding_dim": Choice((8, 16, 32)),
        "weight_decay": Choice((0.0, 1e-5, 1e-4)),
        **{name: Choice((False, True)) for name in SPARSE_SWITCHES},  # the asset's switches: they choose the layout
        "epochs": IntRange(max(1, epochs // 2), epochs),
    }


def search_dlrm(
    launch: Launch,
    make_config: MakeConfig,
    budget: SearchBudget,
    *,
    baseline: Mapping[str, Any],
    work_dir: Path,
    trial_runs: MlflowTrialRuns | None = None,
    log: Callable[[str], None] = print,
) -> SearchResult:
    """Each trial trains the DLRM and scores its early-stopping metric on the selection set (the holdout lists);
    the other evaluation sets (test) are dropped from the trial's config. The bottom MLP's last size follows the
    embedding width. `baseline`: the configured settings (the first trial, the epoch cap, the bottom MLP)."""
    from recsys_assets.training.dlrm import LOWER_IS_BETTER, train_dlrm

    bottom = tuple(baseline["bottom_layer_sizes"])

    def to_settings(params: dict[str, Any]) -> dict[str, Any]:
        settings = dict(params)
        if "embedding_dim" in params:
            settings["bottom_layer_sizes"] = [*bottom[:-1], int(params["embedding_dim"])]
        return settings

    base = make_config({})
    if base.selection_set is None:
        raise ValueError("a DLRM search needs a selection_set (a validation set) to score the trials on")
    selection, metric = base.selection_set, base.early_stopping_metric
    work_dir.mkdir(parents=True, exist_ok=True)

    def objective(params: dict[str, Any], trial: Trial) -> float:
        progress = work_dir / f"trial_{trial.number}.progress.jsonl"
        config = make_config(
            to_settings(params),
            mlflow_run_id=trial.mlflow_run_id,
            progress_file=str(progress),
            checkpoint_dir=None,  # a trial never resumes from (or leaves) the asset's checkpoints
        )
        # the selection set only: a trial never scores the test pairs
        config = dataclasses.replace(config, eval_sets={selection: config.eval_sets[selection]}, final_sets={})
        result = launch(train_dlrm, config, progress_file=progress, timeout_seconds=trial.timeout_seconds)
        return result.final_metrics[selection][metric]

    result = search_settings(
        objective,
        dlrm_space(int(baseline["epochs"])),
        budget,
        metric=f"{selection}_{metric}",
        direction="minimize" if metric in LOWER_IS_BETTER else "maximize",
        baseline=baseline,
        to_settings=to_settings,
        trial_runs=trial_runs,
        log=log,
    )
    return _saved(result, work_dir)


def _saved(result: SearchResult, work_dir: Path) -> SearchResult:
    """`result` also as `work_dir`/search.json (published with the model folder)."""
    (work_dir / "search.json").write_text(json.dumps(result.to_dict(), indent=2))
    return result
