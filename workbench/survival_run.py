"""One survival model run on one survival cohort: fit, calibrate on tuning, evaluate, log, register.

What ``notebooks/05_survival`` calls for each model of the ``pbc_survival`` sweep. The survival
counterpart of :mod:`workbench.experiment`, with the same record (:mod:`workbench.record`): the
run sits in the task's MLflow experiment, is registered under the task's name as the same
raw-events pyfunc (:mod:`workbench.serving`), now returning one risk column per horizon.

Kinds: ``lstm`` / ``gru`` / ``rnn`` (the hazard head of :mod:`workbench.survival` on the binary
models' encoders), ``cox`` (:class:`workbench.references.LandmarkCox`) and ``mayo`` (the published
Mayo survival function). Every choice uses the tuning split: early stopping on its likelihood,
the calibration map, the Cox penalty, and the champion (tuning time-dependent AUC at
:data:`CHAMPION_HORIZON_YEARS`). Held-out is evaluated once and only reported.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import mlflow
import numpy as np
import polars as pl

from workbench import record, tracking
from workbench.errors import WorkbenchError
from workbench.features import SequenceTensors
from workbench.calibration import Recalibration
from workbench.serving import horizon_column
from workbench.survival_metrics import horizon_metric
from workbench.settings import SEQUENCE_KINDS, SURVIVAL_KINDS, ModelConfig, TrainConfig
from workbench.tasks import SURVIVAL_EVENT_COLUMN, SURVIVAL_TIME_COLUMN, TaskSpec, load_task

DAYS_PER_YEAR = 365.25
DEFAULT_HORIZONS_YEARS = (1, 2, 3, 4, 5)
CHAMPION_HORIZON_YEARS = 2
#: The tuning metric the champion rule compares: the time-dependent AUC at 2 years.
CHAMPION_METRIC = horizon_metric("td_auc", CHAMPION_HORIZON_YEARS * DAYS_PER_YEAR)
#: The fine grid (days) of the integrated Brier score and the plotted curves: every month.
GRID_STEP_DAYS = DAYS_PER_YEAR / 12


@dataclasses.dataclass
class SurvivalData:
    """A survival cohort's tensors with each row's (time, event) and the number of causes."""

    tensors: SequenceTensors
    time_days: np.ndarray
    event: np.ndarray
    n_causes: int  # 2 when the task has a competing code, else 1

    def rows(self, split: str) -> np.ndarray:
        return self.tensors.split == split


def survival_data(task: TaskSpec, labels: pl.DataFrame, tensors: SequenceTensors) -> SurvivalData:
    """Join the survival labels onto the tensors' rows (by subject and prediction time)."""
    if task.kind != "survival":
        raise WorkbenchError(f"task {task.name!r} is a {task.kind} task; survival models need a task with kind: survival")
    missing = [c for c in (SURVIVAL_TIME_COLUMN, SURVIVAL_EVENT_COLUMN) if c not in labels.columns]
    if missing:
        raise WorkbenchError(f"task {task.name!r}: the cohort's labels have no {missing} column(s); rebuild the cohort")
    keys = pl.DataFrame({"subject_id": tensors.subject_id, "prediction_time": tensors.prediction_time}).with_row_index("_row")
    joined = keys.join(labels.select("subject_id", "prediction_time", SURVIVAL_TIME_COLUMN, SURVIVAL_EVENT_COLUMN)
                       .unique(["subject_id", "prediction_time"]), on=["subject_id", "prediction_time"], how="left").sort("_row")
    if joined[SURVIVAL_TIME_COLUMN].null_count():
        raise WorkbenchError(f"task {task.name!r}: {joined[SURVIVAL_TIME_COLUMN].null_count()} tensor rows have no survival label")
    competing = bool(task.censoring.competing_codes or task.censoring.competing_patterns)
    return SurvivalData(tensors, joined[SURVIVAL_TIME_COLUMN].to_numpy().astype(np.float64),
                        joined[SURVIVAL_EVENT_COLUMN].to_numpy().astype(np.int64), 2 if competing else 1)


@dataclasses.dataclass
class SurvivalFit:
    """A fitted survival model of any kind behind ``risk(inputs, horizons_days) -> [N, H]``."""

    kind: str
    risk: Callable[[np.ndarray, np.ndarray], np.ndarray]
    keras_model: object = None
    reference: object = None
    tabular: np.ndarray | None = None  # the Cox model's inputs, one row per tensors row
    grid: object = None  # survival.HazardGrid of a hazard network
    calibration: object = None  # survival.HazardCalibration (folded into the network)
    history: list[dict] = dataclasses.field(default_factory=list)
    best_epoch: int | None = None
    seconds: float = 0.0
    options: dict = dataclasses.field(default_factory=dict)
    recalibration: Recalibration = dataclasses.field(default_factory=Recalibration)  # identity: calibration is folded

    def inputs(self, data: SurvivalData, split: str) -> np.ndarray:
        rows = data.rows(split)
        return self.tabular[rows] if self.tabular is not None else data.tensors.X[rows]


def fit_survival(kind: str, data: SurvivalData, max_days: float, model_config: ModelConfig | None = None,
                 train_config: TrainConfig | None = None, data_root=None, interval_days: float | None = None,
                 on_epoch_end=None) -> SurvivalFit:
    """Fit ``kind`` on train, every choice on tuning (early stopping, calibration, the Cox penalty)."""
    tr, tu = data.rows("train"), data.rows("tuning")
    t, e, X = data.time_days, data.event, data.tensors.X
    if kind in SEQUENCE_KINDS:
        from workbench import survival

        grid = survival.HazardGrid.regular(max_days, interval_days or survival.DEFAULT_INTERVAL_DAYS)
        config = (model_config or ModelConfig()).model_copy(update={"kind": kind})
        result = survival.train_hazard(config, train_config or TrainConfig(), X[tr], t[tr], e[tr], X[tu], t[tu], e[tu],
                                       grid, data.n_causes, on_epoch_end=on_epoch_end)
        calibration = survival.fit_calibration(survival.predict_logits(result.model, X[tu]),
                                               survival.hazard_targets(t[tu], e[tu], grid, data.n_causes))
        survival.fold_calibration(result.model, calibration, data.n_causes)
        curves = survival.HazardCurves(result.model, grid, data.n_causes)
        return SurvivalFit(kind, curves.risk, keras_model=result.model, grid=grid, calibration=calibration,
                           history=result.history, best_epoch=result.best_epoch, seconds=result.seconds,
                           options={"survival": {"grid_days": list(grid.edges_days), "n_causes": data.n_causes}})
    if kind == "cox":
        from workbench.experiment import tabular_inputs
        from workbench.references import LandmarkCox

        if data_root is None:
            raise WorkbenchError("the landmark Cox reference reads the events themselves: pass data_root")
        tab, names = tabular_inputs(data.tensors, data_root)
        cox = LandmarkCox(names).fit(tab[tr], t[tr], e[tr], tab[tu], t[tu], e[tu])
        return SurvivalFit(kind, cox.risk, reference=cox, tabular=tab, options={"tabular": True, "survival": {}})
    if kind == "mayo":
        from workbench.references import mayo_survival_risk

        spec = data.tensors.spec
        return SurvivalFit(kind, lambda X, h: mayo_survival_risk(spec, X, h), options={"survival": {}})
    raise WorkbenchError(f"unknown survival model kind {kind!r}; expected one of {', '.join(SURVIVAL_KINDS)}")


def not_applicable(kind: str, data: SurvivalData, max_days: float) -> str | None:
    """Why ``kind`` cannot be fitted here (the Mayo score needs its inputs and at most 7 years)."""
    if kind not in SURVIVAL_KINDS:
        raise WorkbenchError(f"unknown survival model kind {kind!r}; expected one of {', '.join(SURVIVAL_KINDS)}")
    if kind != "mayo":
        return None
    from workbench.references import MAYO_S0, mayo_not_applicable

    reason = mayo_not_applicable(data.tensors.feature_names, 365.25)  # the inputs (any published year)
    if reason is None and max_days / DAYS_PER_YEAR > max(MAYO_S0) + 1e-9:
        reason = f"the Mayo PBC survival function is published up to {max(MAYO_S0)} years, not {max_days / DAYS_PER_YEAR:.1f}"
    return reason


@dataclasses.dataclass
class SurvivalRun:
    run_id: str
    kind: str
    evaluation: object | None  # survival_metrics.SurvivalEvaluation on held-out
    tuning: object | None
    risk: np.ndarray | None  # held-out [N, H]
    horizons_days: list[float]
    fitted: SurvivalFit | None = None
    registry: dict | None = None
    skipped: str | None = None
    figures: dict = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        if self.skipped:
            return f"`{self.kind}` not fitted: {self.skipped}."
        from workbench.evaluation import format_with_ci

        m = self.evaluation.metrics
        line = (f"`{self.kind}`: held-out time-dependent AUC at {CHAMPION_HORIZON_YEARS} y "
                f"{format_with_ci(m[CHAMPION_METRIC], 3)}, Uno's C {format_with_ci(m['uno_c'], 3)}, "
                f"Harrell's C {format_with_ci(m['harrell_c'], 3)}, integrated Brier {format_with_ci(m['ibs'], 3)}; "
                f"MLflow run `{self.run_id}`")
        if self.registry:
            verdict = "now the champion" if self.registry["promoted"] else "champion unchanged"
            line += f"; registered as `models:/{self.registry['name']}/{self.registry['version']}` ({verdict})"
        return line + "."


def _evaluate(fitted: SurvivalFit, data: SurvivalData, split: str, horizons: np.ndarray, grid_days: np.ndarray,
              n_bootstrap: int, seed: int):
    from workbench.survival_metrics import evaluate_survival

    rows, train = data.rows(split), data.rows("train")
    inputs = fitted.inputs(data, split)
    both = fitted.risk(inputs, np.concatenate([horizons, grid_days]))
    risk, grid_risk = both[:, : len(horizons)], both[:, len(horizons):]
    evaluation = evaluate_survival(
        data.time_days[rows], data.event[rows], risk, horizons, train_time=data.time_days[train],
        train_event=data.event[train], cluster=data.tensors.subject_id[rows], grid_risk=grid_risk, grid_days=grid_days,
        n_bootstrap=n_bootstrap, seed=seed)
    return evaluation, risk, grid_risk


def _figures(kind: str, fitted: SurvivalFit, data: SurvivalData, evaluation, grid_days: np.ndarray, grid_risk: np.ndarray) -> dict:
    from workbench.plots import km_vs_predicted_plot, survival_calibration_plot, training_curves_plot

    rows = data.rows("held_out")
    out = {
        "calibration_horizons": survival_calibration_plot({kind: evaluation.calibration}, title=f"{kind}: calibration at each horizon, held-out"),
        "observed_vs_predicted": km_vs_predicted_plot(data.time_days[rows], data.event[rows],
                                                      {kind: (grid_days, grid_risk.mean(axis=0))},
                                                      title=f"{kind}: observed (Aalen-Johansen) vs mean predicted risk, held-out"),
    }
    if fitted.history:
        out["training_curves"] = training_curves_plot(fitted.history, best_epoch=fitted.best_epoch)
    return out


def architecture(kind: str, model_config: ModelConfig | None, n_causes: int) -> str:
    if kind in SEQUENCE_KINDS and model_config is not None:
        c = model_config
        head = "cause-specific softmax hazard (outcome, competing)" if n_causes > 1 else "logistic hazard"
        return f"{kind}, {c.layers} layer{'s' if c.layers > 1 else ''} x {c.units} units, discrete-time {head}"
    if kind == "cox":
        return "landmark Cox model on the last values at each prediction time (ridge penalty chosen on tuning)"
    return "Mayo PBC survival function (published coefficients and baseline survival, nothing fitted)"


def run_survival_model(
    kind: str,
    data: SurvivalData,
    *,
    task: str | TaskSpec,
    horizons_years=DEFAULT_HORIZONS_YEARS,
    model_config: ModelConfig | None = None,
    train_config: TrainConfig | None = None,
    interval_days: float | None = None,
    n_bootstrap: int = 200,
    cohort_report=None,
    data_root: str | None = None,
    run_id: str | None = None,
    parent_run_id: str | None = None,
    register: bool = True,
) -> SurvivalRun:
    """Fit, evaluate and log one survival model as one MLflow run; register its pyfunc."""
    task = load_task(task)
    tracking.setup()
    max_days = float(task.outcome.horizon_days) if task.outcome is not None else float(np.max(data.time_days))
    horizons = np.asarray([y * DAYS_PER_YEAR for y in horizons_years], dtype=np.float64)
    if np.any(horizons > max_days + 1e-6) or np.any(np.diff(horizons) <= 0):
        raise WorkbenchError(f"horizons {list(horizons_years)} years must increase and lie within the task's "
                             f"{max_days:g}-day maximum horizon")
    if CHAMPION_HORIZON_YEARS not in horizons_years:
        raise WorkbenchError(f"horizons_years must include {CHAMPION_HORIZON_YEARS} (the champion rule compares it)")
    grid_days = np.arange(GRID_STEP_DAYS, horizons[-1] + 1e-9, GRID_STEP_DAYS)
    train_config = train_config or TrainConfig()
    model_config = (model_config or ModelConfig()).model_copy(update={"kind": kind}) if kind in SEQUENCE_KINDS else None
    arch = architecture(kind, model_config, data.n_causes)
    tensors = data.tensors
    tags = {record.TASK_TAG: task.name, record.MODEL_TAG: kind, record.ARCHITECTURE_TAG: arch,
            record.DATA_FINGERPRINT_TAG: tensors.spec.fitted_on.data_fingerprint,
            record.TENSORS_HASH_TAG: tensors.content_hash(), record.TASK_KIND_TAG: "survival",
            "mlflow.source.git.commit": tracking.git_commit()}
    if data_root:
        tags[record.DATA_ROOT_TAG] = str(Path(data_root).resolve())
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    start = {"run_id": run_id} if run_id else {"experiment_id": tracking.experiment_id(task.name), "run_name": kind}
    with mlflow.start_run(**start, tags=tags):
        active = mlflow.active_run().info.run_id
        mlflow.log_dict(task.model_dump(mode="json"), record.TASK_ARTIFACT)
        reason = not_applicable(kind, data, max_days)
        if reason:
            mlflow.set_tag(record.SKIPPED_TAG, reason)
            return SurvivalRun(active, kind, None, None, None, horizons.tolist(), skipped=reason)
        configs = {"features": tensors.spec.config}
        if model_config is not None:
            configs.update(model=model_config, train=train_config)
        mlflow.log_params({f"config.{k}": v for k, v in tracking.flatten_params(configs).items()})
        mlflow.log_params({"model_kind": kind, "n_steps": tensors.X.shape[1], "n_features": tensors.X.shape[2],
                           "horizons_years": ",".join(map(str, horizons_years)), "max_horizon_days": max_days,
                           "n_causes": data.n_causes, "n_bootstrap": n_bootstrap})
        if data_root:
            tracking.log_data_input(data_root, tensors.spec.fitted_on.data_fingerprint, task.name)

        def log_epoch(epoch: int, metrics: dict) -> None:
            mlflow.log_metrics({k: float(v) for k, v in metrics.items() if k != "epoch" and np.isfinite(v)}, step=epoch)

        fitted = fit_survival(kind, data, max_days, model_config, train_config, data_root, interval_days, log_epoch)
        if fitted.grid is not None:
            mlflow.log_params({"hazard_intervals": fitted.grid.n_intervals,
                               "interval_days": round(fitted.grid.edges_days[1], 2)})
            mlflow.log_param("recalibration", fitted.calibration.describe())
            mlflow.log_metrics({"best_epoch": fitted.best_epoch, "train_seconds": fitted.seconds})
        if kind == "cox":
            mlflow.log_params({"cox_alpha": fitted.reference.alpha, "cox_inputs": len(fitted.reference.columns.names)})
        tuning, _, _ = _evaluate(fitted, data, "tuning", horizons, grid_days, 0, train_config.seed)
        evaluation, risk, grid_risk = _evaluate(fitted, data, "held_out", horizons, grid_days, n_bootstrap, train_config.seed)
        mlflow.log_metrics(tuning.to_flat_dict(prefix=record.TUNING))
        mlflow.log_metrics(evaluation.to_flat_dict(prefix=record.HELD_OUT))
        mlflow.log_text(evaluation.to_markdown(), f"{record.EVALUATION_DIR}/held_out.md")
        mlflow.log_text(evaluation.calibration.write_csv(), f"{record.EVALUATION_DIR}/calibration_horizons.csv")
        mlflow.log_dict(tensors.spec.model_dump(mode="json"), record.FEATURE_SPEC_ARTIFACT)
        if cohort_report is not None:
            tracking.log_cohort_report(cohort_report)
        plots = _figures(kind, fitted, data, evaluation, grid_days, grid_risk)
        tracking.log_figures(plots)
        held = data.rows("held_out")
        tracking.log_frame(pl.DataFrame({
            "subject_id": tensors.subject_id[held], "prediction_time": tensors.prediction_time[held],
            "time_days": data.time_days[held], "event": data.event[held],
            **{horizon_column(h): risk[:, i] for i, h in enumerate(horizons)}}), record.PREDICTIONS_ARTIFACT)
        from workbench.serving import log_risk_model

        fitted.options["survival"]["horizons_days"] = horizons.tolist()
        info = log_risk_model(fitted, tensors.spec, kind=kind, options=fitted.options,
                              metadata={"task": task.name, "model_kind": kind, "architecture": arch}, task=task)
        registry = None
        if register:
            m = evaluation.metrics
            registry = tracking.register_and_maybe_promote(
                info.model_uri, task.name, tuning.metrics[CHAMPION_METRIC]["value"],
                description=(f"{arch} predicting {task.name} ({task.description.strip()}). Risk of the outcome by each of "
                             f"{list(horizons_years)} years after the prediction time (columns "
                             f"{', '.join(horizon_column(h) for h in horizons)}). The champion rule compares the tuning "
                             f"time-dependent AUC at {CHAMPION_HORIZON_YEARS} years (the registry tag tuning_auroc). Held-out: "
                             f"Uno's C {m['uno_c']['value']:.3f}, integrated Brier {m['ibs']['value']:.3f}. MLflow run {active}."),
                tags={"task": task.name, "model_kind": kind, "architecture": arch, "run_id": active,
                      "task_kind": "survival"})
            mlflow.set_tags({record.REGISTERED_VERSION_TAG: registry["version"],
                             record.CHAMPION_TAG: str(registry["promoted"]).lower()})
    return SurvivalRun(active, kind, evaluation, tuning, risk, horizons.tolist(), fitted, registry, figures=plots)


def save_survival_run(run: SurvivalRun, directory) -> None:
    """The train step's hand-off (``model_run.json``), as the binary train step writes it."""
    record.write_model_run(directory, {
        "run_id": run.run_id, "kind": run.kind, "skipped": run.skipped, "registry": run.registry,
        "task_kind": "survival", "horizons_days": run.horizons_days,
        "tuning_auroc": None if run.tuning is None else run.tuning.metrics[CHAMPION_METRIC]["value"]})


def load_survival_predictions(run_id: str) -> pl.DataFrame:
    """The held-out predictions a survival run logged (subject_id, prediction_time, time_days, event, risk_*d)."""
    return pl.read_parquet(tracking.download_artifact(run_id, record.PREDICTIONS_ARTIFACT))


# --------------------------------------------------------------------------------------------
# Comparing a sweep's survival models, and the survival model with the binary one


#: Held-out metrics the comparison table shows (each with its CI), beside the per-horizon td-AUCs.
COMPARED = ("uno_c", "harrell_c", "ibs")


@dataclasses.dataclass
class SurvivalComparison:
    task: str
    table: pl.DataFrame  # one row per model: run_id, model, tuning td-AUC, held-out metrics with CIs
    figures: dict
    binary: pl.DataFrame | None = None  # the binary model and the survival LSTM on the same visits
    skipped: dict = dataclasses.field(default_factory=dict)

    def markdown(self) -> str:
        from workbench.evaluation import format_with_ci

        metrics = [c for c in self.table.columns if c.startswith("td_auc_") and not c.endswith(("_ci_low", "_ci_high"))]
        metrics += list(COMPARED)
        head = ["model", "tuning td-AUC 2 y"] + metrics
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.table.iter_rows(named=True):
            cells = [format_with_ci({"value": r[m], "ci_low": r[f"{m}_ci_low"], "ci_high": r[f"{m}_ci_high"]}, 3) for m in metrics]
            lines.append(f"| {r['model']} | {r['tuning_td_auc']:.3f} | " + " | ".join(cells) + " |")
        out = "\n".join(lines)
        out += "\n\nHigher is better for td-AUC and concordance, lower for the integrated Brier score (ibs)."
        for kind, why in self.skipped.items():
            out += f"\n\n`{kind}` not fitted: {why}."
        if self.binary is not None:
            out += "\n\n" + binary_markdown(self.binary)
        else:
            out += ("\n\nThe comparison with the binary 2-year LSTM on the same visits needs the pipeline's cohort and "
                    "binary steps (`workbench run pipelines/pbc_survival.yaml`).")
        return out

    def save(self, directory) -> None:
        from workbench.files import write_text_atomic

        write_text_atomic(Path(directory) / record.COMPARISON_FILE, self.table.write_csv())

    def log(self, run_id: str) -> None:
        with mlflow.start_run(run_id=run_id):
            mlflow.log_text(self.table.write_csv(), f"{record.COMPARISON_DIR}/survival_models.csv")
            if self.binary is not None:
                mlflow.log_text(self.binary.write_csv(), f"{record.COMPARISON_DIR}/binary_vs_survival.csv")
                for r in self.binary.iter_rows(named=True):
                    mlflow.log_metrics({f"{r['model']}_td_auc_2y_same_visits": r["td_auc"],
                                        f"{r['model']}_td_auc_2y_same_visits_ci_low": r["ci_low"],
                                        f"{r['model']}_td_auc_2y_same_visits_ci_high": r["ci_high"]})
            tracking.log_figures(self.figures, f"{record.COMPARISON_DIR}")


def _metric_row(run, horizons_days) -> dict:
    m = run.data.metrics
    row = {"run_id": run.info.run_id, "model": run.data.tags.get(record.MODEL_TAG, run.info.run_name),
           "tuning_td_auc": m.get(f"{record.TUNING}{horizon_metric('td_auc', CHAMPION_HORIZON_YEARS * DAYS_PER_YEAR)}")}
    names = [horizon_metric("td_auc", h) for h in horizons_days] + list(COMPARED)
    for name in names:
        for suffix in ("", "_ci_low", "_ci_high"):
            row[f"{name}{suffix}"] = m.get(f"{record.HELD_OUT}{name}{suffix}")
    return row




def metrics_table(run_ids, horizons_days) -> pl.DataFrame:
    """One row per survival run, best tuning td-AUC at 2 years first: held-out metrics with CIs."""
    client = mlflow.tracking.MlflowClient()
    rows = [_metric_row(client.get_run(run_id), horizons_days) for run_id in run_ids]
    return pl.DataFrame(rows).sort("tuning_td_auc", descending=True, nulls_last=True)


def latest_survival_runs(task: str) -> list[dict]:
    """The latest survival run of each model kind in the task's experiment, as train hand-offs
    (what the compare notebook uses when it runs outside a pipeline)."""
    client = mlflow.tracking.MlflowClient()
    exp = client.get_experiment_by_name(task)
    runs = [] if exp is None else client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{record.TASK_KIND_TAG}` = 'survival' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1000)
    latest: dict[str, dict] = {}
    for run in runs:
        kind = run.data.tags.get(record.MODEL_TAG)
        if kind in latest or "horizons_years" not in run.data.params:
            continue
        years = [float(y) for y in run.data.params["horizons_years"].split(",")]
        latest[kind] = {"run_id": run.info.run_id, "kind": kind, "skipped": run.data.tags.get(record.SKIPPED_TAG),
                        "horizons_days": [y * DAYS_PER_YEAR for y in years]}
    if not latest:
        raise WorkbenchError(f"no finished survival model run in experiment {task!r} at {tracking.tracking_uri()}: "
                             "train one first (notebooks/05_survival, or workbench run pipelines/pbc_survival.yaml)")
    return list(latest.values())


def compare_survival(task: str, upstream: dict | None, n_bootstrap: int = 200, seed: int = 0) -> SurvivalComparison:
    """Compare a pipeline's survival models (its train steps) on held-out, with the binary model of
    its ``binary`` step (if any) on the same visits."""
    from workbench.cohort import load_cohort
    from workbench.plots import km_vs_predicted_plot, metric_comparison_plot, survival_calibration_plot
    from workbench.tasks import task_name

    tracking.setup()
    name = task_name(task)
    runs = record.read_model_runs(record.upstream_train(upstream)) or latest_survival_runs(name)
    skipped = {r["kind"]: r["skipped"] for r in runs if r.get("skipped")}
    fitted = [r for r in runs if not r.get("skipped")]
    horizons = fitted[0]["horizons_days"]
    table = metrics_table([r["run_id"] for r in fitted], horizons)
    calibrations, curves = {}, {}
    cohort_dir = record.upstream_cohort(upstream)
    for r in fitted:
        path = tracking.download_artifact(r["run_id"], f"{record.EVALUATION_DIR}/calibration_horizons.csv")
        calibrations[r["kind"]] = pl.read_csv(path)
        predictions = load_survival_predictions(r["run_id"])
        mean = [0.0] + [float(predictions[horizon_column(h)].mean()) for h in horizons]
        curves[r["kind"]] = (np.array([0.0, *horizons]), np.array(mean))
    shown = [h for h in horizons if round(h / DAYS_PER_YEAR) in (1, 2, 5)]
    first = load_survival_predictions(fitted[0]["run_id"])
    figures = {
        "calibration_1_2_5y": survival_calibration_plot(calibrations, horizons_days=shown,
                                                         title=f"{name}: calibration at 1, 2 and 5 years, held-out"),
        "observed_vs_predicted": km_vs_predicted_plot(first["time_days"].to_numpy(), first["event"].to_numpy(), curves,
                                                      title=f"{name}: observed vs mean predicted risk, held-out"),
        "metrics": metric_comparison_plot(table, metrics=[horizon_metric("td_auc", 2 * DAYS_PER_YEAR), *COMPARED],
                                          title=f"{name}: held-out metrics with 95% CIs"),
    }
    binary = None
    binary_runs = record.read_model_runs((upstream or {}).get("binary") or [])
    lstm = next((r for r in fitted if r["kind"] == "lstm"), None)
    if binary_runs and lstm is not None and cohort_dir:
        cohort = load_cohort(cohort_dir)
        data = survival_data(cohort.task, cohort.labels, cohort.tensors)
        binary = binary_vs_survival(binary_runs[0]["run_id"], lstm["run_id"], data, n_bootstrap, seed)
        figures["binary_vs_survival"] = binary_plot(binary)
    return SurvivalComparison(name, table, figures, binary, skipped)


def binary_vs_survival(binary_run_id: str, survival_run_id: str, data: SurvivalData, n_bootstrap: int = 200,
                       seed: int = 0, horizon_years: float = CHAMPION_HORIZON_YEARS) -> pl.DataFrame:
    """Time-dependent AUC at ``horizon_years`` of a binary model (its held-out predictions) and a
    survival model, on the held-out visits both scored: the binary task's (it dropped the visits
    censored before its horizon), with the survival labels of those visits. Also the survival
    ``survival_visits`` is how many held-out visits the survival model scored: the binary task's
    plus those it dropped (censored before its horizon: neither case nor control at it)."""
    from workbench.survival_metrics import evaluate_survival

    h = horizon_years * DAYS_PER_YEAR
    binary = pl.read_parquet(tracking.download_artifact(binary_run_id, record.PREDICTIONS_ARTIFACT))
    survival = load_survival_predictions(survival_run_id)
    same = survival.join(binary.select("subject_id", "prediction_time", pl.col("risk").alias("binary_risk")),
                         on=["subject_id", "prediction_time"], how="inner")
    if same.height == 0:
        raise WorkbenchError(f"binary run {binary_run_id} and survival run {survival_run_id} share no held-out visit "
                             "(are they on the same dataset and splits?)")
    train = data.rows("train")
    rows = []
    for model, frame, risk in (("binary_lstm", same, same["binary_risk"]), ("survival_lstm", same, same[horizon_column(h)])):
        result = evaluate_survival(frame["time_days"].to_numpy(), frame["event"].to_numpy(), risk.to_numpy()[:, None], [h],
                                   train_time=data.time_days[train], train_event=data.event[train],
                                   cluster=frame["subject_id"].to_numpy(), n_bootstrap=n_bootstrap, seed=seed)
        entry = result.metrics[horizon_metric("td_auc", h)]
        rows.append({"model": model, "visits": frame.height, "subjects": frame["subject_id"].n_unique(),
                     "td_auc": entry["value"], "ci_low": entry["ci_low"], "ci_high": entry["ci_high"],
                     "survival_visits": survival.height})
    return pl.DataFrame(rows)


def binary_markdown(table: pl.DataFrame) -> str:
    rows = {r["model"]: r for r in table.iter_rows(named=True)}
    b, s = rows["binary_lstm"], rows["survival_lstm"]
    verdict = ("within the binary model's CI" if b["ci_low"] <= s["td_auc"] <= b["ci_high"] else
               "above the binary model's CI" if s["td_auc"] > b["ci_high"] else "below the binary model's CI")
    lines = ["| model | visits | patients | time-dependent AUC at 2 y (95% CI) |", "|---|---|---|---|"]
    for r in rows.values():
        lines.append(f"| {r['model']} | {r['visits']} | {r['subjects']} | {r['td_auc']:.3f} ({r['ci_low']:.3f}–{r['ci_high']:.3f}) |")
    extra = s["survival_visits"] - s["visits"]
    return ("**Survival vs binary 2-year LSTM on the same held-out visits** (the binary task's: its censored "
            f"visits dropped): the survival LSTM's time-dependent AUC at 2 years is {verdict}. The survival model "
            f"also scores the {extra} held-out visits the binary task dropped (follow-up ended before 2 years) and "
            "learned from their train counterparts; at 2 years they are neither cases nor controls.\n\n" + "\n".join(lines))


def binary_plot(table: pl.DataFrame):
    from workbench.plots import auroc_forest_plot

    forest = table.select("model", pl.col("td_auc").alias("auroc"), pl.col("ci_low").alias("auroc_ci_low"),
                          pl.col("ci_high").alias("auroc_ci_high"))
    return auroc_forest_plot(forest, title="Time-dependent AUC at 2 years, held-out (binary task's visits)")


def patient_views(upstream: dict | None, n_patients: int = 2) -> dict:
    """Risk-curve views of the explained champion's highest-risk held-out patients: the predicted
    curve at each visit, and the risk by the explained horizon per visit with the (step, feature)
    cell that moved it most. Empty when the pipeline has no explain step."""
    from workbench.experiment import best_sequence_run

    explained = (upstream or {}).get("explain") or []
    train = record.upstream_train(upstream)
    if not explained or not train:
        return {}
    run_id = best_sequence_run(train)["run_id"]
    predictions = load_survival_predictions(run_id)
    frame = pl.read_parquet(Path(explained[0]) / record.EXPLANATIONS_FILE)
    per_visit = frame.group_by("subject_id", "prediction_time").agg(pl.col("output").first())
    top = per_visit.sort("output", descending=True).unique("subject_id", keep="first", maintain_order=True).head(n_patients)
    views = {}
    for subject in top["subject_id"].to_list():
        visits = predictions.filter(pl.col("subject_id") == subject).sort("prediction_time")
        cells = frame.filter(pl.col("subject_id") == subject)
        drivers = (cells.with_columns(pl.col("shap").abs().alias("_abs")).sort("_abs", descending=True)
                   .unique("prediction_time", keep="first").sort("prediction_time"))
        views[f"risk_curves_subject{subject}"] = patient_risk_plot(subject, visits, drivers)
    return views


def patient_risk_plot(subject: int, visits: pl.DataFrame, drivers: pl.DataFrame):
    """Left: the predicted risk curve at each visit; right: the explained risk per visit with its top driver."""
    from workbench.plots import Figure

    columns = [c for c in visits.columns if c.startswith("risk_") and c.endswith("d")]
    days = np.array([0.0] + [float(c[5:-1]) for c in columns])
    fig = Figure(figsize=(12.0, 4.6), layout="constrained")
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    shades = np.linspace(0.3, 1.0, max(visits.height, 1))
    for shade, row in zip(shades, visits.iter_rows(named=True)):
        curve = [0.0] + [row[c] for c in columns]
        left.plot(days / DAYS_PER_YEAR, curve, marker=".", color=(0.75 * (1 - shade), 0.2, 0.6 * shade + 0.2),
                  label=str(np.datetime64(row["prediction_time"], "D")))
    left.set_xlabel("years after the visit")
    left.set_ylabel("predicted risk of the outcome")
    left.set_ylim(0, 1)
    left.grid(alpha=0.3)
    left.legend(title="visit", fontsize=7, ncol=2)
    left.set_title(f"Subject {subject}: risk curve at each visit")
    if drivers.height:
        times = drivers["prediction_time"].to_numpy()
        right.plot(times, drivers["output"].to_numpy(), marker="o", color="C3")
        for i, (t, out, feature, shap, step_end) in enumerate(zip(times, drivers["output"], drivers["feature"],
                                                                  drivers["shap"], drivers["step_end_time"])):
            above = i % 2 == 0  # neighbouring visits' notes alternate above and below the line
            right.annotate(f"{feature.split('/')[-2] if feature.count('/') >= 2 else feature}\n"
                           f"{'+' if shap > 0 else '−'}{abs(shap):.3f} ({str(np.datetime64(step_end, 'M'))})",
                           (t, out), textcoords="offset points", xytext=(0, 8 if above else -8), ha="center",
                           va="bottom" if above else "top", fontsize=7)
        right.set_ylim(0, min(1.0, float(drivers["output"].max()) * 1.35 + 0.05))
    import matplotlib.dates as mdates

    locator = mdates.AutoDateLocator(minticks=3, maxticks=7)  # maxticks=6 alone finds no interval for 3-4 years
    right.xaxis.set_major_locator(locator)
    right.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    right.set_ylabel("explained risk (by the explained horizon)")
    right.set_xlabel("visit")
    right.grid(alpha=0.3)
    right.set_title("Explained risk per visit and the cell that moved it most (SHAP)")
    return fig
