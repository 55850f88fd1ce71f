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


@app.command()
@reports_errors
def demo() -> None:
    """The main job: validate the bundled PBC dataset and print its summary."""
    from workbench.data.datasets import load
    from workbench.data.validate import validate_dataset

    report = validate_dataset(load("pbc"))
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

    from workbench.tasks import make_labels

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # printed below from the report instead
        result = make_labels(data, task)
    result.save(out)
    stdout = _Console()
    stdout.print(result.report.to_rich())
    for note in result.report.warnings:
        console.print(f"[bold yellow]warning:[/] {escape(note)}", highlight=False, soft_wrap=True)
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(result.report.to_dict(), indent=2) + "\n")
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

    if spec is not None and config is not None:
        raise WorkbenchError("--spec and --config are exclusive: a saved spec already holds its config")
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

# --- pipeline commands ---


def print_pipeline_result(result) -> None:
    """Summary table of a pipeline run: one row per execution, then where its notebooks are."""
    from rich.table import Table

    out = Console()
    styles = {"finished": "green", "cached": "cyan", "failed": "bold red"}
    table = Table(title=f"pipeline {result.pipeline}  {result.pipeline_run_id}")
    for column in ("step", "status", "seconds", "MLflow run", "output"):
        table.add_column(column)
    for r in result.executions:
        table.add_row(
            escape(r.label), f"[{styles[r.status]}]{r.status}[/]",
            "" if r.status == "cached" else f"{r.seconds:.1f}", r.run_id or "", escape(str(r.output_dir)),
        )
    out.print(table)
    out.print(f"executed notebooks: {escape(str(result.run_dir))}", highlight=False, soft_wrap=True)
    out.print(f"parent MLflow run: {result.parent_run_id}", highlight=False)


@app.command("run")
@reports_errors
def run_pipeline_command(
    pipeline: Path = typer.Argument(..., help="Pipeline YAML, e.g. pipelines/pbc_mortality.yaml"),
    param: Optional[list[str]] = typer.Option(
        None, "-p", "--param", help="Override a pipeline or notebook parameter: key=value (repeatable)"
    ),
    force: bool = typer.Option(False, "--force", help="Rerun every step, even those whose inputs are unchanged"),
) -> None:
    """Run a pipeline's notebooks with Papermill, one MLflow run each (exit 1 if a step fails)."""
    from workbench.pipelines import parse_overrides, run_pipeline

    result = run_pipeline(pipeline, parse_overrides(param), force=force, console=console)
    print_pipeline_result(result)
    failed = result.failure
    if failed is not None:
        console.print(f"[bold red]failed:[/] {escape(failed.error)}", highlight=False, soft_wrap=True)
        if failed.notebook is not None:
            console.print(f"executed notebook with the error: {escape(str(failed.notebook))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
