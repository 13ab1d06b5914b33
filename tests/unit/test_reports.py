"""The HTML reports (sensitivity, compare, search) share one template: parsed structurally, each
page has the one style, opens with a verdict, labels every chart axis with a unit, draws one CI
whisker per point that has a CI, and shows no raw CSV column names. Built from small real runs
(compare, sensitivity) and from hand-made search records (a search run is slow). A test marked
slow renders every page in headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto

from amq import api, report
from amq.analysis import compare as C
from amq.analysis.compare.page import verdict as compare_verdict
from amq.analysis.sensitivity import LayerSensitivity, SensitivityReport, html_report
from amq.search import space as S
from amq.search.report import write_search_report
from amq.search.study import TrialRecord
from tests.e2e.test_sensitivity import cnn, feeds
from tests.unit.test_compare import clipping_data, pair, samples

CHROMIUM = Path("/usr/bin/chromium")


# ---------------------------------------------------------------------------------------------
# a small DOM from html.parser


@dataclass
class El:
    tag: str
    attrs: dict[str, str]
    children: list[El] = field(default_factory=list)
    text: list[str] = field(default_factory=list)  # own text pieces, in order

    def all(self, tag: str | None = None, cls: str | None = None) -> list[El]:
        out = []
        for c in self.children:
            if (tag is None or c.tag == tag) and (cls is None or cls in c.classes):
                out.append(c)
            out += c.all(tag, cls)
        return out

    @property
    def classes(self) -> list[str]:
        return self.attrs.get("class", "").split()

    def content(self) -> str:
        """Every text inside, as a browser would join it (tooltips included)."""
        parts = list(self.text)
        parts += [c.content() for c in self.children]
        return "".join(parts)


VOID = {"meta", "br", "wbr", "img", "hr", "input", "link"}
SVG_LEAVES = {"rect", "line", "circle", "path", "polyline"}  # written with "/>" or empty


class _Builder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = El("#document", {})
        self.stack = [self.root]
        self.doctype = ""

    def handle_decl(self, decl: str) -> None:
        self.doctype = decl

    def handle_starttag(self, tag, attrs) -> None:
        el = El(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(el)
        if tag not in VOID:
            self.stack.append(el)

    def handle_startendtag(self, tag, attrs) -> None:
        self.stack[-1].children.append(El(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag) -> None:
        if tag in VOID:
            return
        assert self.stack[-1].tag == tag, f"</{tag}> closes <{self.stack[-1].tag}>"
        self.stack.pop()

    def handle_data(self, data) -> None:
        self.stack[-1].text.append(data)


def parse(page: str) -> tuple[El, str]:
    b = _Builder()
    b.feed(page)
    b.close()
    assert b.stack == [b.root], [e.tag for e in b.stack]  # every element closed
    return b.root, b.doctype


def check_page(page: str) -> El:
    """The template's promises, for any report; returns the body."""
    root, doctype = parse(page)
    assert doctype.lower() == "doctype html"
    assert len(root.all("html")) == 1 and len(root.all("body")) == 1
    styles = root.all("style")
    assert len(styles) == 1 and styles[0].content() == report.CSS  # the one style, unchanged
    assert not root.all("script") and not root.all("link")
    assert "http" not in page.replace("http://www.w3.org/2000/svg", "")  # nothing fetched
    body = root.all("body")[0]
    first, second = body.children[0], body.children[1]
    assert first.tag == "h1" and first.content().strip()
    assert second.tag == "p" and second.classes == ["verdict"]  # the verdict comes first
    assert len(second.content().split()) >= 12, second.content()
    assert len(body.all(cls="verdict")) == 1
    for svg in body.all("svg"):
        labels = [t.content().strip() for t in svg.all("text", "axis-label")]
        assert len(labels) >= 2 and all(labels), labels
        assert any(re.search(r"\(.+\)", lab) for lab in labels), labels  # a unit
    return body


def whiskers(svg: El) -> int:
    return len(svg.all(cls="ci"))


def headers(body: El) -> list[str]:
    return [th.content().strip() for th in body.all("th")]


# ---------------------------------------------------------------------------------------------
# compare


@pytest.fixture(scope="module")
def compare_report():
    x, _ = clipping_data(n=64)
    fm, qm = pair(1.0 / 127, 0, TensorProto.INT8)
    return api.compare(fm, qm, samples(x), batch_size=16)


def test_compare_page(compare_report):
    rep = compare_report
    page = C.to_html(rep, top=20)
    body = check_page(page)
    heads = headers(body)
    raw = {c for c in C.COLUMNS if "_" in c}
    assert not raw & set(heads), raw & set(heads)
    assert not [h for h in heads if re.fullmatch(r"[a-z0-9]+(_[a-z0-9]+)+", h)], heads
    assert "SQNR (dB)" in heads and "suggested fix or note" in heads
    verdict = body.all(cls="verdict")[0].content()
    assert "clipping" in verdict and "starts at t" in verdict, verdict
    (svg,) = body.all("svg")
    assert any("SQNR (dB)" in t.content() for t in svg.all("text", "axis-label"))
    assert whiskers(svg) == 0  # no CI in compare's data: no whisker


def test_compare_verdict_names_rounding_and_all_ok():
    rng = np.random.default_rng(1)
    x = np.clip(rng.standard_normal((64, 256)) * 0.3, -0.9, 0.9).astype(np.float32)
    fm, qm = pair(2.0 / 15, 8, TensorProto.UINT4)  # uint4 over about [-1, 1]: coarse, no clipping
    rep = api.compare(fm, qm, samples(x))
    assert rep.row("t").diagnosis == "rounding"
    assert "the loss is rounding" in compare_verdict(rep)
    fm, qm = pair(1.0 / 32767, 0, TensorProto.INT16)
    rep = api.compare(fm, qm, samples(x))
    assert rep.row("t").diagnosis == "ok"
    assert compare_verdict(rep).startswith("All 1 compared tensors are quantized well")


# ---------------------------------------------------------------------------------------------
# sensitivity


@pytest.fixture(scope="module")
def sensitivity_report():
    m = cnn("act")
    cal, ev = feeds(m)
    return api.sensitivity(m, cal, ev, bits=(4, 8), cache_dir=None)


def _check_sensitivity(rep: SensitivityReport, top: int) -> El:
    body = check_page(html_report(rep, top))
    charts = body.all("svg")
    assert len(charts) == len([b for b in rep.bits if rep.ranked(b)])
    for b, svg in zip([b for b in rep.bits if rep.ranked(b)], charts, strict=True):
        shown = rep.ranked(b)[:top]
        assert whiskers(svg) == sum(r.drop_ci is not None for r in shown)
        labels = " ".join(t.content() for t in svg.all("text", "axis-label"))
        assert "drop" in labels or rep.metric in labels
    return body


def test_sensitivity_page_from_a_run(sensitivity_report):
    rep = sensitivity_report
    body = _check_sensitivity(rep, top=4)
    verdict = body.all(cls="verdict")[0].content()
    top = rep.ranked(8)[0]
    assert verdict.startswith("At W8A8,") and top.layer in verdict, verdict
    assert any("top1 drop (points)" in t.content() for t in body.all("text", "axis-label"))
    assert len(body.all("tbody")[0].children) == len(rep.rows)


def _row(layer: str, drop: float | None, ci, bits: int = 8, mode: str = "single"):
    return LayerSensitivity(layer, "Conv", bits, max(bits, 8), mode, bits, 90.0, drop, ci)


def test_sensitivity_page_without_ci_and_leave_one_out():
    rows = [
        _row("/a/Conv", 3.0, (1.0, 5.0)),
        _row("/b/Conv", 0.5, None),  # no CI: no whisker
        _row("/c/Conv", 0.2, (-0.5, 0.9)),
    ]
    rep = SensitivityReport("top1", "logits", 99.0, 64, [8], "single", rows)
    body = _check_sensitivity(rep, top=20)
    verdict = body.all(cls="verdict")[0].content()
    assert "1 of 3 layers" in verdict and "/a/Conv" in verdict, verdict

    loo = [_row(r.layer, r.drop, r.drop_ci, mode="leave_one_out") for r in rows]
    rep = SensitivityReport("top1", "logits", 99.0, 64, [8], "leave_one_out", loo)
    rep.baselines[8] = {"value": 90.0, "drop": 9.0}
    body = _check_sensitivity(rep, top=2)
    verdict = body.all(cls="verdict")[0].content()
    assert "drops 9 points" in verdict and "keeping /c/Conv (Conv) float" in verdict, verdict

    # a metric without a drop (sqnr): the value per layer, no whisker
    rows = [_row("/a/Conv", None, None), _row("/b/Conv", None, None)]
    rows[0].value, rows[1].value = 12.0, 30.0
    rep = SensitivityReport("sqnr", "logits", None, 64, [8], "single", rows)
    body = _check_sensitivity(rep, top=20)
    assert any(t.content() == "sqnr (dB)" for t in body.all("text", "axis-label"))
    assert "lowers sqnr the most is /a/Conv" in body.all(cls="verdict")[0].content()


# ---------------------------------------------------------------------------------------------
# search (hand-made records: a search run takes a minute)

LAYERS = ["/conv/Conv", "/add/Add", "/gap/GlobalAveragePool", "/fc/Gemm"]


def _space() -> S.Space:
    has_w = {
        "/conv/Conv": True,
        "/add/Add": False,
        "/gap/GlobalAveragePool": False,
        "/fc/Gemm": True,
    }
    return S.Space(LAYERS, has_w, LAYERS, LAYERS[::-1], kind="per_layer")


PARAMS = {
    "w:/conv/Conv": 4,
    "a:/conv/Conv": 8,
    "f:/add/Add": False,
    "a:/add/Add": 16,
    "f:/gap/GlobalAveragePool": True,
    "w:/fc/Gemm": 16,
    "a:/fc/Gemm": 16,
}


def _trial(n, state, cost, drop=None, ci=None, feasible=False, reason=""):
    return TrialRecord(n, state, cost, drop, ci, None, feasible, {}, PARAMS, reason)


def _records(met: bool) -> list[TrialRecord]:
    return [
        _trial(0, "COMPLETE", 1.2, 0.2, (0.0, 0.5), feasible=met),
        _trial(1, "COMPLETE", 0.7, 0.6, (0.2, 1.1), feasible=met),
        _trial(2, "COMPLETE", 0.9, 3.0, (2.0, 4.0)),
        _trial(3, "PRUNED", 0.5, 40.0, reason="running drop 40 over budget after 20 samples"),
        _trial(4, "COMPLETE", 1.5, reason="not evaluated: cannot beat the best feasible cost"),
        _trial(5, "FAIL", 0.8),
    ]


@pytest.mark.parametrize("met", [True, False])
def test_search_page(tmp_path, met):
    records = _records(met)
    write_search_report(tmp_path, records, 1.0, "top1", 99.0, "bitops", _space())
    page = (tmp_path / "search.html").read_text(encoding="utf-8")
    body = check_page(page)
    front, bits = body.all("svg")
    evaluated = [r for r in records if r.state == "COMPLETE" and r.drop is not None]
    assert whiskers(front) == sum(r.drop_ci is not None for r in evaluated)
    assert len(front.all("circle")) == len(evaluated)  # pruned / not evaluated are not drawn
    axis = [t.content() for t in front.all("text", "axis-label")]
    assert axis == ["bitops (x all-INT8)", "top1 drop (points)"]
    # bits per layer: what is plotted is said per layer kind
    texts = [t.content() for t in bits.all("text")]
    assert "W4A8" in texts and "A16" in texts and "float" in texts and "W16A16" in texts
    assert any("else activations" in t.content() for t in bits.all("text", "axis-label"))
    # trials: never "COMPLETE, feasible: no" for a trial that was not evaluated
    assert "COMPLETE" not in page and "PRUNED" not in page
    rows = {
        int(tr.children[0].content()): [td.content() for td in tr.children]
        for tr in body.all("tbody")[-1].children
    }
    col = headers(body).index("within budget")
    status = headers(body).index("status")
    assert rows[4][status] == "not evaluated" and rows[4][col] == "-"
    assert rows[3][status] == "pruned" and rows[3][col] == "-"
    assert rows[5][status] == "failed"
    assert rows[2][col] == "no" and rows[0][col] == ("yes" if met else "no")
    verdict = body.all(cls="verdict")[0].content()
    if met:
        assert verdict.startswith("Trial 1 is the cheapest within the budget"), verdict
    else:
        assert verdict.startswith("No trial met the budget") and "trial 0" in verdict, verdict
    assert "3 were evaluated, 1 pruned early" in verdict and "1 not evaluated" in verdict
    csv_rows = (tmp_path / "trials.csv").read_text().splitlines()
    assert csv_rows[5].split(",")[:2] == ["4", "COMPLETE"] and csv_rows[5].split(",")[7] == ""


# ---------------------------------------------------------------------------------------------
# headless Chromium: every page renders with visible text


# a probe appended to a copy of a page (the reports themselves have no scripts): how far the page
# is wider than the window
PROBE = (
    "<script>document.body.setAttribute('data-overflow', "
    "String(document.documentElement.scrollWidth - window.innerWidth))</script></body>"
)


def _dump_dom(path: Path, width: int) -> El:
    """The page as headless Chromium built it (after layout), in a window ``width`` wide."""
    profile = path.with_name(f"profile-{path.stem}")
    r = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            f"--window-size={width},900",
            "--dump-dom",
            path.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    shutil.rmtree(profile, ignore_errors=True)
    assert r.returncode == 0, r.stderr[-2000:]
    root, _ = parse(r.stdout.replace("<html", "<!DOCTYPE html><html", 1))
    return root.all("body")[0]


@pytest.mark.slow
def test_every_report_renders_in_headless_chromium(tmp_path, compare_report, sensitivity_report):
    """Each page shows its verdict and charts as visible text, and fits an 800-pixel window
    without scrolling sideways."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed")
    write_search_report(tmp_path, _records(True), 1.0, "top1", 99.0, "bitops", _space())
    pages = {
        "compare": C.to_html(compare_report),
        "sensitivity": html_report(sensitivity_report),
        "search": (tmp_path / "search.html").read_text(encoding="utf-8"),
    }
    for name, page in pages.items():
        path = tmp_path / f"{name}.html"
        path.write_text(page, encoding="utf-8")
        body = _dump_dom(path, 1200)
        for hidden in body.all("style") + body.all("title"):
            hidden.text.clear()
            hidden.children.clear()
        visible = " ".join(body.content().split())
        verdict = " ".join(body.all(cls="verdict")[0].content().split())
        assert len(visible) > 200 and verdict and verdict in visible, name
        assert body.all("svg"), name
        probe = tmp_path / f"{name}-probe.html"
        probe.write_text(page.replace("</body>", PROBE), encoding="utf-8")
        overflow = int(_dump_dom(probe, 800).attrs["data-overflow"])
        assert overflow <= 0, f"{name}: {overflow} pixels wider than an 800-pixel window"
