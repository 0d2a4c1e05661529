"""Device profiles (TOML), shipped inside the wheel, and the code that reads and writes them.

This package is `edgeprune.profiles` (pyproject maps the repository's `profiles/` here), so the
loader lives beside the data: `from edgeprune.profiles import load_profile, list_profiles`.

A profile has six tables. Plain numbers are in the unit the key documents; strings may carry
their own unit ("300MB", "2.5GB", "1.5GiB", "8s", "500ms", "8.7GB/s", "150GOPS").

    name = "raspberrypi5"                 # optional; defaults to the file name
    [hardware]    description, threads, ram (bytes), accelerator?, isa?, notes?
    [latency]     backend ("llama.cpp" | "onnxruntime"), bandwidth_gbps (GB/s = 1e9 B/s),
                  layer_overhead_ms, token_overhead_ms (decode, per layer / per token),
                  prefill_layer_token_overhead_ms (per layer per prompt token), prefill_overhead_ms
                  (per prefill call), kv_dtype?, prefill_logits? ("last" | "all"), version?
    [latency.compute_gops]  dtype = effective prefill GOPS (1e9 ops/s), one per dtype used
    [latency.dtype_bandwidth_gbps]  optional: dtype = decode GB/s where it differs from bandwidth_gbps
    [memory]      budget (bytes: weights + KV cache at `context` + runtime buffers), context
                  (tokens), runtime_overhead (bytes)
    [targets]     decode_tok_s_min, ttft_max_s (seconds, for a prompt of prompt_tokens),
                  prompt_tokens, memory_max (bytes; the memory limit is min(memory_max, budget))
    [export]      format ("gguf" | "onnx"), dtypes (allowed, most preferred first),
                  width_multiple (pruned widths are multiples of it)
    [provenance]  sources, estimates (dotted keys whose values are estimates), notes, calibrated

Every mistake is an `EdgepruneError` (exit code 2) on one line that names the file, the table and
the key, and says how to fix it.
"""

from __future__ import annotations

import difflib
import math
import numbers
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from edgeprune.errors import EdgepruneError
from edgeprune.latency import (BACKEND_FORMAT, BACKENDS, DTYPES, GGUF_DTYPES, KV_DTYPES, ONNX_DTYPES,
                               LatencyConstants, normalize_dtype)

SCHEMA_VERSION = 1
FORMAT_DTYPES = {"gguf": GGUF_DTYPES, "onnx": ONNX_DTYPES}
K_QUANTS = ("q4_k_m",)


# --------------------------------------------------------------------------------------------
# Dataclasses


@dataclass(frozen=True)
class Hardware:
    description: str
    threads: int
    ram: int  # bytes
    accelerator: str = "cpu"
    isa: tuple[str, ...] = ()
    notes: str = ""


@dataclass(frozen=True)
class MemorySpec:
    budget: int  # bytes the model may use: weights + KV cache at `context` + runtime buffers
    context: int  # tokens the KV cache is sized for
    runtime_overhead: int = 0  # bytes of runtime/process overhead beyond the modelled buffers


@dataclass(frozen=True)
class Targets:
    decode_tok_s_min: float | None = None
    ttft_max_s: float | None = None
    prompt_tokens: int = 512
    memory_max: int | None = None  # bytes


@dataclass(frozen=True)
class ExportSpec:
    format: str
    dtypes: tuple[str, ...]
    width_multiple: int = 32

    @property
    def default_dtype(self) -> str:
        return self.dtypes[0]


@dataclass(frozen=True)
class Provenance:
    sources: tuple[str, ...] = ()
    estimates: tuple[str, ...] = ()
    notes: str = ""
    calibrated: str = ""


@dataclass(frozen=True)
class Profile:
    name: str
    hardware: Hardware
    latency: LatencyConstants
    memory: MemorySpec
    targets: Targets
    export: ExportSpec
    provenance: Provenance = field(default_factory=Provenance)
    latency_version: str = ""  # runtime version the constants were measured with
    source: str = ""  # where it was loaded from

    @property
    def memory_limit(self) -> int:
        """The binding memory limit: min(targets.memory_max, memory.budget)."""
        return min(x for x in (self.targets.memory_max, self.memory.budget) if x)

    def is_estimate(self, dotted_key: str) -> bool:
        return any(dotted_key == e or dotted_key.startswith(e + ".") for e in self.provenance.estimates)


# --------------------------------------------------------------------------------------------
# Units

_NUM = r"([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"
_BYTE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_TIME_UNITS = {"s": 1.0, "sec": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "min": 60.0}
_BW_UNITS = {"gb/s": 1.0, "mb/s": 1e-3, "tb/s": 1e3, "gib/s": 2**30 / 1e9, "mib/s": 2**20 / 1e9}
_OPS_UNITS = {"gops": 1.0, "gflops": 1.0, "tops": 1e3, "tflops": 1e3, "mops": 1e-3, "mflops": 1e-3}


class _Err(Exception):
    """A problem with one value; the loader adds where it is."""


def _split(value: str) -> tuple[float, str]:
    m = re.fullmatch(r"\s*" + _NUM + r"\s*([A-Za-zµ/]*)\s*", value)
    if not m:
        raise _Err(f"'{value}' is not a number with a unit")
    return float(m.group(1)), m.group(2).lower()


def _kind_of_unit(unit: str) -> str | None:
    for kind, table in (("a memory size", _BYTE_UNITS), ("a time", _TIME_UNITS), ("a bandwidth", _BW_UNITS),
                        ("a compute rate", _OPS_UNITS)):
        if unit in table:
            return kind
    return None


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Err(f"expected a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise _Err(f"expected a finite number, got {value!r}")
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
            raise _Err(f"'{value}' is {other}, expected {kind} like {example} (plain numbers are {base})")
        if kind == "a memory size" and unit in ("k", "m", "g", "t"):
            raise _Err(f"'{value}' is ambiguous: write '{num:g}{unit.upper()}B' (10^n bytes) or '{num:g}{unit.upper()}iB' (2^n bytes)")
        raise _Err(f"unknown unit '{unit}' in '{value}', expected {kind} like {example} (plain numbers are {base})")
    return _number(value)


def parse_bytes(value: Any) -> int:
    """'300MB' -> 300_000_000, '1.5GiB' -> 1_610_612_736, 4096 -> 4096 (plain numbers are bytes)."""
    v = _with_unit(value, _BYTE_UNITS, "a memory size", "bytes", "'300MB' or '2.5GB'")
    if v <= 0:
        raise _Err(f"must be positive, got {value!r}")
    if not isinstance(value, str) and v < 1e6:
        raise _Err(f"{value!r} is {v:g} bytes, too small for a model; did you mean '{v:g}MB'? (plain numbers are bytes)")
    return int(round(v))


def parse_seconds(value: Any) -> float:
    """'8s' -> 8.0, '500ms' -> 0.5, 2 -> 2.0 (plain numbers are seconds)."""
    v = _with_unit(value, _TIME_UNITS, "a time", "seconds", "'8s' or '500ms'")
    if v <= 0:
        raise _Err(f"must be positive, got {value!r}")
    if not isinstance(value, str) and v > 3600:
        raise _Err(f"{value!r} seconds is over an hour; did you mean '{v:g}ms'? (plain numbers are seconds)")
    return v


def parse_ms(value: Any, allow_zero: bool = True) -> float:
    """'0.1ms' -> 0.1, '2us' -> 0.002, 0.25 -> 0.25 (plain numbers are milliseconds)."""
    v = _with_unit(value, {k: f * 1e3 for k, f in _TIME_UNITS.items()}, "a time", "milliseconds", "'0.1ms' or '50us'")
    if v < 0 or (v == 0 and not allow_zero):
        raise _Err(f"must be {'zero or ' if allow_zero else ''}positive, got {value!r}")
    if not isinstance(value, str) and v > 10_000:
        raise _Err(f"{value!r} ms is over 10 seconds per step; check the unit (plain numbers are milliseconds)")
    return v


def parse_gbps(value: Any) -> float:
    """'8.7GB/s' -> 8.7, '8700MB/s' -> 8.7, 8.7 -> 8.7 (plain numbers are GB/s = 1e9 bytes/s)."""
    v = _with_unit(value, _BW_UNITS, "a bandwidth", "GB/s", "'8.7GB/s'")
    if v <= 0:
        raise _Err(f"must be positive, got {value!r}")
    if not isinstance(value, str) and v > 20_000:
        raise _Err(f"{value!r} GB/s is implausible; did you give MB/s? write '{v:g}MB/s' (plain numbers are GB/s)")
    return v


def parse_gops(value: Any) -> float:
    """'150GOPS' -> 150, '1.2TOPS' -> 1200, 150 -> 150 (plain numbers are GOPS = 1e9 ops/s)."""
    v = _with_unit(value, _OPS_UNITS, "a compute rate", "GOPS", "'150GOPS' or '1.2TOPS'")
    if v <= 0:
        raise _Err(f"must be positive, got {value!r}")
    if not isinstance(value, str) and v > 10_000_000:
        raise _Err(f"{value!r} GOPS is implausible; did you give ops/s? (plain numbers are GOPS)")
    return v


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise _Err(f"expected a whole number, got {value!r}")
    if value <= 0:
        raise _Err(f"must be positive, got {value!r}")
    return value


def _positive_number(value: Any) -> float:
    v = _number(value)
    if v <= 0:
        raise _Err(f"must be positive, got {value!r}")
    return v


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise _Err(f"expected a string, got {type(value).__name__} {value!r}")
    return value


def _strings(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise _Err(f"expected a list of strings, got {value!r}")
    return tuple(value)


def _choice(options) -> Any:
    def parse(value: Any) -> str:
        v = _string(value).strip()
        low = v.lower()
        for o in options:
            if low == o.lower():
                return o
        close = difflib.get_close_matches(low, [o.lower() for o in options], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise _Err(f"'{v}' is not one of {', '.join(options)}{hint}")
    return parse


def _dtype(value: Any) -> str:
    try:
        return normalize_dtype(_string(value))
    except EdgepruneError:
        close = difflib.get_close_matches(str(value).lower(), DTYPES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise _Err(f"unknown dtype '{value}'{hint}; known dtypes: {', '.join(DTYPES)}") from None


# --------------------------------------------------------------------------------------------
# Schema: table -> key -> (parser, required)

_BACKEND = _choice(BACKENDS)
_SCHEMA: dict[str, dict[str, tuple[Any, bool]]] = {
    "hardware": {
        "description": (_string, True),
        "threads": (_positive_int, True),
        "ram": (parse_bytes, True),
        "accelerator": (_string, False),
        "isa": (_strings, False),
        "notes": (_string, False),
    },
    "latency": {
        "backend": (_BACKEND, True),
        "bandwidth_gbps": (parse_gbps, True),
        "compute_gops": (None, True),  # table, parsed separately
        "dtype_bandwidth_gbps": (None, False),  # table, parsed separately
        "layer_overhead_ms": (parse_ms, False),
        "token_overhead_ms": (parse_ms, False),
        "prefill_layer_token_overhead_ms": (parse_ms, False),
        "prefill_overhead_ms": (parse_ms, False),
        "kv_dtype": (_choice(tuple(KV_DTYPES)), False),
        "prefill_logits": (_choice(("last", "all")), False),
        "version": (_string, False),
    },
    "memory": {
        "budget": (parse_bytes, True),
        "context": (_positive_int, True),
        "runtime_overhead": (lambda v: parse_bytes(v) if v else 0, False),
    },
    "targets": {
        "decode_tok_s_min": (_positive_number, False),
        "ttft_max_s": (parse_seconds, False),
        "prompt_tokens": (_positive_int, False),
        "memory_max": (parse_bytes, False),
    },
    "export": {
        "format": (_choice(("gguf", "onnx")), True),
        "dtypes": (None, True),  # list of dtypes, parsed separately
        "width_multiple": (_positive_int, False),
    },
    "provenance": {
        "sources": (_strings, False),
        "estimates": (_strings, False),
        "notes": (_string, False),
        "calibrated": (_string, False),
    },
}
_REQUIRED_TABLES = ("hardware", "latency", "memory", "targets", "export")
_TOP_KEYS = ("name", "schema")


def _suggest(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else f"; allowed: {', '.join(options)}"


class _Loader:
    def __init__(self, where: str):
        self.where = where

    def fail(self, msg: str) -> EdgepruneError:
        return EdgepruneError(f"profile {self.where}: {msg}")

    def table(self, data: dict, name: str) -> dict:
        raw = data.get(name)
        if raw is None:
            if name in _REQUIRED_TABLES:
                raise self.fail(f"missing table [{name}]; every profile needs {', '.join('[' + t + ']' for t in _REQUIRED_TABLES)} "
                                "(copy one from `edgeprune profiles show raspberrypi5`)")
            return {}
        if not isinstance(raw, dict):
            raise self.fail(f"'{name}' must be a table [{name}], got {type(raw).__name__}")
        schema = _SCHEMA[name]
        out: dict[str, Any] = {}
        for key, value in raw.items():
            if key not in schema:
                home = [t for t, keys in _SCHEMA.items() if key in keys and t != name]
                hint = f" (it belongs in [{home[0]}])" if home else _suggest(key, schema)
                raise self.fail(f"[{name}] unknown key '{key}'{hint}")
            parser, _ = schema[key]
            if parser is None:
                continue
            try:
                out[key] = parser(value)
            except _Err as exc:
                raise self.fail(f"[{name}] {key}: {exc}") from None
        for key, (_, required) in schema.items():
            if required and key not in raw:
                raise self.fail(f"[{name}] missing required key '{key}'")
        return out

    def dtype_table(self, raw: Any, table: str, parse, example: str, required: bool = True) -> dict[str, float]:
        if raw is None and not required:
            return {}
        if not isinstance(raw, dict) or (required and not raw):
            raise self.fail(f"[latency.{table}] must be a table of dtype = value, e.g. {example}")
        out = {}
        for key, value in raw.items():
            try:
                dt = _dtype(key)
                out[dt] = parse(value)
            except _Err as exc:
                raise self.fail(f"[latency.{table}] {key}: {exc}") from None
        return out

    def dtypes(self, raw: Any, fmt: str) -> tuple[str, ...]:
        try:
            names = _strings(raw)
            out = tuple(_dtype(n) for n in names)
        except _Err as exc:
            raise self.fail(f"[export] dtypes: {exc}") from None
        if not out:
            raise self.fail("[export] dtypes is empty: list at least one, most preferred first, e.g. [\"q8_0\", \"q4_0\"]")
        allowed = FORMAT_DTYPES[fmt]
        for d in out:
            if d not in allowed:
                raise self.fail(f"[export] dtypes: '{d}' cannot be exported as {fmt}; {fmt} dtypes are {', '.join(allowed)}")
        if len(set(out)) != len(out):
            raise self.fail(f"[export] dtypes lists a dtype twice: {list(out)}")
        return out


def parse_profile(data: dict, where: str = "<memory>", default_name: str = "") -> Profile:
    """Validate a profile already read from TOML (a dict) and build a `Profile`."""
    ld = _Loader(where)
    if not isinstance(data, dict):
        raise ld.fail("not a TOML table")
    for key in data:
        if key not in _SCHEMA and key not in _TOP_KEYS:
            raise ld.fail(f"unknown top-level key or table '{key}'{_suggest(key, list(_SCHEMA) + list(_TOP_KEYS))}")
    schema = data.get("schema", SCHEMA_VERSION)
    if schema != SCHEMA_VERSION:
        raise ld.fail(f"schema = {schema!r} is not supported; this edgeprune reads schema = {SCHEMA_VERSION}")
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name.strip():
        raise ld.fail("name must be a non-empty string")

    hw = ld.table(data, "hardware")
    lat = ld.table(data, "latency")
    mem = ld.table(data, "memory")
    tg = ld.table(data, "targets")
    ex = ld.table(data, "export")
    pv = ld.table(data, "provenance")

    compute = ld.dtype_table(data["latency"].get("compute_gops"), "compute_gops", parse_gops, "q8_0 = 80")
    dtype_bw = ld.dtype_table(data["latency"].get("dtype_bandwidth_gbps"), "dtype_bandwidth_gbps", parse_gbps,
                              "q4_0 = 8.4", required=False)
    backend = lat["backend"]
    fmt = ex["format"]
    if BACKEND_FORMAT[backend] != fmt:
        raise ld.fail(f"[export] format = '{fmt}' does not match [latency] backend = '{backend}' "
                      f"(that backend runs {BACKEND_FORMAT[backend]} files)")
    dtypes = ld.dtypes(data["export"].get("dtypes"), fmt)
    for d in dtypes:
        if d not in compute:
            raise ld.fail(f"[latency.compute_gops] has no rate for exported dtype '{d}': add '{d} = <GOPS>' "
                          "(or drop it from [export] dtypes)")
    width = ex.get("width_multiple", 32)
    if dtypes[0] in K_QUANTS and width % 256:
        raise ld.fail(f"[export] width_multiple = {width} with default dtype {dtypes[0]}: K-quants need widths "
                      "that are multiples of 256 (llama.cpp falls back to bigger types otherwise); set width_multiple = 256")
    if "threads" in hw and hw["threads"] > 1024:
        raise ld.fail(f"[hardware] threads = {hw['threads']} is implausible")

    kv_dtype = lat.get("kv_dtype", "f16" if backend == "llama.cpp" else "f32")
    constants = LatencyConstants(
        backend=backend,
        bandwidth_gbps=lat["bandwidth_gbps"],
        compute_gops=compute,
        layer_overhead_ms=lat.get("layer_overhead_ms", 0.0),
        token_overhead_ms=lat.get("token_overhead_ms", 0.0),
        prefill_layer_token_overhead_ms=lat.get("prefill_layer_token_overhead_ms", 0.0),
        prefill_overhead_ms=lat.get("prefill_overhead_ms", 0.0),
        kv_dtype=kv_dtype,
        prefill_logits=lat.get("prefill_logits", "last" if backend == "llama.cpp" else "all"),
        dtype_bandwidth_gbps=dtype_bw,
    )
    memory = MemorySpec(budget=mem["budget"], context=mem["context"], runtime_overhead=mem.get("runtime_overhead", 0))
    if memory.runtime_overhead >= memory.budget:
        raise ld.fail(f"[memory] runtime_overhead ({memory.runtime_overhead / 1e6:g} MB) leaves nothing of the budget "
                      f"({memory.budget / 1e6:g} MB)")
    if memory.budget > hw["ram"]:
        raise ld.fail(f"[memory] budget ({memory.budget / 1e9:g} GB) exceeds [hardware] ram ({hw['ram'] / 1e9:g} GB)")
    targets = Targets(decode_tok_s_min=tg.get("decode_tok_s_min"), ttft_max_s=tg.get("ttft_max_s"),
                      prompt_tokens=tg.get("prompt_tokens", 512), memory_max=tg.get("memory_max"))
    if targets.prompt_tokens > memory.context:
        raise ld.fail(f"[targets] prompt_tokens = {targets.prompt_tokens} exceeds [memory] context = {memory.context}")
    if targets.memory_max and targets.memory_max > memory.budget:
        raise ld.fail(f"[targets] memory_max ({targets.memory_max / 1e6:g} MB) exceeds [memory] budget "
                      f"({memory.budget / 1e6:g} MB): lower it or raise the budget")
    export = ExportSpec(format=fmt, dtypes=dtypes, width_multiple=width)
    provenance = Provenance(sources=pv.get("sources", ()), estimates=pv.get("estimates", ()),
                            notes=pv.get("notes", ""), calibrated=pv.get("calibrated", ""))
    profile = Profile(name=name.strip(), hardware=Hardware(**hw), latency=constants, memory=memory, targets=targets,
                      export=export, provenance=provenance, latency_version=lat.get("version", ""), source=where)
    known = set(_dotted_keys(profile_to_dict(profile)))
    for e in provenance.estimates:
        if e not in known and not any(k.startswith(e + ".") for k in known):
            close = difflib.get_close_matches(e, sorted(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ld.fail(f"[provenance] estimates names '{e}', which is not a key of this profile{hint}")
    return profile


def _dotted_keys(d: dict, prefix: str = ""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        yield key
        if isinstance(v, dict):
            yield from _dotted_keys(v, key + ".")


# --------------------------------------------------------------------------------------------
# Finding and loading


def _builtin_dir():
    return resources.files(__name__)


def list_profiles() -> list[str]:
    """Names of the profiles shipped with edgeprune, sorted."""
    return sorted(p.name[:-5] for p in _builtin_dir().iterdir() if p.name.endswith(".toml"))


def builtin_profile_text(name: str) -> str:
    """The shipped TOML of a profile, comments included (for `profiles show`)."""
    res = _builtin_dir().joinpath(f"{name}.toml")
    if not res.is_file():
        raise _unknown(name)
    return res.read_text(encoding="utf-8")


def _unknown(name: str) -> EdgepruneError:
    names = list_profiles()
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return EdgepruneError(f"unknown profile '{name}'{hint}; available: {', '.join(names)}; "
                          "or pass the path of a .toml profile")


def _looks_like_path(s: str) -> bool:
    return s.endswith(".toml") or "/" in s or "\\" in s or s.startswith((".", "~"))


def loads_profile(text: str, where: str = "<string>", default_name: str = "") -> Profile:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise EdgepruneError(f"profile {where}: not valid TOML: {exc}") from None
    return parse_profile(data, where, default_name)


def load_profile(name_or_path: str | Path) -> Profile:
    """A shipped profile by name (`raspberrypi5`) or any profile by path (`./my-board.toml`)."""
    if isinstance(name_or_path, Profile):
        return name_or_path
    s = str(name_or_path)
    path = Path(s).expanduser()
    if isinstance(name_or_path, Path) or _looks_like_path(s) or path.is_file():
        if not path.is_file():
            raise EdgepruneError(f"profile file not found: {path} (built-in profiles: {', '.join(list_profiles())})")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise EdgepruneError(f"cannot read profile {path}: {exc}") from None
        return loads_profile(text, str(path), default_name=path.stem)
    if s not in list_profiles():
        raise _unknown(s)
    return loads_profile(builtin_profile_text(s), f"{s} (built-in)", default_name=s)


# --------------------------------------------------------------------------------------------
# Writing


def _fmt_bytes(n: int) -> str | int:
    """An exact, readable spelling of a byte count ('2.5GB', '1.5GiB') or the plain integer."""
    for unit, f in (("GB", 10**9), ("GiB", 2**30), ("MB", 10**6), ("MiB", 2**20)):
        if n >= f:
            v = n / f
            s = f"{v:.6g}"
            if int(round(float(s) * f)) == n:
                return f"{s}{unit}"
    return int(n)


def profile_to_dict(profile: Profile, human_units: bool = False) -> dict:
    """Plain data in the profile's base units (bytes, seconds, ms, GB/s, GOPS), as written to TOML.

    human_units=True spells byte counts as '2.5GB'-style strings (what `write_profile` writes).
    """
    b = _fmt_bytes if human_units else int
    p = profile
    hw = {"description": p.hardware.description, "threads": p.hardware.threads, "ram": b(p.hardware.ram),
          "accelerator": p.hardware.accelerator}
    if p.hardware.isa:
        hw["isa"] = list(p.hardware.isa)
    if p.hardware.notes:
        hw["notes"] = p.hardware.notes
    c = p.latency
    lat: dict[str, Any] = {"backend": c.backend, "bandwidth_gbps": c.bandwidth_gbps,
                           "layer_overhead_ms": c.layer_overhead_ms, "token_overhead_ms": c.token_overhead_ms,
                           "prefill_layer_token_overhead_ms": c.prefill_layer_token_overhead_ms,
                           "prefill_overhead_ms": c.prefill_overhead_ms, "kv_dtype": c.kv_dtype,
                           "prefill_logits": c.prefill_logits}
    if p.latency_version:
        lat["version"] = p.latency_version
    lat["compute_gops"] = dict(c.compute_gops)
    if c.dtype_bandwidth_gbps:
        lat["dtype_bandwidth_gbps"] = dict(c.dtype_bandwidth_gbps)
    mem = {"budget": b(p.memory.budget), "context": p.memory.context}
    if p.memory.runtime_overhead:
        mem["runtime_overhead"] = b(p.memory.runtime_overhead)
    tg: dict[str, Any] = {}
    if p.targets.decode_tok_s_min is not None:
        tg["decode_tok_s_min"] = p.targets.decode_tok_s_min
    if p.targets.ttft_max_s is not None:
        tg["ttft_max_s"] = p.targets.ttft_max_s
    tg["prompt_tokens"] = p.targets.prompt_tokens
    if p.targets.memory_max is not None:
        tg["memory_max"] = b(p.targets.memory_max)
    out = {"name": p.name, "schema": SCHEMA_VERSION, "hardware": hw, "latency": lat, "memory": mem, "targets": tg,
           "export": {"format": p.export.format, "dtypes": list(p.export.dtypes),
                      "width_multiple": p.export.width_multiple}}
    pv: dict[str, Any] = {}
    if p.provenance.calibrated:
        pv["calibrated"] = p.provenance.calibrated
    if p.provenance.sources:
        pv["sources"] = list(p.provenance.sources)
    if p.provenance.estimates:
        pv["estimates"] = list(p.provenance.estimates)
    if p.provenance.notes:
        pv["notes"] = p.provenance.notes
    out["provenance"] = pv
    return out


def _toml_str(s: str) -> str:
    out = ['"']
    for ch in s:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _toml_str(k)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, numbers.Integral):
        return str(int(v))
    if isinstance(v, numbers.Real):  # float, numpy floats (whose repr is not TOML)
        v = float(v)
        if not math.isfinite(v):
            raise EdgepruneError(f"cannot write a non-finite number ({v}) to a profile")
        r = repr(v)
        return r if ("." in r or "e" in r or "n" in r) else r + ".0"
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise EdgepruneError(f"cannot write {type(v).__name__} to a profile")


def dumps_toml(data: dict, header: str = "") -> str:
    """TOML text for a dict of scalars, lists and (nested) tables. Enough for profiles."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    if lines:
        lines.append("")

    def emit(table: dict, path: list[str]):
        scalars = [(k, v) for k, v in table.items() if not isinstance(v, dict)]
        subs = [(k, v) for k, v in table.items() if isinstance(v, dict)]
        if path and (scalars or not subs):
            lines.append("[" + ".".join(_toml_key(p) for p in path) + "]")
        for k, v in scalars:
            line = f"{_toml_key(k)} = {_toml_value(v)}"
            if isinstance(v, (list, tuple)) and len(line) > 100:
                line = f"{_toml_key(k)} = [\n" + "".join(f"  {_toml_value(x)},\n" for x in v) + "]"
            lines.append(line)
        if scalars:
            lines.append("")
        for k, v in subs:
            emit(v, path + [k])

    emit(data, [])
    text = "\n".join(lines).rstrip() + "\n"
    return text.replace("\n\n\n", "\n\n")


def profile_to_toml(profile: Profile, header: str | None = None) -> str:
    if header is None:
        header = (f"edgeprune device profile '{profile.name}' (schema {SCHEMA_VERSION}).\n"
                  "Units: bytes for memory (or '300MB'), GB/s, GOPS, ms for overheads, seconds for ttft_max_s.")
        if profile.provenance.calibrated:
            header += f"\n{profile.provenance.calibrated}"
    data = profile_to_dict(profile, human_units=True)
    # top-level keys first, then tables
    top = {k: v for k, v in data.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in data.items() if isinstance(v, dict) and v}
    return dumps_toml({**top, **tables}, header)


def write_profile(profile: Profile, path: str | Path, header: str | None = None) -> Path:
    """Write `profile` as TOML that `load_profile` reads back to an equal profile."""
    path = Path(path)
    text = profile_to_toml(profile, header)
    loads_profile(text, str(path), default_name=profile.name)  # never write what we cannot read
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def describe_profile(profile: Profile) -> str:
    """A few human lines for `profiles show` / `profiles list -v`."""
    p, c, t = profile, profile.latency, profile.targets
    est = lambda k: " (estimate)" if p.is_estimate(k) else ""  # noqa: E731
    lines = [
        f"{p.name}: {p.hardware.description}",
        f"  backend {c.backend}, {p.hardware.threads} threads, export {p.export.format} "
        f"{'/'.join(p.export.dtypes)} (default {p.export.default_dtype}), widths multiple of {p.export.width_multiple}",
        f"  bandwidth {c.bandwidth_gbps:g} GB/s{est('latency.bandwidth_gbps')}; compute "
        + ", ".join(f"{k} {v:g} GOPS{est('latency.compute_gops.' + k)}" for k, v in c.compute_gops.items()),
        f"  overheads: {c.layer_overhead_ms:g} ms/layer + {c.token_overhead_ms:g} ms/token (decode), "
        f"{c.prefill_layer_token_overhead_ms:g} ms/layer/prompt token + {c.prefill_overhead_ms:g} ms (prefill)",
        f"  memory budget {p.memory.budget / 1e9:g} GB at {p.memory.context}-token context "
        f"(runtime overhead {p.memory.runtime_overhead / 1e6:g} MB)",
    ]
    tparts = []
    if t.decode_tok_s_min:
        tparts.append(f"decode >= {t.decode_tok_s_min:g} tok/s")
    if t.ttft_max_s:
        tparts.append(f"TTFT <= {t.ttft_max_s:g} s for a {t.prompt_tokens}-token prompt")
    tparts.append(f"memory <= {p.memory_limit / 1e6:g} MB")
    lines.append("  targets: " + ", ".join(tparts))
    if p.provenance.calibrated:
        lines.append(f"  {p.provenance.calibrated}")
    return "\n".join(lines)


__all__ = [
    "Hardware", "MemorySpec", "Targets", "ExportSpec", "Provenance", "Profile", "list_profiles", "load_profile",
    "loads_profile", "parse_profile", "profile_to_dict", "profile_to_toml", "write_profile", "builtin_profile_text",
    "describe_profile", "parse_bytes", "parse_seconds", "parse_ms", "parse_gbps", "parse_gops", "dumps_toml",
]
