"""Terminal drawing: tables and lines for each result type, fit to the terminal (DESIGN.md §2)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from amq.report import fmt


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], file=None) -> None:
    """Print a table to the terminal (rich), plain when not a TTY."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, title_justify="left", show_lines=False)
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*[fmt(v) for v in r])
    Console(file=file or sys.stdout, width=max(100, min(160, _width()))).print(t)


def _width() -> int:
    try:
        return os.get_terminal_size().columns
    except OSError:
        return 120
