"""What a profile is: its dataclasses, the table -> key -> parser schema, and the validator.

`parse_profile` turns the dict read from TOML (after `extends` is resolved, see io.py) into a
`Profile`; `profile_to_dict` is its inverse. Every mistake is an `EdgepruneError` (exit code 2)
on one line that names the file, the table and the key, and says how to fix it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from edgeprune import dtypes
from edgeprune.errors import EdgepruneError
from edgeprune.latency import LatencyConstants

from .units import (ValueProblem, choice, parse_bytes, parse_gbps, parse_gops, parse_ms, parse_seconds,
                    positive_int, positive_number, string, strings)

SCHEMA_VERSION = 1

MAX_CONTEXT = 1 << 24  # 16M tokens: far past any released model's context; 1e17 is a typo, not a board


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


def parse_dtype(value: Any, fmt: str) -> str:
    """A dtype name of format `fmt`, normalized ('Q4_0' -> 'q4_0'); one of the other format is an
    error naming the right choice."""
    name = string(value)
    try:
        return dtypes.normalize(name, fmt)
    except EdgepruneError:
        pass
    menu = dtypes.FORMAT_DTYPES[fmt]
    try:
        other = dtypes.get(name)
    except EdgepruneError:
        close = difflib.get_close_matches(name.strip().lower(), menu, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueProblem(f"unknown dtype '{name}'{hint}; {fmt} dtypes are {', '.join(menu)}") from None
    right = dtypes.for_format(other.name, fmt)
    raise ValueProblem(f"'{name}' is an {other.format} dtype, which cannot be exported as {fmt}: use '{right}' "
                       f"(the {fmt} dtype of about the same bits; {fmt} dtypes are {', '.join(menu)})")


# --------------------------------------------------------------------------------------------
# Schema: table -> key -> (parser, required). Tables keyed by dtype and the dtype list have no
# parser here: they need [export] format first (see parse_profile).

_SCHEMA: dict[str, dict[str, tuple[Any, bool]]] = {
    "hardware": {
        "description": (string, True),
        "threads": (positive_int, True),
        "ram": (parse_bytes, True),
        "accelerator": (string, False),
        "isa": (strings, False),
        "notes": (string, False),
    },
    "latency": {
        "backend": (choice(dtypes.BACKENDS), True),
        "bandwidth_gbps": (parse_gbps, True),
        "compute_gops": (None, True),
        "dtype_bandwidth_gbps": (None, False),
        "layer_overhead_ms": (parse_ms, False),
        "token_overhead_ms": (parse_ms, False),
        "prefill_layer_token_overhead_ms": (parse_ms, False),
        "prefill_overhead_ms": (parse_ms, False),
        "kv_dtype": (choice(dtypes.KV_BYTES), False),
        "prefill_logits": (choice(("last", "all")), False),
        "version": (string, False),
    },
    "memory": {
        "budget": (parse_bytes, True),
        "context": (positive_int, True),
        "runtime_overhead": (lambda v: parse_bytes(v) if v else 0, False),
    },
    "targets": {
        "decode_tok_s_min": (positive_number, False),
        "ttft_max_s": (parse_seconds, False),
        "prompt_tokens": (positive_int, False),
        "memory_max": (parse_bytes, False),
    },
    "export": {
        "format": (choice(dtypes.FORMATS), True),
        "dtypes": (None, True),
        "width_multiple": (positive_int, False),
    },
    "provenance": {
        "sources": (strings, False),
        "estimates": (strings, False),
        "notes": (string, False),
        "calibrated": (string, False),
    },
}
_REQUIRED_TABLES = ("hardware", "latency", "memory", "targets", "export")
_TOP_KEYS = ("name", "schema")


def _suggest(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else f"; allowed: {', '.join(options)}"


class _Validator:
    """Parses the tables of one profile; every failure names `where`."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, msg: str) -> EdgepruneError:
        return EdgepruneError(f"profile {self.where}: {msg}")

    def table(self, data: dict, name: str) -> dict:
        raw = data.get(name)
        if raw is None:
            if name in _REQUIRED_TABLES:
                raise self.fail(f"missing table [{name}]; every profile needs "
                                f"{', '.join('[' + t + ']' for t in _REQUIRED_TABLES)} "
                                "(copy one from `edgeprune profiles show raspberrypi5`, or write extends = \"raspberrypi5\")")
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
            except ValueProblem as exc:
                raise self.fail(f"[{name}] {key}: {exc}") from None
        for key, (_, required) in schema.items():
            if required and key not in raw:
                raise self.fail(f"[{name}] missing required key '{key}'")
        return out

    def dtype_table(self, raw: Any, table: str, parse, fmt: str, example: str, required: bool = True) -> dict[str, float]:
        if raw is None and not required:
            return {}
        if not isinstance(raw, dict) or (required and not raw):
            raise self.fail(f"[latency.{table}] must be a table of dtype = value, e.g. {example}")
        out = {}
        for key, value in raw.items():
            try:
                out[parse_dtype(key, fmt)] = parse(value)
            except ValueProblem as exc:
                raise self.fail(f"[latency.{table}] {key}: {exc}") from None
        return out

    def dtypes(self, raw: Any, fmt: str) -> tuple[str, ...]:
        try:
            out = tuple(parse_dtype(n, fmt) for n in strings(raw))
        except ValueProblem as exc:
            raise self.fail(f"[export] dtypes: {exc}") from None
        if not out:
            raise self.fail("[export] dtypes is empty: list at least one, most preferred first, e.g. [\"q8_0\", \"q4_0\"]")
        if len(set(out)) != len(out):
            raise self.fail(f"[export] dtypes lists a dtype twice: {list(out)}")
        return out


def parse_profile(data: dict, where: str = "<memory>", default_name: str = "") -> Profile:
    """Validate a profile already read from TOML (a dict, `extends` resolved) and build a `Profile`."""
    v = _Validator(where)
    if not isinstance(data, dict):
        raise v.fail("not a TOML table")
    if "extends" in data:
        raise v.fail("extends is resolved when a profile is read: use load_profile/loads_profile, not parse_profile")
    for key in data:
        if key not in _SCHEMA and key not in _TOP_KEYS:
            raise v.fail(f"unknown top-level key or table '{key}'"
                         f"{_suggest(key, list(_SCHEMA) + list(_TOP_KEYS) + ['extends'])}")
    schema = data.get("schema", SCHEMA_VERSION)
    if schema != SCHEMA_VERSION:
        raise v.fail(f"schema = {schema!r} is not supported; this edgeprune reads schema = {SCHEMA_VERSION}")
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name.strip():
        raise v.fail("name must be a non-empty string")

    hw = v.table(data, "hardware")
    lat = v.table(data, "latency")
    mem = v.table(data, "memory")
    tg = v.table(data, "targets")
    ex = v.table(data, "export")
    pv = v.table(data, "provenance")

    backend, fmt = lat["backend"], ex["format"]
    if dtypes.BACKEND_FORMAT[backend] != fmt:
        raise v.fail(f"[export] format = '{fmt}' does not match [latency] backend = '{backend}' "
                     f"(that backend runs {dtypes.BACKEND_FORMAT[backend]} files)")
    compute = v.dtype_table(data["latency"].get("compute_gops"), "compute_gops", parse_gops, fmt, "q8_0 = 80")
    dtype_bw = v.dtype_table(data["latency"].get("dtype_bandwidth_gbps"), "dtype_bandwidth_gbps", parse_gbps, fmt,
                             "q4_0 = 8.4", required=False)
    export_dtypes = v.dtypes(data["export"].get("dtypes"), fmt)
    width = ex.get("width_multiple", 32)
    block = dtypes.STORAGE[dtypes.EXPORT_DTYPES[export_dtypes[0]].base].block
    if width % block:
        raise v.fail(f"[export] width_multiple = {width} with default dtype {export_dtypes[0]}: it stores blocks of "
                     f"{block} weights, so pruned widths must be multiples of {block} (llama.cpp falls back to "
                     f"bigger types otherwise); set width_multiple = {block}")
    if hw["threads"] > 1024:
        raise v.fail(f"[hardware] threads = {hw['threads']} is implausible")

    constants = LatencyConstants(
        backend=backend,
        bandwidth_gbps=lat["bandwidth_gbps"],
        compute_gops=compute,
        layer_overhead_ms=lat.get("layer_overhead_ms", 0.0),
        token_overhead_ms=lat.get("token_overhead_ms", 0.0),
        prefill_layer_token_overhead_ms=lat.get("prefill_layer_token_overhead_ms", 0.0),
        prefill_overhead_ms=lat.get("prefill_overhead_ms", 0.0),
        kv_dtype=lat.get("kv_dtype", "f16" if backend == "llama.cpp" else "f32"),
        prefill_logits=lat.get("prefill_logits", "last" if backend == "llama.cpp" else "all"),
        dtype_bandwidth_gbps=dtype_bw,
    )
    # Ask the latency model itself, so that any lookup rule it has for a missing rate counts.
    for d in export_dtypes:
        try:
            constants.compute_for(d)
        except EdgepruneError:
            raise v.fail(f"[latency.compute_gops] has no rate for exported dtype '{d}': add '{d} = <GOPS>' to "
                         "[latency.compute_gops] (or drop it from [export] dtypes)") from None
    memory = MemorySpec(budget=mem["budget"], context=mem["context"], runtime_overhead=mem.get("runtime_overhead", 0))
    if memory.context > MAX_CONTEXT:
        raise v.fail(f"[memory] context = {memory.context} tokens is beyond any model edgeprune loads (at most {MAX_CONTEXT})")
    if memory.runtime_overhead >= memory.budget:
        raise v.fail(f"[memory] runtime_overhead ({memory.runtime_overhead / 1e6:g} MB) leaves nothing of the budget "
                     f"({memory.budget / 1e6:g} MB)")
    if memory.budget > hw["ram"]:
        raise v.fail(f"[memory] budget ({memory.budget / 1e9:g} GB) exceeds [hardware] ram ({hw['ram'] / 1e9:g} GB)")
    targets = Targets(decode_tok_s_min=tg.get("decode_tok_s_min"), ttft_max_s=tg.get("ttft_max_s"),
                      prompt_tokens=tg.get("prompt_tokens", 512), memory_max=tg.get("memory_max"))
    if targets.prompt_tokens > memory.context:
        raise v.fail(f"[targets] prompt_tokens = {targets.prompt_tokens} exceeds [memory] context = {memory.context}")
    if targets.memory_max and targets.memory_max > memory.budget:
        raise v.fail(f"[targets] memory_max ({targets.memory_max / 1e6:g} MB) exceeds [memory] budget "
                     f"({memory.budget / 1e6:g} MB): lower it or raise the budget")
    provenance = Provenance(sources=pv.get("sources", ()), estimates=pv.get("estimates", ()),
                            notes=pv.get("notes", ""), calibrated=pv.get("calibrated", ""))
    profile = Profile(name=name.strip(), hardware=Hardware(**hw), latency=constants, memory=memory, targets=targets,
                      export=ExportSpec(format=fmt, dtypes=export_dtypes, width_multiple=width),
                      provenance=provenance, latency_version=lat.get("version", ""), source=where)
    known = set(_dotted_keys(profile_to_dict(profile)))
    for e in provenance.estimates:
        if e not in known and not any(k.startswith(e + ".") for k in known):
            close = difflib.get_close_matches(e, sorted(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise v.fail(f"[provenance] estimates names '{e}', which is not a key of this profile{hint}")
    return profile


def _dotted_keys(d: dict, prefix: str = ""):
    for k, val in d.items():
        key = f"{prefix}{k}"
        yield key
        if isinstance(val, dict):
            yield from _dotted_keys(val, key + ".")


def _fmt_bytes(n: int) -> str | int:
    """An exact, readable spelling of a byte count ('2.5GB', '1.5GiB') or the plain integer."""
    for unit, f in (("GB", 10**9), ("GiB", 2**30), ("MB", 10**6), ("MiB", 2**20)):
        if n >= f:
            s = f"{n / f:.6g}"
            if int(round(float(s) * f)) == n:
                return f"{s}{unit}"
    return int(n)


def profile_to_dict(profile: Profile, human_units: bool = False) -> dict:
    """Plain data in the profile's base units (bytes, seconds, ms, GB/s, GOPS), as written to TOML.

    human_units=True spells byte counts as '2.5GB'-style strings (what `save_profile` writes).
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
