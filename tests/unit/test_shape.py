"""Size limits of DESIGN.md §2: no module over 600 lines, no function over 80 lines or with more
than 8 parameters (self and cls not counted; a frozen dataclass carries settings instead)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "amq"
FILES = sorted(PKG.rglob("*.py"))
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
MAX_PARAMETERS = 8


def functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


def parameters(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Named parameters (positional and keyword-only); *args and **kwargs are not counted."""
    a = fn.args
    names = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
    return len(names) - (1 if names and names[0] in ("self", "cls") else 0)


def offenders(source: str) -> list[str]:
    tree = ast.parse(source)
    out = []
    for fn in functions(tree):
        length = fn.end_lineno - fn.lineno + 1
        if length > MAX_FUNCTION_LINES:
            out.append(f"{fn.name} (line {fn.lineno}) is {length} lines")
        if parameters(fn) > MAX_PARAMETERS:
            out.append(f"{fn.name} (line {fn.lineno}) takes {parameters(fn)} parameters")
    return out


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PKG)))
def test_module_and_function_sizes(path: Path) -> None:
    source = path.read_text()
    lines = source.count("\n")
    assert lines <= MAX_MODULE_LINES, f"{path.name}: {lines} lines; split it by job"
    assert not offenders(source), f"{path.name}: " + "; ".join(offenders(source))


def test_the_size_check_can_fail() -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    long_fn = f"def f():\n{body}\n"
    many = "def g(self, " + ", ".join(f"a{i}" for i in range(MAX_PARAMETERS + 1)) + "): pass\n"
    ok = "def h(self, " + ", ".join(f"a{i}" for i in range(MAX_PARAMETERS)) + ", **kw): pass\n"
    assert offenders(long_fn) == [f"f (line 1) is {MAX_FUNCTION_LINES + 1} lines"]
    assert offenders(many) == [f"g (line 1) takes {MAX_PARAMETERS + 1} parameters"]
    assert offenders(ok) == []
