"""Benchmarks: each module is one command (``python -m benchmarks.NAME``) printing ratios
against a baseline measured in the same run. ``python -m benchmarks`` runs them all."""
