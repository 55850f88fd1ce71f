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

# --- import commands ---

# --- task commands ---

# --- feature commands ---


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
