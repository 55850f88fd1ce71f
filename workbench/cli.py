"""The ``workbench`` command: a thin layer over the library (one command per stage)."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from workbench.errors import WorkbenchError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(stderr=True)


def reports_errors(fn):
    """Turn a WorkbenchError into a clear message and its exit code (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except WorkbenchError as exc:
            console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code)

    return wrapper


# --- data commands (validate) ---


def print_validation(report) -> None:
    """Print a validation summary table and every problem found."""
    from rich.markup import escape
    from rich.table import Table

    out = Console()
    s = report.summary
    if s:
        table = Table(title=f"MEDS dataset {report.root}", show_header=False)
        for key in ("subjects", "events", "codes", "static_events", "numeric_events"):
            table.add_row(key.replace("_", " "), f"{s[key]:,}")
        table.add_row("time range", f"{s['time_min']}  ->  {s['time_max']}")
        for split, (subjects, events) in s.get("splits", {}).items():
            table.add_row(f"split {split}", f"{subjects:,} subjects, {events:,} events")
        table.add_row("top codes", "\n".join(f"{code}  {n:,}" for code, n in s["top_codes"]))
        out.print(table)
    for p in report.problems:
        style = "red" if p.severity == "error" else "yellow"
        out.print(f"[{style}]{escape(str(p))}[/]", highlight=False, soft_wrap=True)
    verdict = "[green]valid[/]" if report.ok else f"[red]{len(report.errors)} error(s)[/]"
    out.print(f"{verdict}, {len(report.warnings)} warning(s)")


@app.command()
@reports_errors
def validate(root: Path = typer.Argument(..., help="MEDS dataset root (data/ and metadata/)")) -> None:
    """Check a MEDS dataset: print its summary and every problem (exit 2 on errors)."""
    from workbench.data.validate import validate_dataset

    report = validate_dataset(root)
    print_validation(report)
    if not report.ok:
        raise typer.Exit(2)


# --- synth commands ---


@app.command()
@reports_errors
def synth(
    out: Path = typer.Option(..., "--out", help="Directory to write the MEDS dataset to (must not exist)"),
    subjects: int = typer.Option(1000, "--subjects", help="Number of subjects"),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same files)"),
    shard_size: int = typer.Option(10_000, "--shard-size", help="Subjects per parquet shard"),
    planted_fraction: float = typer.Option(0.3, "--planted-fraction", help="Share of subjects with the planted risk event"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar over shards"),
) -> None:
    """Generate a synthetic MEDS dataset with a planted risk signal and its ground truth."""
    from workbench.data.synth import GROUND_TRUTH_FILE, generate, make_config

    config = make_config(
        n_subjects=subjects, seed=seed, subjects_per_shard=shard_size, planted_fraction=planted_fraction
    )
    info = generate(out, config, overwrite=overwrite, progress=progress).metadata()["synth"]
    Console().print(
        f"wrote {info['n_subjects']:,} subjects, {info['n_events']:,} events in {info['n_shards']} shard(s) "
        f"to {escape(str(out))}\n{info['n_planted']:,} subjects carry the planted event "
        f"{info['task']['planted_code']}; ground truth: {escape(str(Path(out) / GROUND_TRUTH_FILE))}",
        highlight=False,
        soft_wrap=True,
    )


# --- import commands ---

import_app = typer.Typer(no_args_is_help=True, help="Import source tables (CSV or parquet) into a MEDS dataset.")
app.add_typer(import_app, name="import")


def _report_import(dataset) -> None:
    """One line: where the dataset went, its size and its split counts."""
    meta = dataset.metadata()
    events = dataset.events().select("subject_id").collect()
    splits = ", ".join(f"{k} {v}" for k, v in meta.get("splits", {}).get("subjects", {}).items())
    Console().print(
        f"wrote {events.height:,} events of {events['subject_id'].n_unique():,} subjects to "
        f"{escape(str(dataset.root))} (splits: {splits}; seed {meta.get('splits', {}).get('seed')})",
        highlight=False,
        soft_wrap=True,
    )


@import_app.command("long")
@reports_errors
def import_long_table(
    source: Path = typer.Argument(..., help="Long table: CSV, TSV or parquet, one event per row"),
    out: Path = typer.Argument(..., help="MEDS dataset root to write"),
    subject_col: str = typer.Option("subject_id", help="Column with integer subject ids"),
    time_col: str = typer.Option("time", help="Column with the event time (or offset, with --relative-unit)"),
    code_col: str = typer.Option("code", help="Column with the event code"),
    code_prefix: Optional[str] = typer.Option(None, help="Prefix codes as PREFIX//code"),
    value_col: Optional[str] = typer.Option(None, help="Column with numeric values"),
    time_format: Optional[str] = typer.Option(None, help="strftime format of the time column (default ISO 8601)"),
    relative_unit: Optional[str] = typer.Option(None, help="Times are offsets in this unit (days, hours, ...)"),
    anchor_date: Optional[str] = typer.Option(None, help="Relative times: one anchor date for every subject"),
    anchor_table: Optional[Path] = typer.Option(None, help="Relative times: table with each subject's anchor"),
    anchor_col: str = typer.Option("index_date", help="Anchor table: column with the anchor date"),
    train: float = typer.Option(0.8, help="Fraction of subjects in train"),
    tuning: float = typer.Option(0.1, help="Fraction of subjects in tuning"),
    held_out: float = typer.Option(0.1, help="Fraction of subjects in held_out"),
    seed: int = typer.Option(0, help="Split seed (recorded in dataset.json)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists"),
) -> None:
    """Import one long event table (subject, time, code, value) into a MEDS dataset."""
    from workbench.data.importers import ImportConfig, import_dataset, make_config

    time = {"column": time_col, "format": time_format, "relative_unit": relative_unit, "anchor_date": anchor_date}
    if anchor_table is not None:
        time["anchor_table"] = {"path": anchor_table, "subject_column": subject_col, "date_column": anchor_col}
    table = {
        "path": source, "subject_column": subject_col, "time": time, "code_column": code_col,
        "code_prefix": code_prefix, "value_column": value_col,
    }
    splits = {"train": train, "tuning": tuning, "held_out": held_out, "seed": seed}
    config = make_config(
        ImportConfig, {"dataset_name": out.name, "long_tables": [table], "splits": splits}, source="options"
    )
    _report_import(import_dataset(config, out, overwrite=overwrite))


@import_app.command("config")
@reports_errors
def import_from_config(
    config: Path = typer.Argument(..., help="Import config YAML (static, wide and long tables; splits)"),
    out: Path = typer.Argument(..., help="MEDS dataset root to write"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists"),
) -> None:
    """Import the tables described by a YAML config (see workbench/data/datasets/pbc/import.yaml)."""
    from workbench.data.importers import ImportConfig, import_dataset

    _report_import(import_dataset(ImportConfig.from_yaml(config), out, overwrite=overwrite))


# --- task commands ---


@app.command("label")
@reports_errors
def label_command(
    task: str = typer.Option(..., "--task", help="Task spec: a YAML path or a shipped name (e.g. pbc_mortality)."),
    data: Path = typer.Option(..., "--data", help="MEDS dataset root."),
    out: Path = typer.Option(..., "--out", help="Labels parquet to write (MEDS label schema)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Also write the cohort report as JSON here."),
) -> None:
    """Make labels for a prediction task and print the cohort report."""
    import json
    import warnings

    from rich.console import Console as _Console

    from workbench.files import check_output, write_text_atomic
    from workbench.tasks import make_labels

    task_file = task if task.endswith((".yaml", ".yml", ".parquet")) else None
    check_output(out, "--out", inputs=(data, task_file))
    if report is not None:
        check_output(report, "--report", inputs=(data, task_file, out))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # printed below from the report instead
        result = make_labels(data, task)
    result.save(out)
    stdout = _Console()
    stdout.print(result.report.to_rich())
    for note in result.report.warnings:
        console.print(f"[bold yellow]warning:[/] {escape(note)}", highlight=False, soft_wrap=True)
    if report is not None:
        write_text_atomic(report, json.dumps(result.report.to_dict(), indent=2) + "\n")
    console.print(f"wrote {result.report.labels} labels to {out}", highlight=False)

# --- feature commands ---


@app.command("features")
@reports_errors
def features_command(
    data: Path = typer.Option(..., "--data", help="MEDS dataset root."),
    labels: Path = typer.Option(..., "--labels", help="Labels parquet (subject_id, prediction_time, boolean_value)."),
    out: Path = typer.Option(..., "--out", help="Directory for tensors.npz, feature_spec.json, manifest.json."),
    config: Optional[Path] = typer.Option(None, "--config", help="Feature config YAML (defaults if omitted)."),
    spec: Optional[Path] = typer.Option(None, "--spec", help="Existing feature_spec.json: transform only, never refit."),
) -> None:
    """Turn events + labels into sequence tensors (fit on the train split, or reuse --spec)."""
    import warnings

    from workbench import features as ft

    from workbench.files import check_output
    from workbench.labels import read_labels

    if spec is not None and config is not None:
        raise WorkbenchError("--spec and --config are exclusive: a saved spec already holds its config")
    check_output(out, "--out", inputs=(data, labels, spec, config), folder_marker=ft.MANIFEST_FILE)
    if spec is None:
        read_labels(labels, need_values=True)  # fitting needs the outcome of every label
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ft.UnseenCodesWarning)
        if spec is not None:
            tensors = ft.transform(data, labels, ft.FeatureSpec.load(spec))
        else:
            cfg = ft.FeatureConfig.from_yaml(config) if config is not None else ft.FeatureConfig()
            _, tensors = ft.fit_transform(data, labels, cfg)
    for w in caught:
        console.print(f"[yellow]warning:[/] {escape(str(w.message))}", highlight=False, soft_wrap=True)
    tensors.save(out)
    n, t, f = tensors.X.shape
    splits = ", ".join(f"{k or '(none)'}={v}" for k, v in ft.split_counts(tensors.split).items())
    typer.echo(f"wrote {out}: X [{n}, {t}, {f}] ({splits}); content hash {tensors.content_hash()[:16]}")

# --- ui commands ---


def _public_warning(public: bool, host: str) -> None:
    """Say loudly that a server will be reachable from other machines."""
    if public:
        console.print(
            f"[bold red]WARNING:[/] binding to {escape(host)}: anyone who can reach this machine "
            "can reach this server and the patient data behind it",
            highlight=False, soft_wrap=True,
        )


@app.command("ui")
@reports_errors
def ui_command(
    port: int = typer.Option(5000, "--port", help="Port for the MLflow UI."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (loopback unless --public)."),
    public: bool = typer.Option(False, "--public", help="Allow a non-loopback --host (exposes the runs)."),
) -> None:
    """Start the MLflow UI over mlruns/ in the foreground (Ctrl-C stops it)."""
    reconcile_runs("workbench ui")
    from workbench.ui import check_host, exec_server, install_comparison_views, mlflow_ui_command, server_url

    command = mlflow_ui_command(host=host, port=port, public=public)
    _public_warning(check_host(host, public), host)
    console.print(f"MLflow UI: {command.url}", highlight=False, soft_wrap=True)
    for name, path in install_comparison_views().items():
        console.print(f"  {escape(name)}: {server_url(host, port, path)}", highlight=False, soft_wrap=True)
    exec_server(command)


@app.command("lab")
@reports_errors
def lab_command(
    port: int = typer.Option(8888, "--port", help="Port for JupyterLab."),
    token: Optional[str] = typer.Option(None, "--token", help="Access token (a random one if omitted)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (loopback unless --public)."),
    public: bool = typer.Option(False, "--public", help="Allow a non-loopback --host (exposes the notebooks)."),
) -> None:
    """Start JupyterLab in notebooks/ with a token, in the foreground (Ctrl-C stops it)."""
    from workbench.pipelines import ensure_kernelspec
    from workbench.ui import check_host, exec_server
    from workbench.ui import lab_command as build_lab_command

    command = build_lab_command(host=host, port=port, token=token, public=public)
    _public_warning(check_host(host, public), host)
    ensure_kernelspec()  # the notebooks' "workbench" kernel must exist before a user opens one
    console.print(f"JupyterLab: {command.url}", highlight=False, soft_wrap=True)
    exec_server(command)

# --- model commands (predict, explain) ---


@app.command("map-shards")
@reports_errors
def map_shards(
    data: Path = typer.Argument(..., help="MEDS dataset root (the same path on every worker)."),
    labels: Path = typer.Option(..., "--labels", help="Labels parquet (subject_id, prediction_time, boolean_value)."),
    spec: Path = typer.Option(..., "--spec", help="feature_spec.json fitted on the train split (never refitted)."),
    out: Path = typer.Option(..., "--out", help="Shard folder to write (replaced when complete)."),
    model: Optional[Path] = typer.Option(None, "--model", help="Keras .keras model: also write scores.parquet."),
    chunk_samples: int = typer.Option(32_768, "--chunk-samples", help="Samples per chunk (one task, one shard)."),
    batch_size: int = typer.Option(1024, "--batch-size", help="Rows per scoring batch."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Seconds to wait for the chunks (default: no limit)."),
) -> None:
    """Tensorize (and score) a dataset chunk by chunk on the team's Prefect task workers."""
    from workbench import features as ft
    import warnings

    from workbench.shard_map import map_shards as run_map

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ft.UnseenCodesWarning)
        summary = run_map(data, labels, spec, out, model, chunk_samples=chunk_samples, batch_size=batch_size,
                             timeout_s=timeout)
    for w in caught:
        if issubclass(w.category, ft.UnseenCodesWarning):
            console.print(f"[yellow]warning:[/] {escape(str(w.message))}", highlight=False, soft_wrap=True)
    typer.echo(f"wrote {summary['out']}: {summary['rows']} rows in {summary['chunks']} shard(s), "
               f"run by {len(summary['workers'])} worker process(es): {', '.join(summary['workers'])}")


@app.command()
@reports_errors
def predict(
    model: str = typer.Option(..., "--model", help="Registered model, e.g. models:/pbc_mortality@champion"),
    data: Path = typer.Option(..., "--data", help="MEDS dataset root to score"),
    out: Path = typer.Option(..., "--out", help="Output parquet: subject_id, prediction_time, risk"),
    times: Optional[Path] = typer.Option(None, "--times", help="Parquet of subject_id, prediction_time (default: the moments the model's task predicts at, before any death or end of follow-up)"),
    horizons_days: Optional[list[float]] = typer.Option(None, "--horizon-days", help="A survival model: report the risk by this horizon in days (repeatable; default: the model's horizons)"),
) -> None:
    """Score a MEDS dataset with a registered model and its saved FeatureSpec (a survival model: a risk column per horizon)."""
    from workbench.files import check_output, write_parquet_atomic
    from workbench.experiment import score

    check_output(out, "--out", inputs=(data, times))
    preds = score(model, data, times, horizons_days=horizons_days or None)
    write_parquet_atomic(preds, out)
    Console().print(f"{preds.height:,} predictions -> {out}")


@app.command()
@reports_errors
def explain(
    run: str = typer.Option(..., "--run", help="MLflow run id of a sequence model run"),
    subjects: Optional[list[int]] = typer.Option(None, "--subjects", help="Explain only these subject ids (repeatable)"),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", min=1, help="Explain at most this many held-out samples"),
    config: Optional[Path] = typer.Option(None, "--config", help="ExplainConfig YAML"),
    horizon_years: Optional[float] = typer.Option(None, "--horizon-years", min=0.0,
                                                  help="A survival model: explain its risk by this horizon (default 2 years)"),
) -> None:
    """SHAP per time step for a model run's held-out samples, logged to that run, with checks and verdicts."""
    from workbench.config import load_yaml_config
    from workbench.experiment import tensors_for_run
    from workbench.explain import ExplainConfig
    from workbench.explanations import check_explainable, explain_run

    # Cheap refusals first (the YAML, then the run and its model kind), before the tensors are rebuilt.
    settings = load_yaml_config(ExplainConfig, config) if config is not None else ExplainConfig()
    check_explainable(run)
    result = explain_run(run, tensors_for_run(run), settings, subjects=subjects, max_samples=max_samples,
                         horizon_days=None if horizon_years is None else horizon_years * 365.25)
    out = Console()
    out.print(f"{result.frame.select('subject_id', 'prediction_time').n_unique():,} samples explained; "
              f"logged to run {run} under explanations/ and plots/", highlight=False, soft_wrap=True)
    for row in result.verdicts.iter_rows(named=True):
        style = "green" if row["verdict"] == "PASS" else "bold yellow"
        out.print(f"  [{style}]{row['verdict']:4s}[/] {escape(row['check'])}: {row['value']:.4g} "
                  f"(threshold {escape(row['threshold'])})", highlight=False, soft_wrap=True)


@app.command("crossval")
@reports_errors
def crossval_command(
    task: str = typer.Option("pbc_mortality", "--task", help="Task: a shipped name, a task YAML or a labels parquet"),
    data: str = typer.Option("pbc", "--data", help="A bundled dataset name or a MEDS directory"),
    models: str = typer.Option("lstm,gru,rnn,logistic,gbt,mayo", "--models", help="Comma-separated model kinds"),
    folds: int = typer.Option(5, "--folds", help="Subject-level folds (held out one, tune on the next, train on the rest)"),
    param: Optional[list[str]] = typer.Option(
        None, "-p", "--param", help="A ModelConfig / TrainConfig / EvalConfig field, or features={...}: key=value (repeatable)"),
    seed: int = typer.Option(0, "--seed", help="Seed of the fold assignment"),
) -> None:
    """Cross-validate models by subject: pooled out-of-fold AUROC, ECE, calibration slope and intercept with CIs."""
    from rich.table import Table

    from workbench.config import split_settings
    from workbench.crossval import cross_validate
    from workbench.evaluation import EvalConfig, format_with_ci
    from workbench.models import ModelConfig
    from workbench.pipelines import parse_overrides
    from workbench.training import TrainConfig

    settings = parse_overrides(param)
    features = settings.pop("features", None)
    configs = split_settings(settings, {"model_config": ModelConfig, "train_config": TrainConfig, "eval_config": EvalConfig})
    kinds = tuple(k.strip() for k in models.split(",") if k.strip())
    with console.status("cross-validating") as status:
        result = cross_validate(task, data, kinds, folds, features=features, seed=seed, progress=status.update, **configs)
    names = {"calibration_slope": "slope", "calibration_intercept": "intercept"}
    metrics = ("auroc", "auprc", "brier", "ece", "calibration_slope", "calibration_intercept")
    table = Table(title=f"{result.task}: {folds}-fold cross-validation by subject, pooled out-of-fold (95% CIs)")
    for column in ("model", *(names.get(m, m.upper()) for m in metrics), "MLflow run"):
        table.add_column(column, overflow="fold")
    for kind, evaluation in sorted(result.evaluations.items(), key=lambda kv: -kv[1].metrics["auroc"]["value"]):
        table.add_row(kind, *(format_with_ci(evaluation.metrics[m], 3) for m in metrics), result.run_ids.get(kind, ""))
    stdout_console().print(table)


# --- schedule commands ---

schedule_app = typer.Typer(no_args_is_help=True, help="Cron schedules that rerun pipelines (run by `workbench scheduler`).")
app.add_typer(schedule_app, name="schedule")


@schedule_app.command("add")
@reports_errors
def schedule_add(
    pipeline: Path = typer.Argument(..., help="Pipeline YAML, e.g. pipelines/pbc_mortality.yaml"),
    cron: str = typer.Option(..., "--cron", help='Crontab expression, local time: "0 2 * * 1" = Mondays 02:00'),
    param: Optional[list[str]] = typer.Option(None, "-p", "--param", help="Pipeline parameter override key=value (repeatable)"),
    name: Optional[str] = typer.Option(None, "--name", help="Schedule name (default: the pipeline's name)"),
    use_cache: bool = typer.Option(False, "--use-cache", help="Reuse unchanged steps (default: rerun every step)"),
) -> None:
    """Schedule a pipeline (checked now; nothing runs until `workbench scheduler` is running)."""
    from workbench.pipelines import parse_overrides
    from workbench.schedule import add_schedule, list_schedules

    added = add_schedule(pipeline, cron, parse_overrides(param), name=name, force=not use_cache)
    info = next(s for s in list_schedules() if s.name == added)
    console.print(f"scheduled {escape(added)}: next run {info.next_run:%Y-%m-%d %H:%M %Z}", highlight=False)


@schedule_app.command("list")
@reports_errors
def schedule_list(
    auroc_drop: float = typer.Option(0.05, "--auroc-drop", help="Flag a run whose held-out AUROC fell by more than this"),
) -> None:
    """Schedules with their next run, last run, last status and MLflow parent run."""
    reconcile_runs("workbench schedule list")
    from rich.table import Table

    from workbench.schedule import list_schedules

    styles = {"finished": "green", "failed": "bold red", "killed": "bold red", "skipped": "yellow", "running": "cyan"}
    table = Table(title="schedules")
    for column in ("name", "pipeline", "cron", "params", "next run", "last run", "status", "MLflow run", "flag"):
        table.add_column(column, overflow="fold")  # fold, never cut: the run link must stay whole
    for s in list_schedules(auroc_drop):
        status = s.last_status
        table.add_row(
            escape(s.name), escape(s.pipeline), escape(s.cron), escape(", ".join(f"{k}={v}" for k, v in s.overrides.items())),
            "paused" if s.next_run is None else f"{s.next_run:%Y-%m-%d %H:%M %Z}",
            s.last.triggered_at if s.last else "", f"[{styles.get(status, '')}]{status}[/]" if status else "",
            escape(s.run_link()), f"[bold red]AUROC fell > {auroc_drop:g}[/]" if s.auroc_dropped else "",
        )
    Console(width=200).print(table)


@schedule_app.command("remove")
@reports_errors
def schedule_remove(name: str = typer.Argument(..., help="Schedule name")) -> None:
    """Delete a schedule (its run history is kept)."""
    from workbench.schedule import remove_schedule

    remove_schedule(name)
    console.print(f"removed schedule {escape(name)}", highlight=False)


@schedule_app.command("pause")
@reports_errors
def schedule_pause(name: str = typer.Argument(..., help="Schedule name")) -> None:
    """Stop triggering a schedule until it is resumed."""
    from workbench.schedule import pause_schedule

    pause_schedule(name)
    console.print(f"paused schedule {escape(name)}", highlight=False)


@schedule_app.command("resume")
@reports_errors
def schedule_resume(name: str = typer.Argument(..., help="Schedule name")) -> None:
    """Trigger a paused schedule again from its next fire time."""
    from workbench.schedule import resume_schedule

    resume_schedule(name)
    console.print(f"resumed schedule {escape(name)}", highlight=False)


@app.command("scheduler")
@reports_errors
def scheduler_command(
    poll: float = typer.Option(10.0, "--poll", help="Seconds between re-reading the schedules others change"),
) -> None:
    """Run scheduled pipelines in the foreground until SIGTERM / Ctrl-C (waits for running pipelines)."""
    import logging

    from workbench.schedule import run_scheduler

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    run_scheduler(poll_seconds=poll)


# --- team commands (shared MLflow server, Prefect deployments) ---


@app.command("server")
@reports_errors
def server_command(
    backend_store_uri: str = typer.Option(
        ..., "--backend-store-uri", envvar="MLFLOW_BACKEND_STORE_URI",
        help="PostgreSQL URI, postgresql://USER[:PASSWORD]@HOST:PORT/DB (the password is passed as PGPASSWORD)",
    ),
    artifacts_destination: Optional[str] = typer.Option(
        None, "--artifacts-destination", help="Where proxied artifacts are stored: a directory or s3://... (default ./mlartifacts)"
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (loopback unless --public)."),
    port: int = typer.Option(5000, "--port", help="Port for the tracking server."),
    workers: int = typer.Option(2, "--workers", help="Server worker processes."),
    public: bool = typer.Option(False, "--public", help="Allow a non-loopback --host (put TLS in front of it)."),
    allowed_hosts: Optional[str] = typer.Option(None, "--allowed-hosts", help="Host headers to accept when public (mlflow's flag)."),
    auth_db_uri: Optional[str] = typer.Option(None, "--auth-db-uri", help="Database for users and permissions (default: the backend store)."),
    default_permission: str = typer.Option(
        "NO_PERMISSIONS", "--default-permission",
        help="What users may do with others' experiments: NO_PERMISSIONS (default: only what they are granted) or READ, EDIT, MANAGE.",
    ),
    state: Optional[Path] = typer.Option(None, "--state-dir", help="Holds basic_auth.ini and the CSRF key (default ./mlflow-server)."),
    print_only: bool = typer.Option(False, "--print", help="Print the mlflow server command line and exit."),
) -> None:
    """Start a shared MLflow tracking server: PostgreSQL store, proxied artifacts, basic auth (Ctrl-C or SIGTERM stops it)."""
    import shlex

    from workbench.server import serve, tracking_server_command

    command = tracking_server_command(
        backend_store_uri, artifacts_destination, host=host, port=port, workers=workers, public=public,
        auth_db_uri=auth_db_uri, default_permission=default_permission, allowed_hosts=allowed_hosts,
        state=state, check=not print_only,
    )
    if print_only:
        typer.echo(f"MLFLOW_AUTH_CONFIG_PATH={shlex.quote(command.env['MLFLOW_AUTH_CONFIG_PATH'])} {shlex.join(command.argv)}")
        return
    _public_warning(public and host not in ("127.0.0.1", "localhost", "::1"), host)
    console.print(
        f"MLflow tracking server: {command.url}  (clients: MLFLOW_TRACKING_URI={command.url.rstrip('/')} "
        "with MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)", highlight=False, soft_wrap=True,
    )
    code = serve(command)
    if code:
        raise typer.Exit(code)


@app.command("deploy")
@reports_errors
def deploy_command(
    pipeline: Path = typer.Argument(..., help="Pipeline YAML, e.g. pipelines/pbc_mortality.yaml"),
    cron: str = typer.Option(..., "--cron", help='Crontab expression: "0 2 * * 1" = Mondays 02:00'),
    param: Optional[list[str]] = typer.Option(None, "-p", "--param", help="Pipeline parameter override key=value (repeatable)"),
    name: Optional[str] = typer.Option(None, "--name", help="Deployment name (default: the pipeline's name)"),
    use_cache: bool = typer.Option(False, "--use-cache", help="Reuse unchanged steps (default: rerun every step, as `schedule add`)"),
    pool: Optional[str] = typer.Option(None, "--pool", help="Register with this Prefect work pool and return (its workers run it)"),
) -> None:
    """Put a pipeline on Prefect's scheduler: serve it here (Ctrl-C stops), or register it with a work pool."""
    from workbench.pipelines import load_pipeline, parse_overrides
    from workbench.pipelines.prefect_engine import deploy_to_work_pool, serve

    loaded = load_pipeline(pipeline, parse_overrides(param))
    if pool is None:
        serve(loaded, cron, name=name, force=not use_cache)
        return
    deployment_id = deploy_to_work_pool(loaded, cron, pool, name=name, force=not use_cache)
    console.print(f"deployment {deployment_id} on work pool {escape(pool)}: start workers with "
                  f"`prefect worker start --pool {escape(pool)}`", highlight=False, soft_wrap=True)

# --- pipeline commands ---


def stdout_console() -> Console:
    """Standard output; where it is not a terminal (a log, CI) wide enough that no id or path is cut."""
    return Console() if sys.stdout.isatty() else Console(width=250)


def print_pipeline_result(result) -> None:
    """Summary table of a pipeline run, where its notebooks are; a failed step's error and exit 1."""
    from rich.table import Table

    out = stdout_console()
    styles = {"finished": "green", "cached": "cyan", "failed": "bold red"}
    table = Table(title=f"pipeline {result.pipeline}  {result.pipeline_run_id}")
    for column in ("step", "status", "seconds", "MLflow run"):
        table.add_column(column, overflow="fold")
    for r in result.executions:
        table.add_row(
            escape(r.label), f"[{styles[r.status]}]{r.status}[/]",
            "" if r.status == "cached" else f"{r.seconds:.1f}", r.run_id or "",
        )
    out.print(table)
    out.print(f"executed notebooks (.ipynb and .html) and step outputs: {escape(str(result.run_dir))}", highlight=False, soft_wrap=True)
    out.print(f"parent MLflow run: {result.parent_run_id}", highlight=False)
    failed = result.failure
    if failed is not None:
        console.print(f"[bold red]failed:[/] {escape(failed.error)}", highlight=False, soft_wrap=True)
        if failed.notebook is not None:
            console.print(f"executed notebook with the error: {escape(str(failed.notebook))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    print_models(result)


def print_models(result) -> None:
    """The held-out metrics of the models a pipeline trained (cached ones included), best AUROC first,
    and whether the best sequence model beats the best reference (both picked on tuning)."""
    from rich.table import Table

    from workbench.comparison import METRICS, sequence_vs_reference, train_run_ids
    from workbench.evaluation import format_with_ci
    from workbench.tracking import held_out_predictions, runs_table

    handed = train_run_ids({"train": [r.output_dir for r in result.step("train")]})
    if not handed:
        return
    if print_survival_models(result):
        return
    models = runs_table(result.experiment, run_ids=handed[0])
    table = Table(title=f"held-out metrics, 95% CIs from a bootstrap over patients (experiment {result.experiment})")
    for column in ("model", "tuning AUROC", *(m.upper() for m in METRICS), "MLflow run"):
        table.add_column(column, overflow="fold")
    for row in models.iter_rows(named=True):
        cells = [format_with_ci({"value": row[m], "ci_low": row[f"{m}_ci_low"], "ci_high": row[f"{m}_ci_high"]}, 3) for m in METRICS]
        tuning = "" if row["tuning_auroc"] is None else f"{row['tuning_auroc']:.3f}"
        table.add_row(escape(row["model"]), tuning, *cells, row["run_id"])
    out = stdout_console()
    out.print(table)
    for kind, reason in handed[1].items():
        out.print(f"{escape(kind)}: not fitted ({escape(reason)})", highlight=False, soft_wrap=True)
    verdict = sequence_vs_reference(models, held_out_predictions(models)) if models.height else None
    if verdict:
        out.print(escape(verdict["sentence"]), highlight=False, soft_wrap=True)


def print_survival_models(result) -> bool:
    """A survival sweep's held-out metrics (True), or nothing when the train steps are binary (False)."""
    from rich.table import Table

    from workbench import record
    from workbench.evaluation import format_with_ci

    runs = record.handed_model_runs([r.output_dir for r in result.step("train")])
    fitted = [r for r in runs if r.get("task_kind") == "survival" and not r.get("skipped")]
    if not fitted:
        return False
    from workbench.survival_run import COMPARED, CHAMPION_METRIC, metrics_table

    models = metrics_table([r["run_id"] for r in fitted], fitted[0]["horizons_days"])
    shown = [CHAMPION_METRIC, *COMPARED]
    table = Table(title=f"held-out metrics, 95% CIs from a bootstrap over patients (experiment {result.experiment})")
    for column in ("model", "tuning td-AUC 2 y", "td-AUC 2 y", "Uno's C", "Harrell's C", "integrated Brier", "MLflow run"):
        table.add_column(column, overflow="fold")
    for row in models.iter_rows(named=True):
        cells = [format_with_ci({"value": row[m], "ci_low": row[f"{m}_ci_low"], "ci_high": row[f"{m}_ci_high"]}, 3) for m in shown]
        tuning = "" if row["tuning_td_auc"] is None else f"{row['tuning_td_auc']:.3f}"
        table.add_row(escape(row["model"]), tuning, *cells, row["run_id"])
    out = stdout_console()
    out.print(table)
    for r in runs:
        if r.get("skipped"):
            out.print(f"{escape(r['kind'])}: not fitted ({escape(r['skipped'])})", highlight=False, soft_wrap=True)
    return True


@app.command("run")
@reports_errors
def run_pipeline_command(
    pipeline: str = typer.Argument(..., help="Pipeline YAML or shipped name: pipelines/pbc_mortality.yaml, risk_model"),
    param: Optional[list[str]] = typer.Option(
        None, "-p", "--param", help="Override a pipeline or notebook parameter: key=value (repeatable)"
    ),
    force: bool = typer.Option(False, "--force", help="Rerun every step, even those whose inputs are unchanged"),
    engine: Optional[str] = typer.Option(
        None, "--engine", help="local, or prefect (a Prefect flow; see docs/teams.md); default: the pipeline's engine"
    ),
    workers: Optional[int] = typer.Option(
        None, "--workers", min=1, help="Steps run at once, each in its own kernel (local engine; default: one per core)"
    ),
) -> None:
    """Run a pipeline's notebooks with Papermill, one MLflow run each (exit 1 if a step fails)."""
    reconcile_runs("workbench run")
    from workbench.pipelines import parse_overrides, run_pipeline

    result = run_stoppable(lambda: run_pipeline(find_pipeline(pipeline), parse_overrides(param), force=force,
                                                engine=engine, console=console, workers=workers))
    print_pipeline_result(result)


def run_stoppable(job):
    """Run ``job`` so that SIGTERM (a `timeout`, a scheduler's stop, `kill`) ends it like Ctrl-C: the
    running step and the pipeline's runs are closed FAILED on the way out instead of left RUNNING."""
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        return job()
    except KeyboardInterrupt as exc:
        console.print(f"[bold red]stopped[/] ({escape(str(exc) or 'interrupted')}): the pipeline's MLflow runs are "
                      "marked FAILED; rerun to continue from the steps that finished", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- runs commands (reconcile) ---

runs_app = typer.Typer(no_args_is_help=True, help="Pipeline runs in MLflow: settle the ones whose process died.")
app.add_typer(runs_app, name="runs")


def reconcile_runs(found_by: str, strict: bool = False) -> list:
    """Mark KILLED the RUNNING pipeline runs whose owner process is gone, one line each on stderr.

    Called first by ``run``, ``ui`` and ``schedule list``; there a problem (store unreachable)
    is a warning, never the command's failure. ``strict`` lets it raise instead.
    """
    from workbench.runs import reconcile

    try:
        killed = reconcile(found_by)
    except Exception as exc:
        if strict:
            raise
        console.print(f"[yellow]warning:[/] could not check for killed runs: {escape(f'{type(exc).__name__}: {exc}')}",
                      highlight=False, soft_wrap=True)
        return []
    for run in killed:
        console.print(f"[bold red]killed:[/] {escape(run.describe())}", highlight=False, soft_wrap=True)
    return killed


@runs_app.command("reconcile")
@reports_errors
def runs_reconcile() -> None:
    """Mark KILLED the RUNNING pipeline runs (and steps) whose process died; tidy their run folders.

    A run's owner is the process holding its lock (runs/<pipeline>/<run>/.owner.lock); runs of
    a live owner, or of one on another host, are left alone. `workbench run`, `workbench ui`
    and `workbench schedule list` do the same first.
    """
    killed = reconcile_runs("workbench runs reconcile", strict=True)
    if not killed:
        stdout_console().print("no killed runs: every RUNNING pipeline run has a live owner", highlight=False)


# --- demo ---


def find_pipeline(name_or_path: str | Path) -> Path:
    """A pipeline YAML: the path given, else a shipped pipeline of that name (``risk_model``) in the
    project's ``pipelines/`` or the one beside the package."""
    from workbench.tracking import project_home

    path = Path(name_or_path)
    if path.exists() or path.suffix in (".yaml", ".yml"):
        return path
    folders = [project_home() / "pipelines", Path(__file__).resolve().parents[1] / "pipelines"]
    for folder in folders:
        if (folder / f"{path.name}.yaml").is_file():
            return folder / f"{path.name}.yaml"
    shipped = sorted({p.stem for folder in folders if folder.is_dir() for p in folder.glob("*.yaml")})
    raise WorkbenchError(f"pipeline {str(name_or_path)!r}: no such file and no shipped pipeline of that name "
                         f"(shipped: {', '.join(shipped) or 'none'})")


@app.command()
@reports_errors
def demo(
    param: Optional[list[str]] = typer.Option(None, "-p", "--param", help="Override a pipeline parameter: key=value"),
    force: bool = typer.Option(False, "--force", help="Rerun every step, even cached ones"),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Steps run at once (default: one per core)"),
) -> None:
    """The main job: the pbc_mortality pipeline end to end on the bundled PBC data, local MLflow."""
    from mlflow.tracking import MlflowClient

    from workbench import record, tracking
    from workbench.data.datasets import load
    from workbench.data.validate import require_valid
    from workbench.pipelines import parse_overrides, run_pipeline

    print_validation(require_valid(load("pbc")))
    result = run_pipeline(find_pipeline("pbc_mortality"), parse_overrides(param), force=force, console=console,
                          workers=workers)
    print_pipeline_result(result)
    champion = MlflowClient().get_model_version_by_alias("pbc_mortality", record.CHAMPION)
    stdout_console().print(
        f"\n[bold]Where to look[/]\n"
        f"  MLflow UI:          workbench ui   (then open http://127.0.0.1:5000, experiment pbc_mortality)\n"
        f"  notebooks:          {escape(str(result.run_dir))}  (executed .ipynb and .html per step)\n"
        f"  champion model:     models:/pbc_mortality@champion = version {champion.version} "
        f"(run {champion.run_id}); load it with mlflow.pyfunc.load_model and predict on MEDS events\n"
        f"  tracking store:     {tracking.tracking_uri()}", highlight=False, soft_wrap=True)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
