"""Architecture rules of DESIGN.md: imports flow one way, heavy dependencies stay at the edges,
every command's help has an example."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "amq"
# lower number = lower layer; a module may import its own layer or lower ones
LAYERS = {
    "cli": 7,
    "render": 7,
    "__main__": 8,
    "__init__": 8,
    "api": 6,
    "search": 5,
    "analysis": 4,
    "qat": 4,
    "calib": 3,
    "quant": 2,
    "graph": 1,
}
ANYWHERE = {"config", "config_dump", "errors", "plan", "report", "runtime", "artifacts"}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "amq" or len(parts) < 2:
        return None
    top = parts[1]
    return None if top in ANYWHERE else LAYERS.get(top)


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append(node.module)
            out += [f"{node.module}.{a.name}" for a in node.names if node.module == "amq"]
    return out


FILES = sorted(PKG.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_flow_one_way(path):
    rel = path.relative_to(PKG.parent).with_suffix("")
    me = ".".join(rel.parts)
    mine = _layer(me)
    if me.split(".")[1] in ANYWHERE:
        mine = 0  # config/errors/plan/report: may import only other anywhere-modules
    assert mine is not None, me
    for imp in _imports(path):
        other = _layer(imp)
        if other is None:
            continue
        assert other <= mine, f"{me} imports {imp}: a wrong-way arrow"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PKG)))
def test_heavy_dependencies_at_the_edges(path):
    rel = path.relative_to(PKG)
    for imp in _imports(path):
        root = imp.split(".")[0]
        if root == "torch":
            assert rel.parts[0] == "qat", f"{rel} imports torch"
        if root == "optuna":
            assert rel.parts[0] == "search", f"{rel} imports optuna"
        assert not (
            root == "onnx" and rel.parts[0] == "quant" and rel.name in ("qmath.py", "observers.py")
        )


def test_core_imports_without_torch_or_optuna():
    code = "import sys, amq, amq.cli, amq.api; bad = [m for m in ('torch', 'optuna') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_command_help_has_an_example():
    from click.testing import CliRunner

    from amq.cli import cli

    assert cli.commands, "no commands"
    for name in cli.commands:
        res = CliRunner().invoke(cli, [name, "--help"])
        assert res.exit_code == 0, name
        assert "Example" in res.output and f"amq {name}" in res.output, name
