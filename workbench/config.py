"""Validators shared by the stage configs (tasks, features)."""

from __future__ import annotations

import re


def check_regexes(patterns: list[str]) -> list[str]:
    """Pydantic validator body: every pattern must compile (the message names the bad one)."""
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from None
    return patterns
