"""Parsers for one profile value each: numbers with units, and the unitless checks.

Plain numbers are in the base unit the key documents (bytes, seconds, ms, GB/s = 1e9 B/s,
GOPS = 1e9 ops/s); strings may carry their own unit ("300MB", "1.5GiB", "500ms", "8.7GB/s",
"1.2TOPS"). A value that cannot be right raises `ValueProblem` with what is wrong and how to
write it instead; the schema adds the file, table and key.
"""

from __future__ import annotations

import difflib
import math
import re
from typing import Any, Callable, Iterable

_NUM = r"([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"
_BYTE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_TIME_UNITS = {"s": 1.0, "sec": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "min": 60.0}
_BW_UNITS = {"gb/s": 1.0, "mb/s": 1e-3, "tb/s": 1e3, "gib/s": 2**30 / 1e9, "mib/s": 2**20 / 1e9}
_OPS_UNITS = {"gops": 1.0, "gflops": 1.0, "tops": 1e3, "tflops": 1e3, "mops": 1e-3, "mflops": 1e-3}


class ValueProblem(Exception):
    """A problem with one value; the schema adds where it is."""


def _split(value: str) -> tuple[float, str]:
    m = re.fullmatch(r"\s*" + _NUM + r"\s*([A-Za-zµ/]*)\s*", value)
    if not m:
        raise ValueProblem(f"'{value}' is not a number with a unit")
    return float(m.group(1)), m.group(2).lower()


def _kind_of_unit(unit: str) -> str | None:
    for kind, table in (("a memory size", _BYTE_UNITS), ("a time", _TIME_UNITS), ("a bandwidth", _BW_UNITS),
                        ("a compute rate", _OPS_UNITS)):
        if unit in table:
            return kind
    return None


def number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueProblem(f"expected a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueProblem(f"expected a finite number, got {value!r}")
    return float(value)


def _with_unit(value: Any, units: dict, kind: str, base: str, example: str) -> float:
    """Value in the base unit: plain numbers are already in it; strings carry a unit from `units`."""
    if isinstance(value, str):
        num, unit = _split(value)
        if unit == "":
            return num
        if unit in units:
            return num * units[unit]
        other = _kind_of_unit(unit)
        if other:
            raise ValueProblem(f"'{value}' is {other}, expected {kind} like {example} (plain numbers are {base})")
        if kind == "a memory size" and unit in ("k", "m", "g", "t"):
            raise ValueProblem(f"'{value}' is ambiguous: write '{num:g}{unit.upper()}B' (10^n bytes) "
                               f"or '{num:g}{unit.upper()}iB' (2^n bytes)")
        raise ValueProblem(f"unknown unit '{unit}' in '{value}', expected {kind} like {example} (plain numbers are {base})")
    return number(value)


def parse_bytes(value: Any) -> int:
    """'300MB' -> 300_000_000, '1.5GiB' -> 1_610_612_736, 4096 -> 4096 (plain numbers are bytes)."""
    v = _with_unit(value, _BYTE_UNITS, "a memory size", "bytes", "'300MB' or '2.5GB'")
    if v <= 0:
        raise ValueProblem(f"must be positive, got {value!r}")
    # a plain number this small is a forgotten unit, not a model size
    if not isinstance(value, str) and v < 1e6:
        raise ValueProblem(f"{value!r} is {v:g} bytes, too small for a model; did you mean '{v:g}MB'? "
                           "(plain numbers are bytes)")
    return int(round(v))


def parse_seconds(value: Any) -> float:
    """'8s' -> 8.0, '500ms' -> 0.5, 2 -> 2.0 (plain numbers are seconds)."""
    v = _with_unit(value, _TIME_UNITS, "a time", "seconds", "'8s' or '500ms'")
    if v <= 0:
        raise ValueProblem(f"must be positive, got {value!r}")
    if not isinstance(value, str) and v > 3600:
        raise ValueProblem(f"{value!r} seconds is over an hour; did you mean '{v:g}ms'? (plain numbers are seconds)")
    return v


def parse_ms(value: Any, allow_zero: bool = True) -> float:
    """'0.1ms' -> 0.1, '2us' -> 0.002, 0.25 -> 0.25 (plain numbers are milliseconds)."""
    v = _with_unit(value, {k: f * 1e3 for k, f in _TIME_UNITS.items()}, "a time", "milliseconds", "'0.1ms' or '50us'")
    if v < 0 or (v == 0 and not allow_zero):
        raise ValueProblem(f"must be {'zero or ' if allow_zero else ''}positive, got {value!r}")
    if not isinstance(value, str) and v > 10_000:
        raise ValueProblem(f"{value!r} ms is over 10 seconds per step; check the unit (plain numbers are milliseconds)")
    return v


def _positive_rate(value: Any, units: dict, what: str, unit: str, example: str, cap: float, hint: str) -> float:
    """A positive rate; a plain number above `cap` is most likely in the wrong unit (`hint` says which)."""
    v = _with_unit(value, units, what, unit, example)
    if v <= 0:
        raise ValueProblem(f"must be positive, got {value!r}")
    if not isinstance(value, str) and v > cap:
        raise ValueProblem(f"{value!r} {unit} is implausible; {hint.format(v=v)} (plain numbers are {unit})")
    return v


def parse_gbps(value: Any) -> float:
    """'8.7GB/s' -> 8.7, '8700MB/s' -> 8.7, 8.7 -> 8.7 (plain numbers are GB/s = 1e9 bytes/s)."""
    return _positive_rate(value, _BW_UNITS, "a bandwidth", "GB/s", "'8.7GB/s'", 20_000,
                          "did you give MB/s? write '{v:g}MB/s'")


def parse_gops(value: Any) -> float:
    """'150GOPS' -> 150, '1.2TOPS' -> 1200, 150 -> 150 (plain numbers are GOPS = 1e9 ops/s)."""
    return _positive_rate(value, _OPS_UNITS, "a compute rate", "GOPS", "'150GOPS' or '1.2TOPS'", 10_000_000,
                          "did you give ops/s?")


# --------------------------------------------------------------------------------------------
# Unitless values


def positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ValueProblem(f"expected a whole number, got {value!r}")
    if value <= 0:
        raise ValueProblem(f"must be positive, got {value!r}")
    return value


def positive_number(value: Any) -> float:
    v = number(value)
    if v <= 0:
        raise ValueProblem(f"must be positive, got {value!r}")
    return v


def string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueProblem(f"expected a string, got {type(value).__name__} {value!r}")
    return value


def strings(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise ValueProblem(f"expected a list of strings, got {value!r}")
    return tuple(value)


def choice(options: Iterable[str]) -> Callable[[Any], str]:
    """A parser accepting one of `options` (case-insensitive), suggesting the closest otherwise."""
    options = tuple(options)

    def parse(value: Any) -> str:
        v = string(value).strip()
        low = v.lower()
        for o in options:
            if low == o.lower():
                return o
        close = difflib.get_close_matches(low, [o.lower() for o in options], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueProblem(f"'{v}' is not one of {', '.join(options)}{hint}")
    return parse
