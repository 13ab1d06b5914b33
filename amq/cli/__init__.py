"""Command line (DESIGN.md §6): parse -> config -> one API call -> render, exit code; no logic of
its own. app.py holds the group, the errors and the one pattern of every command; quantize.py,
measure.py and tune.py the commands."""

from amq.cli import measure, quantize, tune  # noqa: F401  (each registers its commands)
from amq.cli.app import cli, main

__all__ = ["cli", "main"]
