"""Errors the workbench reports to users.

Every user-facing failure is a :class:`WorkbenchError`: the CLI prints its message and exits
with ``exit_code`` (2 for bad input), and never prints a traceback for it.
"""

from __future__ import annotations


class WorkbenchError(Exception):
    """A failure caused by the user's input, reported without a traceback."""

    exit_code = 2


class DataValidationError(WorkbenchError):
    """A MEDS dataset failed validation; ``report`` holds every problem found."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


class SourceTableError(WorkbenchError):
    """A source table could not be imported into MEDS (names the row and column)."""
