"""The `amq` group, its one-line errors, the options every command spells the same way
(DESIGN.md §6), and the one pattern every command follows: click passes the options as keywords,
``@takes_opts`` gathers them into a frozen ``Opts``, the command builds the config, makes one API
call and hands the result to ``show`` (warnings, --json, or render.py's drawing unless -q)."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from amq import __version__, report
from amq.config import (
    ALLOWED_BITS,
    Config,
    Granularity,
    Overflow,
    RangeMethod,
    load_config,
    with_overrides,
)
from amq.errors import EXIT_USER_ERROR, AmqError


def fail(msg: str, code: int = EXIT_USER_ERROR) -> None:
    click.echo(f"amq: error: {msg}", err=True)
    sys.exit(code)


def warn(msg: str) -> None:
    click.echo(f"amq: warning: {msg}", err=True)


# old spellings, kept one release: the same meaning in every command (DESIGN.md §6)
DEPRECATED: dict[str, dict[str, str]] = {
    "quantize": {"--output": "--out", "--num-samples": "--samples"},
    "eval": {"--output": "--output-name"},
    "sensitivity": {"--output": "--output-name"},
    "search": {"--output": "--output-name"},
}


class AmqCommand(click.Command):
    """A command that still takes its deprecated option spellings, with a warning."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        old = DEPRECATED.get(self.name or "", {})
        out = []
        for a in args:
            name, eq, value = a.partition("=")
            if name in old:
                warn(f"{name} is deprecated; use {old[name]}")
                a = old[name] + eq + value
            out.append(a)
        return super().parse_args(ctx, out)


class AmqGroup(click.Group):
    command_class = AmqCommand


@click.group(
    cls=AmqGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="amq")
def cli() -> None:
    """amq: post-training quantization of ONNX models (INT4 / INT8 / INT16, QDQ).

    \b
    Example:
      amq quantize model.onnx --calib calib_data/ -o model.q.onnx
    """


def main(argv: list[str] | None = None) -> None:
    """Entry point: click usage errors become one line and exit code 2, like every user error."""
    try:
        cli.main(args=argv, prog_name="amq", standalone_mode=False)
    except click.UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `amq` alone: the help, like --help
            click.echo(e.format_message())
            sys.exit(0)
        hint = (
            f" (see 'amq {e.ctx.info_name} --help')" if e.ctx and e.ctx.info_name != "amq" else ""
        )
        fail(f"{e.format_message()}{hint}")
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.Abort:
        click.echo("amq: interrupted", err=True)
        sys.exit(130)


# ---------------------------------------------------------------------------------------------
# One pattern for every command


@dataclass(frozen=True)
class Opts:
    """A command's options as click parsed them, read-only: ``o.model``, ``o.get('top')``."""

    given: Mapping[str, Any]

    def __getattr__(self, name: str) -> Any:  # only called for names that are not fields
        try:
            return self.__dict__["given"][name]
        except KeyError:
            raise AttributeError(name) from None

    def get(self, name: str, default: Any = None) -> Any:
        return self.given.get(name, default)

    @property
    def show_progress(self) -> bool:
        return not self.get("quiet") and not self.get("as_json")

    @property
    def cache(self) -> Any:
        """The statistics cache for the API: False (--no-cache), a folder, or True (default)."""
        return False if self.get("no_cache") else (self.get("cache_dir") or True)

    @property
    def execution(self) -> str:
        return "runtime" if self.get("on_runtime") else "ideal"


def takes_opts(fn: Callable[[Opts], None]) -> Callable[..., None]:
    """The click callback of a command written as ``fn(o: Opts)``: user mistakes become one line
    on stderr and exit code 2 (1 when a goal is not met), Ctrl-C exit code 130."""

    @functools.wraps(fn)
    def callback(**given: Any) -> None:
        try:
            fn(Opts(given))
        except AmqError as e:
            fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            click.echo("amq: interrupted", err=True)
            sys.exit(130)

    return callback


def show(o: Opts, result: Any, draw: Callable[[], None], data: Any = None) -> None:
    """A command's result: its warnings on stderr; with --json ``data`` (default
    ``result.to_dict()``) on stdout; else ``draw()`` unless -q."""
    for w in getattr(result, "warnings", ()):
        warn(w)
    if o.get("as_json"):
        click.echo(report.to_json(result.to_dict() if data is None else data))
    elif not o.get("quiet"):
        draw()


def given(**fields: Any) -> dict[str, Any] | None:
    """The options given on the command line (None: not given) as a config section, or None."""
    return {k: v for k, v in fields.items() if v is not None} or None


def config_of(o: Opts, **sections: Any) -> Config:
    """-c's config (defaults without it) with the command's setting options applied: --target,
    --method, --percentile, --samples, --batch-size, --weight-bits, --per-tensor, --overflow,
    --act-bits, --symmetric, --quantize-outputs (those the command has); ``sections``: more."""
    wb, ab = o.get("weight_bits"), o.get("act_bits")
    return with_overrides(
        load_config(o.get("config_path")),
        target=o.get("target"),
        calibration=given(
            method=o.get("method"),
            percentile=o.get("percentile"),
            num_samples=o.get("num_samples"),
            batch_size=o.get("batch_size"),
        ),
        weights=given(
            bits=int(wb) if wb else None,
            granularity=Granularity.PER_TENSOR.value if o.get("per_tensor") else None,
            overflow=o.get("overflow"),
        ),
        activations=given(bits=int(ab) if ab else None, symmetric=o.get("symmetric")),
        quantize_outputs=o.get("quantize_outputs"),
        **sections,
    )


# ---------------------------------------------------------------------------------------------
# Options spelled the same way in every command (each use makes its own click Option)

BITS = click.Choice([str(b) for b in ALLOWED_BITS])
FILE = click.Path(dir_okay=False, path_type=Path)
DIR = click.Path(file_okay=False, path_type=Path)

json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print machine-readable results."
)
no_cache_option = click.option(
    "--no-cache", is_flag=True, help="Do not read or write cached statistics."
)
quiet_option = click.option(
    "-q", "--quiet", is_flag=True, help="Print nothing but errors and warnings (no progress bar)."
)
output_name_option = click.option(
    "--output-name", "output_name", help="Model output to score [the first float one]."
)
weight_bits_option = click.option("--weight-bits", type=BITS, help="Weight bits for every layer.")
act_bits_option = click.option("--act-bits", type=BITS, help="Activation bits for every layer.")
per_tensor_option = click.option(
    "--per-tensor",
    is_flag=True,
    default=None,
    help="Per-tensor weight scales (default per channel).",
)
runtime_option = click.option(
    "--runtime",
    "on_runtime",
    is_flag=True,
    help="Evaluate on this CPU's onnxruntime integer kernels instead of the Q/DQ math (the "
    "default, which ranks the same on every machine).",
)
overflow_option = click.option(
    "--overflow",
    type=click.Choice([o.value for o in Overflow]),
    help="int16 pair-sum saturation on x86 without VNNI: auto (emulate on the calibration data "
    "and widen the weight scales of the layers that would saturate, only where a weight pair "
    "needs it), guard (every Conv/Gemm/MatMul), "
    "off [auto].",
)
method_option = click.option(
    "--method", type=click.Choice([m.value for m in RangeMethod]), help="Activation range method."
)


def config_option(help_text: str = "YAML config."):
    return click.option("-c", "--config", "config_path", type=FILE, help=help_text)


def top_option(help_text: str):
    return click.option(
        "--top", type=click.IntRange(min=1), default=20, show_default=True, help=help_text
    )


def samples_option(help_text: str = "Evaluate a seeded subset of this size.", **kw: Any):
    return click.option("--samples", type=click.IntRange(min=1), help=help_text, **kw)
