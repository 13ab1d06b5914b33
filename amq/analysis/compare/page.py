"""The compare report's HTML page."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

from amq.analysis.compare.diagnose import (
    CLIP_FRACTION,
    COLUMNS,
    OK_SQNR_DB,
    CompareReport,
    TensorRow,
)
from amq.report import fmt

COLORS = {"clipping": "#d62728", "rounding": "#ff7f0e", "ok": "#2ca02c", "n/a": "#999999"}


def _svg_chart(rows: Sequence[TensorRow]) -> str:
    """Horizontal bars of the accumulated SQNR (and a thin bar for the own quantizer's SQNR)."""
    if not rows:
        return ""
    label_w, bar_w, row_h, top = 360, 480, 24, 28
    finite = [
        v
        for r in rows
        for v in (r.sqnr_db, r.own_sqnr_db)
        if v is not None and math.isfinite(v) and v > 0
    ]
    vmax = max([60.0, *finite])
    h = top + row_h * len(rows) + 10
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + bar_w + 90}" height="{h}" '
        f'font-family="sans-serif" font-size="12">'
    ]
    for db in range(0, int(vmax) + 1, 10):
        x = label_w + bar_w * db / vmax
        out.append(
            f'<line x1="{x:.1f}" y1="{top - 6}" x2="{x:.1f}" y2="{h - 8}" stroke="#ddd"/>'
            f'<text x="{x:.1f}" y="{top - 10}" text-anchor="middle" fill="#555">{db} dB</text>'
        )
    for i, r in enumerate(rows):
        y = top + i * row_h
        name = r.name if len(r.name) <= 52 else "…" + r.name[-51:]
        col = COLORS.get(r.diagnosis, "#999")

        def width(v: float | None) -> float:
            if v is None or math.isnan(v):
                return 0.0
            return bar_w * min(max(v, 0.0), vmax) / vmax

        out.append(
            f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end">'
            f"<title>{html.escape(r.name)}</title>{html.escape(name)}</text>"
            f'<rect x="{label_w}" y="{y + 3}" width="{width(r.sqnr_db):.1f}" height="12" fill="{col}">'
            f"<title>{html.escape(r.name)}: {fmt(r.sqnr_db)} dB ({r.diagnosis})</title></rect>"
            f'<rect x="{label_w}" y="{y + 16}" width="{width(r.own_sqnr_db):.1f}" height="4" fill="#555">'
            f"<title>own quantizer: {fmt(r.own_sqnr_db)} dB</title></rect>"
            f'<text x="{label_w + width(r.sqnr_db) + 4:.1f}" y="{y + 14}" fill="#333">'
            f"{fmt(r.sqnr_db)} {html.escape(r.diagnosis)}</text>"
        )
    out.append("</svg>")
    return "".join(out)


CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}
table{border-collapse:collapse;font-size:12px}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:right;white-space:nowrap}
th{background:#f4f4f4;position:sticky;top:0}
td.l{text-align:left}
tr.clipping td.d{background:#fadbd8}tr.rounding td.d{background:#fde5c8}tr.ok td.d{background:#d9f2d9}
.legend span{display:inline-block;margin-right:14px}
.legend i{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:middle}
.wrap{overflow-x:auto}
p.small{font-size:12px;color:#555;max-width:900px}
"""


def to_html(rep: CompareReport, top: int = 20) -> str:
    """A self-contained page: inline CSS, an inline SVG chart of the worst ``top`` rows and a
    table with every row and column. No scripts, nothing fetched."""
    text_cols = {"name", "kind", "node", "dtype", "seen_through", "diagnosis", "suggestion", "note"}
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = []
    for r in rep.rows:
        cells = []
        for c in COLUMNS:
            cls = []
            if c in text_cols:
                cls.append("l")
            if c == "diagnosis":
                cls.append("d")
            attr = f' class="{" ".join(cls)}"' if cls else ""
            cells.append(f"<td{attr}>{html.escape(fmt(getattr(r, c)))}</td>")
        body.append(f'<tr class="{html.escape(r.diagnosis)}">{"".join(cells)}</tr>')
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(rep.counts().items()))
    legend = "".join(
        f'<span><i style="background:{c}"></i>{k}</span>' for k, c in COLORS.items() if k != "n/a"
    )
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in rep.notes)
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>amq compare: {html.escape(rep.quant_source)}</title><style>{CSS}</style></head><body>"
        f"<h1>amq compare</h1><p>float: <code>{html.escape(rep.float_source)}</code><br>"
        f"quantized: <code>{html.escape(rep.quant_source)}</code><br>"
        f"{rep.samples} samples; {len(rep.rows)} tensors ({html.escape(counts)})</p>"
        f"<h2>Worst {min(top, len(rep.rows))} tensors by SQNR (thick: float vs quantized model; "
        f"thin: the tensor's own quantizer)</h2><div class=legend>{legend}</div>"
        f"<div class=wrap>{_svg_chart(rep.rows[:top])}</div>"
        "<p class=small>SQNR: accumulated error of the quantized model's tensor against the float "
        "model's. own SQNR: the tensor's own quantizer applied to the float values. Diagnosis: "
        f"<b>clipping</b> when clipped values (outside the grid) make most of the own error and more "
        f"than {CLIP_FRACTION:g} of the values are clipped; <b>rounding</b> when the range fits but "
        f"the step is too coarse; <b>ok</b> when the own SQNR is at least {OK_SQNR_DB:g} dB. "
        "overshoot: largest distance beyond the grid end in units of scale.</p>"
        f"<h2>All tensors, worst first</h2><div class=wrap><table><thead><tr>{head}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table></div>"
        + (f"<h2>Notes</h2><ul>{notes}</ul>" if notes else "")
        + "</body></html>\n"
    )
