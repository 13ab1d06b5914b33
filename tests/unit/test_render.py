"""Terminal output fits 80 columns: names shortened from the left to a unique tail, text wrapped
between words only, optional columns left out last (DESIGN.md §2, §6)."""

from __future__ import annotations

import re

import onnx
import pytest

from amq import render
from tests.cli_helpers import run_cli
from tests.conftest import CALIB, EVAL, EXAMPLE

NAMES = [
    "/backbone/stage1/block0/conv1/Conv",
    "/backbone/stage1/block1/conv1/Conv",
    "/backbone/stage2/block0/conv1/Conv",
    "/backbone/stage2/block0/conv2/Conv",
    "/head/cls/Conv",
    "/head/cls/Conv_1",
    "encoder.layers.11.attention.self.query.weight",
    "encoder.layers.1.attention.self.query.weight",
]


def _tail_of(short: str, full: str) -> bool:
    return short == full or (short.startswith(render.ELLIPSIS) and full.endswith(short[1:]))


@pytest.mark.parametrize("w", [8, 16, 24, 30, 60])
def test_shorten_keeps_a_unique_tail(w):
    short = render.shorten(NAMES, w)
    assert set(short) == set(NAMES)
    for full, s in short.items():
        assert _tail_of(s, full), (s, full)
        # no other name ends with the kept tail: the reader can tell the rows apart
        others = [n for n in NAMES if n != full and n.endswith(s.lstrip(render.ELLIPSIS))]
        assert not others, (s, others)
    assert len(set(short.values())) == len(NAMES)


def test_shorten_prefers_a_whole_path_segment():
    short = render.shorten(NAMES, 24)
    assert short["/backbone/stage2/block0/conv2/Conv"] == "…/block0/conv2/Conv"
    assert short["/head/cls/Conv"] == "/head/cls/Conv"  # fits: untouched
    assert short["encoder.layers.1.attention.self.query.weight"].endswith(".query.weight")


def test_wrap_breaks_between_clauses_then_words():
    text = "layers quantized: 7, float: 0; size 38.2 KB -> 11.0 KB (28.8%); opset 13; " * 3
    lines = render.wrap(text.strip(), 40)
    assert all(len(ln) <= 40 for ln in lines)
    assert " ".join(ln.strip() for ln in lines).split() == text.split()
    assert "opset 13;" in "\n".join(lines)  # a clause that fits stays on one line
    long_word = "x" * 50
    assert render.wrap(f"a {long_word} b", 20) == ["a", f"  {long_word}", "  b"]


def _lines(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln.strip()]


def test_table_fits_without_breaking_words(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    prose = "the activation range is too wide for the grid; raise the bits or clip it"
    rows = [(n, "Conv", 0.12345, 35.5, "[0.1, 0.2]", prose) for n in NAMES]
    cols = ["layer", "op", "value", "SQNR dB", "95% CI", "note"]
    render.table("A title " * 12, cols, rows)
    out = capsys.readouterr().out
    assert all(len(ln) <= 80 for ln in out.splitlines()), out
    shown = [ln.split()[0] for ln in _lines(out) if ln.split()[0].startswith(("/", "…", "enc"))]
    assert len(shown) == len(NAMES) == len(set(shown))
    for s, full in zip(shown, NAMES, strict=True):
        assert _tail_of(s, full), (s, full)
    words = set(out.split())
    for w in ["activation", "0.1235", "[0.1,", "0.2]", "35.5"]:
        assert w in words, w  # whole, never folded mid-word


def test_optional_columns_go_last_and_are_named(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")
    cols = ["layer", *[f"metric{i}" for i in range(6)]]
    rows = [(n, *[0.5] * 6) for n in NAMES[:6]]
    render.table("t", cols, rows, optional=("metric5", "metric4", "metric3", "metric2"))
    out = capsys.readouterr().out
    assert all(len(ln) <= 60 for ln in out.splitlines()), out
    header = out.splitlines()[1].split()
    assert header == ["layer", "metric0", "metric1", "metric2", "metric3"], out
    assert "(left out to fit 60 columns: metric5, metric4;" in out  # only as many as needed
    monkeypatch.setenv("COLUMNS", "300")
    render.table("t", cols, rows, optional=("metric5",))
    out = capsys.readouterr().out
    assert "metric5" in out and "left out" not in out and NAMES[0] in out  # room: all whole


def _model_names(*paths) -> set[str]:
    names: set[str] = set()
    for p in paths:
        g = onnx.load(p).graph
        names |= {n.name for n in g.node} | {i.name for i in g.initializer}
        names |= {t for n in g.node for t in (*n.input, *n.output)}
    return names


SHORT = re.compile(r"…[^\s,]+")


@pytest.mark.parametrize("columns", [80, 64])
def test_every_command_fits_the_terminal(capsys, monkeypatch, tmp_path, columns):
    """The example's commands at 80 (and 64) columns: no line is wider; every shortened name is
    the tail of a real layer or tensor name."""
    monkeypatch.setenv("COLUMNS", str(columns))
    monkeypatch.chdir(tmp_path)
    m, c, e = str(EXAMPLE), str(CALIB), str(EVAL)
    runs = [
        ["quantize", m, "--calib", c, "-o", "q.onnx", "--weight-bits", "4"],
        ["eval", "q.onnx", "--data", e, "--reference", m, "--samples", "64"],
        ["bitops", m],
        ["check", "q.onnx"],
        ["compare", m, "q.onnx", "--data", e, "--samples", "32"],
        ["sensitivity", m, "--calib", c, "--eval", e, "--bits", "8", "--samples", "32"],
        ["search", m, "--calib", c, "--eval", e, "--budget", "5%", "--trials", "2"]
        + ["--samples", "32", "-o", "s"],
    ]
    shortened = 0
    for args in runs:
        code, out, err = run_cli(capsys, *args)
        assert code == 0, (args, err)
        assert out.strip(), args
        wide = [ln for ln in out.splitlines() if len(ln) > columns]
        assert not wide, (args, wide)
        real = _model_names(EXAMPLE, tmp_path / "q.onnx")
        for s in SHORT.findall(out):
            # compare names a stored weight without its '_quantized' suffix
            assert any(n.endswith(s[1:]) or f"{s[1:]}_quantized" in n for n in real), (args, s)
            shortened += 1
    assert shortened  # the example's long tensor names are shortened at these widths
