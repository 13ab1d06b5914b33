"""Output: atomic file writes, progress bars, number formatting, CSV/JSON, and the HTML reports' one
template and style. Terminal tables are render.py's."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from amq.errors import OutputError


def atomic_write(path: str | os.PathLike[str], data: bytes | str) -> Path:
    """Write to a temp file in the same folder, then rename: a crash never leaves half a file."""
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    except OSError as e:
        raise OutputError(
            f"{p}: cannot write here ({e.strerror or e}); choose another output path"
        ) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
        os.replace(tmp, p)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise OutputError(
            f"{p}: cannot write ({e.strerror or e}); check space and permissions"
        ) from None
    return p


def check_writable(path: str | os.PathLike[str]) -> None:
    """Fail early (before long work) when an output cannot be created."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    probe = parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if p.exists() and p.is_dir():
        raise OutputError(f"{p}: is a folder; give a file path for the output")
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise OutputError(f"{p}: folder {parent} is not writable; choose another output path")


@contextlib.contextmanager
def progress(
    total: int | None, description: str, enabled: bool = True
) -> Iterator[Callable[..., None]]:
    """A progress bar on stderr with elapsed time and ETA; yields ``advance(n, text=None)``
    (``text`` replaces the description: a live status line)."""
    if not enabled:
        yield lambda n, text=None: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=not console.is_terminal,
    ) as bar:
        task = bar.add_task(description, total=total)

        def advance(n: int, text: str | None = None) -> None:
            bar.update(task, advance=n, **({"description": text} if text else {}))

        yield advance


def fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if math.isnan(v):
            return "nan"
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.{digits - 1}e}"
        return f"{v:.{digits}g}"
    return str(v)


def to_csv(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(columns)
    for r in rows:
        w.writerow(["" if v is None else v for v in r])
    return buf.getvalue()


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=1, default=_json_default, allow_nan=True)


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(o)
    if isinstance(o, Path):
        return str(o)
    return str(o)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


# ---------------------------------------------------------------------------------------------
# HTML: self-contained pages (inline CSS and SVG, no scripts, nothing fetched)


def _esc(v: Any) -> str:
    import html

    return html.escape(fmt(v) if not isinstance(v, str) else v)


def svg_bars(
    labels: Sequence[str], values: Sequence[float], unit: str = "", width: int = 760
) -> str:
    """A horizontal bar chart as inline SVG (negative values drawn to the left of the axis)."""
    vals = [0.0 if (v is None or not math.isfinite(v)) else float(v) for v in values]
    if not vals:
        return "<p>(no data)</p>"
    row, label_w, pad = 22, 300, 70
    lo, hi = min(0.0, *vals), max(0.0, *vals)
    span = (hi - lo) or 1.0
    plot_w = width - label_w - pad
    x0 = label_w + (0 - lo) / span * plot_w
    h = row * len(vals) + 24
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h}" font-family="sans-serif" font-size="12">'
    ]
    for i, (lab, v) in enumerate(zip(labels, vals, strict=True)):
        y = 4 + i * row
        x1 = label_w + (v - lo) / span * plot_w
        left, w = min(x0, x1), abs(x1 - x0)
        short = lab if len(lab) <= 44 else "..." + lab[-41:]
        parts.append(f'<text x="{label_w - 6}" y="{y + 14}" text-anchor="end">{_esc(short)}</text>')
        parts.append(
            f'<rect x="{left:.1f}" y="{y + 2}" width="{max(w, 1):.1f}" height="{row - 6}" fill="#d9534f"/>'
        )
        parts.append(f'<text x="{max(x0, x1) + 4:.1f}" y="{y + 14}">{_esc(fmt(v))}</text>')
    parts.append(f'<line x1="{x0:.1f}" y1="0" x2="{x0:.1f}" y2="{h - 20}" stroke="#333"/>')
    parts.append(f'<text x="{label_w}" y="{h - 4}">{_esc(unit)}</text></svg>')
    return "".join(parts)


def html_page(
    title: str,
    intro: str,
    sections: Sequence[tuple[str, str]],
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
) -> str:
    css = (
        "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}td:first-child,th:first-child{text-align:left}"
        "th{background:#f0f0f0;position:sticky;top:0}"
    )
    out = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{_esc(title)}</title><style>{css}</style></head><body>"
    ]
    out.append(f"<h1>{_esc(title)}</h1><p>{_esc(intro)}</p>")
    for head, svg in sections:
        out.append(f"<h2>{_esc(head)}</h2>{svg}")
    out.append(
        "<h2>All rows</h2><table><tr>" + "".join(f"<th>{_esc(c)}</th>" for c in columns) + "</tr>"
    )
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{_esc(v)}</td>" for v in r) + "</tr>")
    out.append("</table></body></html>")
    return "\n".join(out)


def svg_scatter(
    points: Sequence[tuple[float, float]],
    highlight: Sequence[tuple[float, float]] = (),
    x_label: str = "",
    y_label: str = "",
    hline: float | None = None,
    width: int = 640,
    height: int = 360,
) -> str:
    """A scatter plot as inline SVG: grey points, highlighted points (e.g. a Pareto front) joined
    in red, an optional dashed horizontal line (e.g. the budget)."""
    pts = [
        (x, y)
        for x, y in points
        if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)
    ]
    if not pts:
        return "<p>(no completed trials)</p>"
    xs = [p[0] for p in pts] + [p[0] for p in highlight]
    ys = [p[1] for p in pts] + [p[1] for p in highlight] + ([hline] if hline is not None else [])
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    x1 = x1 if x1 > x0 else x0 + 1
    y1 = y1 if y1 > y0 else y0 + 1
    m = 50

    def sx(x: float) -> float:
        return m + (x - x0) / (x1 - x0) * (width - 2 * m)

    def sy(y: float) -> float:
        return height - m - (y - y0) / (y1 - y0) * (height - 2 * m)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">'
    ]
    parts.append(
        f'<rect x="{m}" y="{m}" width="{width - 2 * m}" height="{height - 2 * m}" fill="none" stroke="#999"/>'
    )
    for x, y in pts:
        parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="#888"/>')
    hl = sorted(highlight)
    if hl:
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in hl)
        parts.append(f'<polyline points="{path}" fill="none" stroke="#d9534f" stroke-width="2"/>')
        for x, y in hl:
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="4" fill="#d9534f"/>')
    if hline is not None:
        parts.append(
            f'<line x1="{m}" x2="{width - m}" y1="{sy(hline):.1f}" y2="{sy(hline):.1f}" stroke="#337ab7" stroke-dasharray="6,4"/>'
        )
    parts.append(
        f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle">{_esc(x_label)}</text>'
    )
    parts.append(
        f'<text x="14" y="{height / 2}" transform="rotate(-90 14 {height / 2})" text-anchor="middle">{_esc(y_label)}</text>'
    )
    for v, anchor in ((x0, "start"), (x1, "end")):
        parts.append(
            f'<text x="{sx(v):.1f}" y="{height - m + 16}" text-anchor="{anchor}">{_esc(fmt(v))}</text>'
        )
    for v in (y0, y1):
        parts.append(
            f'<text x="{m - 4}" y="{sy(v) + 4:.1f}" text-anchor="end">{_esc(fmt(v))}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)
