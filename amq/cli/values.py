"""Command-line spellings of settings (--input-shape NAME:D1,D2, --int16-top 10%, --bits 4,8):
parsed here into plain values, each bad spelling a one-line error naming the option."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from amq.config import ALLOWED_BITS
from amq.errors import ConfigError

DATA_TYPES = ("float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool")


def parse_input_shapes(values: Iterable[str]) -> dict[str, list[int]]:
    """--input-shape NAME:D1,D2,... (repeated) as {name: dims}."""
    out = {}
    for v in values:
        name, sep, dims = v.rpartition(":")
        try:
            shape = [int(d) for d in dims.split(",")]
        except ValueError:
            shape = []
        if not sep or not name or not shape or any(d <= 0 for d in shape):
            raise ConfigError(
                f"--input-shape '{v}': expected NAME:D1,D2,... e.g. input:1,3,224,224"
            )
        out[name] = shape
    return out


def parse_data_types(values: Iterable[str], names: Iterable[str]) -> dict[str, str]:
    """--data-types TYPE or NAME:TYPE (repeated); a bare TYPE is for every input in ``names``."""
    out = {}
    for v in values:
        name, sep, t = v.rpartition(":")
        if not sep:  # one type for every input given a shape (AMCT style)
            name, t = "", v
        if t not in DATA_TYPES:
            raise ConfigError(f"--data-types '{v}': type must be one of {', '.join(DATA_TYPES)}")
        if name:
            out[name] = t
        else:
            out.update({n: t for n in names})
    return out


def parse_percent(text: str, option: str) -> float:
    """'10%' as 10.0; a number without '%' is an error (it could mean a count or a fraction)."""
    s = text.strip()
    try:
        if not s.endswith("%"):
            raise ValueError(s)
        return float(s[:-1])
    except ValueError:
        raise ConfigError(f"{option} '{text}': give a percentage such as 10%") from None


def parse_bits_list(text: str, option: str, allowed: Sequence[Any] = ALLOWED_BITS) -> list[Any]:
    """'4,8,16' (or with 'float' where ``allowed`` has it) as a list, in the given order."""
    out: list[Any] = []
    for tok in (t.strip() for t in text.split(",")):
        if not tok:
            continue
        v: Any = int(tok) if tok.isdigit() else tok
        if v not in allowed:
            raise ConfigError(f"{option} '{text}': choose from {', '.join(map(str, allowed))}")
        out.append(v)
    if not out:
        raise ConfigError(f"{option} '{text}': give at least one of {', '.join(map(str, allowed))}")
    return out
