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
from dataclasses import dataclass
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


def fmt_ci(ci: Sequence[Any] | None) -> str:
    """A confidence interval as amq prints it in tables, CSV and pages: [low, high]."""
    return "" if ci is None else f"[{fmt(ci[0])}, {fmt(ci[1])}]"


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
# HTML: the one template and style of every report. A page is self-contained (inline CSS and SVG,
# no scripts, nothing fetched). A report supplies content only: a title, a one-paragraph verdict
# in plain words computed from its data, then sections built from the helpers below (charts
# with labelled axes and units, tables with human column names that fit the page width).

CSS = """
body{font-family:system-ui,sans-serif;color:#222;line-height:1.4;max-width:1100px;margin:24px auto;padding:0 16px}
h1{font-size:22px;margin:0 0 8px}h2{font-size:17px;margin:32px 0 8px}
p.verdict{font-size:16px;background:#f3f6fa;border-left:4px solid #337ab7;padding:10px 14px;margin:0 0 8px}
p.sub,p.small{font-size:13px;color:#555}
svg.chart{display:block;max-width:100%;height:auto}
svg.chart text{font-family:system-ui,sans-serif;font-size:12px;fill:#333}
svg.chart text.axis-label{font-weight:600;fill:#222}
svg.chart .ci{stroke:#222;stroke-width:1.2;fill:none}
svg.chart .grid{stroke:#e4e4e4}
table{border-collapse:collapse;font-size:12px;width:100%}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:right;vertical-align:top}
th{background:#f4f4f4;position:sticky;top:0}
th.t,td.t{text-align:left;overflow-wrap:break-word}
td.bad{background:#fadbd8}td.warn{background:#fde5c8}td.good{background:#d9f2d9}
.legend{font-size:13px;margin:4px 0}
.legend span{display:inline-block;margin-right:14px}
.legend i{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:middle}
"""

RED, BLUE, ORANGE, GREEN, GREY = "#d9534f", "#337ab7", "#ff7f0e", "#2ca02c", "#999999"


def _esc(v: Any) -> str:
    import html

    return html.escape(fmt(v) if not isinstance(v, str) else v)


def html_page(title: str, verdict: str, blocks: Sequence[str], subtitle: str = "") -> str:
    """The page: the title, the verdict (one paragraph, plain words), an optional line of facts
    (sources, sample counts), then the report's blocks (``section``s)."""
    sub = f'<p class="sub">{_esc(subtitle)}</p>' if subtitle else ""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{CSS}</style></head><body>\n"
        f'<h1>{_esc(title)}</h1>\n<p class="verdict">{_esc(verdict)}</p>{sub}\n'
        + "\n".join(b for b in blocks if b)
        + "\n</body></html>\n"
    )


def section(heading: str, *parts: str) -> str:
    """A heading and its content (HTML from the helpers here)."""
    return f"<section><h2>{_esc(heading)}</h2>{''.join(parts)}</section>"


def small(text: str) -> str:
    """An explanatory paragraph in small print (plain text)."""
    return f'<p class="small">{_esc(text)}</p>'


def bullet_list(items: Sequence[str]) -> str:
    return "<ul>" + "".join(f"<li>{_esc(i)}</li>" for i in items) + "</ul>" if items else ""


def legend(colors: Sequence[tuple[str, str]]) -> str:
    """(label, colour) pairs as a legend line above a chart."""
    spans = "".join(f'<span><i style="background:{c}"></i>{_esc(k)}</span>' for k, c in colors)
    return f'<div class="legend">{spans}</div>'


def _breakable(name: str) -> str:
    """A long tensor name that may wrap before each '/' and after each '.' (a part longer than
    its column still breaks: overflow-wrap)."""
    import html

    return html.escape(name).replace("/", "<wbr>/").replace(".", ".<wbr>")


def html_table(
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    text_columns: Sequence[int] = (0,),
    marks: Sequence[str] | None = None,
    mark_column: int | None = None,
) -> str:
    """A table at the page's width: ``columns`` are human names; ``text_columns`` (indices) are
    left-aligned names that wrap at '/' and '.'; ``marks[i]`` (bad | warn | good) colours
    row i's ``mark_column`` cell."""
    text = set(text_columns)
    head = "".join(
        ('<th class="t">' if i in text else "<th>") + f"{_esc(c)}</th>"
        for i, c in enumerate(columns)
    )
    body = []
    for k, r in enumerate(rows):
        cells = []
        for i, v in enumerate(r):
            cls = ["t"] if i in text else []
            if marks is not None and i == mark_column and marks[k]:
                cls.append(marks[k])
            attr = f' class="{" ".join(cls)}"' if cls else ""
            shown = _breakable(v) if i in text and isinstance(v, str) else _esc(v)
            cells.append(f"<td{attr}>{shown}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values from at or below ``lo`` to at or above ``hi``."""
    span = hi - lo
    if not (span > 0 and math.isfinite(span)):
        return [lo]
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step + 1e-9) * step
    last = math.ceil(hi / step - 1e-9) * step
    return [first + i * step for i in range(int(round((last - first) / step)) + 1)]


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def _padded(vs: Sequence[float]) -> tuple[float, float]:
    """The span of ``vs`` widened by 5% on each side, so no point sits on the plot's border."""
    lo, hi = min(vs), max(vs)
    pad = 0.05 * (hi - lo) if hi > lo else 0.5
    return lo - pad, hi + pad


def _svg_open(width: int, height: int, label: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}"><title>{_esc(label)}</title>'
    )


@dataclass(frozen=True)
class Bar:
    """One bar of ``svg_bars``: its value, an optional confidence interval (drawn as a whisker),
    an optional thin second bar (``inner``), a note after the value (``text`` replaces the value
    and note) and a tooltip."""

    label: str
    value: float | None
    ci: tuple[float, float] | None = None
    color: str = RED
    inner: float | None = None
    note: str = ""
    tooltip: str = ""
    text: str = ""


def svg_bars(bars: Sequence[Bar], value_axis: str, item_axis: str, width: int = 820) -> str:
    """Horizontal bars as inline SVG: one row per bar (labels shortened from the left, full name
    in the tooltip), a value axis with ticks labelled ``value_axis`` (give the unit), the label
    column headed ``item_axis``. Negative values go left of zero; a CI is a whisker with caps."""
    if not bars:
        return "<p>(no data)</p>"
    ends = [v for b in bars for v in (b.value, b.inner, *(b.ci or ())) if _finite(v)]
    lo, hi = min(0.0, *ends), max(0.0, *ends)
    ticks = _ticks(lo, hi if hi > lo else lo + 1)
    lo, hi = min(lo, ticks[0]), max(hi, ticks[-1])
    row, label_w, right, top = 22, 290, 130, 26
    plot_w = width - label_w - right
    h = top + row * len(bars) + 44

    def sx(v: float) -> float:
        return label_w + (v - lo) / ((hi - lo) or 1.0) * plot_w

    parts = [_svg_open(width, h, f"{value_axis} per {item_axis}")]
    parts.append(
        f'<text class="axis-label" x="{label_w - 6}" y="{top - 10}" text-anchor="end">'
        f"{_esc(item_axis)}</text>"
    )
    bottom = top + row * len(bars)
    for t in ticks:
        parts.append(
            f'<line class="grid" x1="{sx(t):.1f}" y1="{top - 4}" x2="{sx(t):.1f}" y2="{bottom}"/>'
            f'<text x="{sx(t):.1f}" y="{bottom + 14}" text-anchor="middle">{_esc(fmt(t))}</text>'
        )
    x0 = sx(0.0)
    for i, b in enumerate(bars):
        y = top + i * row
        tip = _esc(b.tooltip or f"{b.label}: {fmt(b.value)}")
        short = b.label if len(b.label) <= 42 else "…" + b.label[-41:]
        parts.append(
            f'<text x="{label_w - 6}" y="{y + 14}" text-anchor="end"><title>{_esc(b.label)}'
            f"</title>{_esc(short)}</text>"
        )
        v = b.value if _finite(b.value) else 0.0
        left, w = min(x0, sx(v)), abs(sx(v) - x0)
        parts.append(
            f'<rect x="{left:.1f}" y="{y + 3}" width="{max(w, 1):.1f}" height="12" '
            f'fill="{b.color}"><title>{tip}</title></rect>'
        )
        end = max(x0, sx(v))
        if _finite(b.inner):
            il, iw = min(x0, sx(b.inner)), abs(sx(b.inner) - x0)
            parts.append(
                f'<rect x="{il:.1f}" y="{y + 16}" width="{max(iw, 1):.1f}" height="4" fill="#555"/>'
            )
            end = max(end, sx(b.inner))
        if b.ci is not None and _finite(b.ci[0]) and _finite(b.ci[1]):
            c0, c1 = sx(b.ci[0]), sx(b.ci[1])
            parts.append(
                f'<path class="ci" d="M{c0:.1f} {y + 5}v8M{c0:.1f} {y + 9}H{c1:.1f}'
                f'M{c1:.1f} {y + 5}v8"><title>95% CI {fmt(b.ci[0])} to {fmt(b.ci[1])}</title></path>'
            )
            end = max(end, c0, c1)
        text = b.text or fmt(b.value) + (f" {b.note}" if b.note else "")
        parts.append(f'<text x="{end + 4:.1f}" y="{y + 14}">{_esc(text)}</text>')
    parts.append(f'<line x1="{x0:.1f}" y1="{top - 4}" x2="{x0:.1f}" y2="{bottom}" stroke="#333"/>')
    parts.append(
        f'<text class="axis-label" x="{label_w + plot_w / 2:.1f}" y="{h - 6}" '
        f'text-anchor="middle">{_esc(value_axis)}</text></svg>'
    )
    return "".join(parts)


@dataclass(frozen=True)
class Point:
    """One point of ``svg_scatter``: an optional CI on y (a whisker); ``front`` points are
    highlighted and joined (e.g. a Pareto front)."""

    x: float
    y: float
    ci: tuple[float, float] | None = None
    front: bool = False
    tooltip: str = ""


def svg_scatter(
    points: Sequence[Point],
    x_axis: str,
    y_axis: str,
    hline: float | None = None,
    hline_label: str = "",
    width: int = 720,
    height: int = 400,
) -> str:
    """A scatter plot as inline SVG: grey points, highlighted ``front`` points joined in red,
    vertical CI whiskers, an optional dashed horizontal line (e.g. the budget); both axes have
    ticks and a label (give the unit)."""
    pts = [p for p in points if _finite(p.x) and _finite(p.y)]
    if not pts:
        return "<p>(no evaluated trials)</p>"
    xs = [p.x for p in pts]
    ys = [p.y for p in pts] + [v for p in pts if p.ci for v in p.ci if _finite(v)]
    ys += [hline] if _finite(hline) else []
    xt = _ticks(*_padded(xs))
    yt = _ticks(*_padded(ys))
    x0, x1 = min(xt[0], *xs), max(xt[-1], *xs)
    y0, y1 = min(yt[0], *ys), max(yt[-1], *ys)
    ml, mr, mt, mb = 70, 20, 16, 50

    def sx(x: float) -> float:
        return ml + (x - x0) / ((x1 - x0) or 1.0) * (width - ml - mr)

    def sy(y: float) -> float:
        return height - mb - (y - y0) / ((y1 - y0) or 1.0) * (height - mt - mb)

    parts = [_svg_open(width, height, f"{y_axis} against {x_axis}")]
    for t in xt:
        parts.append(
            f'<line class="grid" x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{mt}" y2="{height - mb}"/>'
            f'<text x="{sx(t):.1f}" y="{height - mb + 16}" text-anchor="middle">{_esc(fmt(t))}</text>'
        )
    for t in yt:
        parts.append(
            f'<line class="grid" x1="{ml}" x2="{width - mr}" y1="{sy(t):.1f}" y2="{sy(t):.1f}"/>'
            f'<text x="{ml - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{_esc(fmt(t))}</text>'
        )
    parts.append(
        f'<rect x="{ml}" y="{mt}" width="{width - ml - mr}" height="{height - mt - mb}" '
        'fill="none" stroke="#999"/>'
    )
    if _finite(hline):
        parts.append(
            f'<line x1="{ml}" x2="{width - mr}" y1="{sy(hline):.1f}" y2="{sy(hline):.1f}" '
            f'stroke="{BLUE}" stroke-dasharray="6,4"/><text x="{width - mr - 4}" '
            f'y="{sy(hline) - 4:.1f}" text-anchor="end" fill="{BLUE}">{_esc(hline_label)}</text>'
        )
    for p in pts:
        if p.ci is not None and _finite(p.ci[0]) and _finite(p.ci[1]):
            a, b, x = sy(p.ci[0]), sy(p.ci[1]), sx(p.x)
            parts.append(
                f'<path class="ci" d="M{x - 3:.1f} {a:.1f}h6M{x:.1f} {a:.1f}V{b:.1f}M{x - 3:.1f} '
                f'{b:.1f}h6"/>'
            )
    front = sorted((p for p in pts if p.front), key=lambda p: (p.x, p.y))
    if front:
        path = " ".join(f"{sx(p.x):.1f},{sy(p.y):.1f}" for p in front)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{RED}" stroke-width="2"/>')
    for p in pts:
        r, c = (4, RED) if p.front else (3, "#777")
        tip = f"<title>{_esc(p.tooltip)}</title>" if p.tooltip else ""
        parts.append(
            f'<circle cx="{sx(p.x):.1f}" cy="{sy(p.y):.1f}" r="{r}" fill="{c}">{tip}</circle>'
        )
    parts.append(
        f'<text class="axis-label" x="{ml + (width - ml - mr) / 2:.1f}" y="{height - 10}" '
        f'text-anchor="middle">{_esc(x_axis)}</text>'
        f'<text class="axis-label" x="16" y="{(mt + height - mb) / 2:.1f}" '
        f'transform="rotate(-90 16 {(mt + height - mb) / 2:.1f})" text-anchor="middle">'
        f"{_esc(y_axis)}</text></svg>"
    )
    return "".join(parts)


def metric_unit(metric: str) -> str:
    """The unit of a metric's values and drops, for axis labels: top1 and agreement are in %
    (a drop in percentage points), SQNR in dB; cosine and user metrics have none."""
    return {"top1": "points", "agreement": "points", "sqnr": "dB", "neg_mse": "MSE"}.get(metric, "")


def with_unit(label: str, unit: str) -> str:
    return f"{label} ({unit})" if unit else label
