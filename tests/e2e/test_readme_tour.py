"""The README's tour works verbatim: every `amq ...` command line of its bash blocks that runs on
the bundled example is run as written (as a new user would, in a copy of the repository's example
folders) and must succeed; the others (placeholders such as model.onnx) must at least be valid
command lines (every option exists)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
EXAMPLE_FILES = ("examples", "calib_data", "eval_data", "configs")


def readme_commands() -> list[str]:
    """The `amq ...` commands of README.md's bash blocks, in order (one per `&&` segment, without
    trailing comments)."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    out = []
    for line in "\n".join(blocks).splitlines():
        for seg in line.split("&&"):
            seg = seg.split(" # ")[0].strip()
            if seg.startswith("amq "):
                out.append(seg)
    return out


def on_the_example(cmd: str) -> bool:
    """A tour command: the model it names is the bundled example."""
    return shlex.split(cmd)[2].startswith("examples/")


COMMANDS = readme_commands()
TOUR = [c for c in COMMANDS if on_the_example(c)]


def test_the_tour_is_found():
    """The extraction can fail: the README's first command and its QAT handoff are in the tour."""
    assert any(
        c.startswith("amq quantize examples/digits_cnn.onnx --calib calib_data/") for c in TOUR
    )
    assert any(c.startswith("amq qat examples/digits_cnn.onnx") for c in TOUR)
    assert len(COMMANDS) > len(TOUR)  # placeholders exist and are checked below


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tour")
    for name in EXAMPLE_FILES:
        shutil.copytree(ROOT / name, d / name)
    return d


def _amq() -> list[str]:
    script = Path(sys.executable).with_name("amq")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "amq"]


@pytest.mark.parametrize("cmd", TOUR)
def test_tour_command_runs_verbatim(workdir, tmp_path, cmd):
    if shlex.split(cmd)[1] == "qat":
        pytest.importorskip("torch")
    env = {**os.environ, "AMQ_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        _amq() + shlex.split(cmd)[1:],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, f"{cmd}\n{res.stdout}\n{res.stderr}"
    assert "Traceback" not in res.stderr
    if cmd.startswith("amq quantize"):  # what the README says it writes and prints
        for f in ("digits.q.onnx", "digits.q.amq.yaml", "digits.q.qparams.json"):
            assert (workdir / "out" / f).is_file(), f
        assert "layers quantized: 7, float: 0;" in res.stdout
    if cmd.startswith("amq qat"):
        assert (workdir / "out" / "qat" / "qat_model.pt").is_file()
        assert "parity (torch vs" in res.stdout


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if c not in TOUR])
def test_other_readme_commands_are_valid_command_lines(cmd):
    """Placeholders (model.onnx, c/, e/) cannot run, but every option they show must exist."""
    from amq.cli import cli

    args = shlex.split(cmd)[1:]
    command = cli.commands[args[0]]
    ctx = command.make_context(args[0], args[1:], resilient_parsing=False)
    assert ctx.params, cmd
