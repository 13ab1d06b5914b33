"""Running the command line in-process and checking its one-line errors (shared by the tests)."""

from __future__ import annotations

import pytest

from amq.cli import main


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``amq ARGS`` in-process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        main([*args])
        raise SystemExit(0)
    out = capsys.readouterr()
    return int(e.value.code or 0), out.out, out.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """Exit code 2, exactly one non-blank line 'amq: error: ...' holding every needle, no traceback."""
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("amq: error: ") and "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])
