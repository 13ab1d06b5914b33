"""Every command means the same by its options (DESIGN.md §6): an invalid value is one line on
stderr with exit code 2 and no traceback, -q prints nothing on stdout, and the commands follow
one pattern (options gathered into one Opts, rules owned by config.py)."""

from __future__ import annotations

import inspect
import shutil

import pytest
import yaml

from amq.config import Config, Target, config_from_dict, with_overrides
from tests.cli_helpers import assert_one_line_error, run_cli
from tests.conftest import CALIB, EVAL, EXAMPLE


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A folder with the example (m.onnx), its INT8 model (q.onnx), the data (c/, e/) and a
    plain file (afile) where a folder or a config is expected."""
    d = tmp_path_factory.mktemp("cli")
    shutil.copy(EXAMPLE, d / "m.onnx")
    (d / "c").symlink_to(CALIB)
    (d / "e").symlink_to(EVAL)
    (d / "afile").write_text("x\n")
    return d


@pytest.fixture(scope="module")
def qmodel(folder):
    import amq

    amq.quantize(folder / "m.onnx", CALIB, output=folder / "q.onnx", cache_dir=False)
    return folder / "q.onnx"


Q = "m.onnx --calib c"
S = "m.onnx --calib c --eval e"
BAD = [
    # quantize
    (f"quantize {Q} --input-shape input=1,2", "--input-shape"),
    (f"quantize {Q} --input-shape input:1,0", "--input-shape"),
    (f"quantize {Q} --data-types float", "--data-types"),
    (f"quantize {Q} --int16-top 10", "--int16-top"),
    (f"quantize {Q} --int16-top 150%", "--int16-top"),
    (f"quantize {Q} --int16-top abc%", "--int16-top"),
    (f"quantize {Q} --weight-bits 3", "--weight-bits"),
    (f"quantize {Q} --samples 0", "--samples"),
    (f"quantize {Q} --percentile 20", "percentile"),
    (f"quantize {Q} --target tensorrt", "--target"),
    (f"quantize {Q} --method foo", "--method"),
    (f"quantize {Q} --overflow foo", "--overflow"),
    (f"quantize {Q} -c nope.yaml", "nope.yaml"),
    (f"quantize {Q} -c afile", "afile"),
    ("quantize nope.onnx --calib c", "nope.onnx"),
    ("quantize m.onnx --calib nope", "nope"),
    (f"quantize {Q} -o afile/x.onnx", "afile"),
    (f"quantize {Q} -o c", "c"),
    (f"quantize {Q} --int16-top 10% --sensitivity nope.json", "nope.json"),
    (f"quantize {Q} --int16-top 10% --sensitivity afile", "afile"),
    (f"quantize {Q} --cache-dir afile", "--cache-dir"),
    (f"quantize {Q} --bogus", "--bogus"),
    # eval
    ("eval q.onnx --data e --metric foo", "--metric"),
    ("eval q.onnx --data e --metric nomodule:fn", "nomodule"),
    ("eval q.onnx --data e --reference nope.onnx", "nope.onnx"),
    ("eval q.onnx --data nope", "nope"),
    ("eval q.onnx --data e --samples 0", "--samples"),
    ("eval q.onnx --data e --batch-size 0", "--batch-size"),
    ("eval q.onnx --data e --output-name nope", "nope"),
    # bitops
    ("bitops m.onnx --input-shape foo:1,2", "no input 'foo'"),
    ("bitops m.onnx --input-shape bad", "--input-shape"),
    ("bitops m.onnx --weight-bits 5", "--weight-bits"),
    ("bitops m.onnx --csv afile/x.csv", "afile"),
    ("bitops m.onnx --data nope", "nope"),
    ("bitops afile", "afile"),
    # check
    ("check nope.onnx", "nope.onnx"),
    ("check q.onnx --samples 0", "--samples"),
    ("check q.onnx --data nope", "nope"),
    # sensitivity
    (f"sensitivity {S} --bits 3", "--bits"),
    (f"sensitivity {S} --bits ''", "--bits"),
    (f"sensitivity {S} --bits 8,x", "--bits"),
    (f"sensitivity {S} --metric foo", "--metric"),
    (f"sensitivity {S} --mode foo", "--mode"),
    (f"sensitivity {S} -o afile/sens", "afile"),
    (f"sensitivity {S} --top 0", "--top"),
    (f"sensitivity {S} --layers nomatch --bits 8 --samples 16", "nomatch"),
    # compare
    ("compare m.onnx q.onnx --data e --csv afile/x.csv", "afile"),
    ("compare m.onnx q.onnx --data e --html afile/x.html", "afile"),
    ("compare m.onnx q.onnx --data e --top 0", "--top"),
    ("compare m.onnx q.onnx --data e -o afile/cmp", "afile/cmp: cannot be made: afile is a file"),
    (f"sensitivity {S} -o afile", "afile"),
    ("compare m.onnx nope.onnx --data e", "nope.onnx"),
    ("compare m.onnx m.onnx --data e", "not a QDQ model"),
    # search
    (f"search {S} --budget abc --samples 16", "--budget"),
    (f"search {S} --budget -1 --samples 16", "--budget"),
    (f"search {S} --budget 1% --weight-bits 3", "--weight-bits"),
    (f"search {S} --budget 1% --weight-bits float", "--weight-bits"),
    (f"search {S} --budget 1% --act-bits 4,x", "--act-bits"),
    (f"search {S} --budget 1% --metric foo", "--metric"),
    (f"search {S} --budget 1% --objective foo", "--objective"),
    (f"search {S} --budget 1% -o afile", "afile"),
    (f"search {S} --budget 1% --trials 0", "--trials"),
    # qat
    (f"qat {Q} --weight-bits 3", "--weight-bits"),
    (f"qat {Q} -o afile", "afile"),
    (f"qat {Q} --parity-samples 0", "--parity-samples"),
]


@pytest.mark.parametrize(("line", "needle"), BAD, ids=[b[0] for b in BAD])
def test_invalid_option_value_is_one_line(capsys, monkeypatch, folder, qmodel, line, needle):
    import shlex

    monkeypatch.chdir(folder)
    code, out, err = run_cli(capsys, *shlex.split(line))
    assert_one_line_error(code, err, needle)
    assert out == ""


QUIET = {
    "quantize": f"quantize {Q} -o q2.onnx",
    "eval": "eval q.onnx --data e --reference m.onnx --samples 64",
    "bitops": "bitops m.onnx --csv b.csv",
    "check": "check q.onnx",
    "sensitivity": f"sensitivity {S} --bits 8 --samples 32 -o sens",
    "compare": "compare m.onnx q.onnx --data e --samples 32 -o cmp",
    "search": f"search {S} --budget 5% --trials 2 --samples 32 -o s",
    "qat": f"qat {Q} -o qat --parity-samples 8",
}


@pytest.mark.parametrize("command", sorted(QUIET))
def test_quiet_prints_nothing(capsys, monkeypatch, folder, qmodel, command):
    """-q: no table, no summary, no progress bar; the work is done and the files written."""
    import shlex

    if command == "qat":
        pytest.importorskip("torch")
    monkeypatch.chdir(folder)
    args = shlex.split(QUIET[command])
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    assert out.strip(), "without -q the command prints its result"
    code, out, err = run_cli(capsys, *args, "-q")
    assert code == 0, err
    assert out == ""
    assert "Traceback" not in err
    written = {"quantize": "q2.onnx", "bitops": "b.csv", "sensitivity": "sens/sensitivity.json"}
    written |= {"compare": "cmp/compare.html", "search": "s/best.amq.yaml"}
    written |= {"qat": "qat/qparams.json"}
    if command in written:
        assert (folder / written[command]).is_file()
    if command == "compare":  # -o DIR: a folder, as in every command that writes several files
        assert {p.name for p in (folder / "cmp").iterdir()} == {
            "compare.csv",
            "compare.json",
            "compare.html",
        }


def test_target_trt_means_symmetric_activations_unless_given(capsys, tmp_path):
    """config.py owns the rule (a YAML target: trt, --target trt and with_overrides agree)."""
    assert with_overrides(Config(), target="trt").activations.symmetric is True
    assert config_from_dict({"target": "trt"}).activations.symmetric is True
    c = with_overrides(Config(), target=Target.TRT, activations={"symmetric": False})
    assert c.activations.symmetric is False
    c = with_overrides(Config(), target="trt", activations={"bits": 16})
    assert c.activations.symmetric is True and c.activations.bits == 16
    kept = config_from_dict({"target": "trt", "activations": {"symmetric": False}})
    assert with_overrides(kept, target="trt").activations.symmetric is False
    for extra, symmetric in (([], True), (["--act-bits", "16"], True)):
        out = tmp_path / "t.onnx"
        code, _, err = run_cli(
            capsys, "quantize", str(EXAMPLE), "--calib", str(CALIB), "--samples", "16",
            "--target", "trt", *extra, "-o", str(out), "-q", "--no-cache",
        )  # fmt: skip
        assert code == 0, err
        resolved = yaml.safe_load((tmp_path / "t.amq.yaml").read_text())
        assert resolved["target"] == "trt"
        assert resolved["activations"]["symmetric"] is symmetric


def test_every_command_takes_one_opts():
    """One pattern: click's keywords gathered into one frozen Opts; the help keeps examples."""
    from amq.cli import cli
    from amq.cli.app import Opts

    for name, cmd in cli.commands.items():
        fn = inspect.unwrap(cmd.callback)
        params = list(inspect.signature(fn).parameters)
        assert params == ["o"], (name, params)
        assert "Examples:" in (cmd.help or ""), name
        assert any(p.name == "quiet" for p in cmd.params), f"{name} has no -q"
    o = Opts({"quiet": True, "no_cache": False})
    assert o.quiet is True and not o.show_progress and o.cache is True
    with pytest.raises(AttributeError):
        o.quiet = False  # type: ignore[misc]
