"""Device profiles (TOML), shipped inside the wheel, and the code that reads and writes them.

This package is `edgeprune.profiles` (pyproject maps the repository's `profiles/` here), so the
loader lives beside the data: `from edgeprune.profiles import load_profile, list_profiles`.

A profile has six tables. Plain numbers are in the unit the key documents; strings may carry
their own unit ("300MB", "2.5GB", "1.5GiB", "8s", "500ms", "8.7GB/s", "150GOPS").

    name = "raspberrypi5"                 # optional; defaults to the file name
    extends = "raspberrypi5"              # optional: a shipped profile or a .toml path to start from
    [hardware]    description, threads, ram (bytes), accelerator?, isa?, notes?
    [latency]     backend ("llama.cpp" | "onnxruntime"), bandwidth_gbps (GB/s = 1e9 B/s),
                  layer_overhead_ms, token_overhead_ms (decode, per layer / per token),
                  prefill_layer_token_overhead_ms (per layer per prompt token), prefill_overhead_ms
                  (per prefill call), kv_dtype?, prefill_logits? ("last" | "all"), version?
    [latency.compute_gops]  dtype = effective prefill GOPS (1e9 ops/s), one per exported dtype
    [latency.dtype_bandwidth_gbps]  optional: dtype = decode GB/s where it differs from bandwidth_gbps
    [memory]      budget (bytes: weights + KV cache at `context` + runtime buffers), context
                  (tokens), runtime_overhead (bytes)
    [targets]     decode_tok_s_min, ttft_max_s (seconds, for a prompt of prompt_tokens),
                  prompt_tokens, memory_max (bytes; the memory limit is min(memory_max, budget))
    [export]      format ("gguf" | "onnx"), dtypes (allowed, most preferred first; names from
                  edgeprune.dtypes for that format), width_multiple (pruned widths are multiples of it)
    [provenance]  sources, estimates (dotted keys whose values are estimates), notes, calibrated

The code: units.py parses values, schema.py validates a profile, io.py finds, reads (resolving
`extends`) and writes them.
"""

from edgeprune.dtypes import FORMAT_DTYPES

from .io import (builtin_profile_text, describe_profile, dumps_toml, list_profiles, load_profile, loads_profile,
                 merge_tables, profile_to_toml, save_profile, write_profile)
from .schema import (SCHEMA_VERSION, ExportSpec, Hardware, MemorySpec, Profile, Provenance, Targets, parse_dtype,
                     parse_profile, profile_to_dict)
from .units import parse_bytes, parse_gbps, parse_gops, parse_ms, parse_seconds

__all__ = [
    "Hardware", "MemorySpec", "Targets", "ExportSpec", "Provenance", "Profile", "SCHEMA_VERSION", "FORMAT_DTYPES",
    "list_profiles", "load_profile", "loads_profile", "parse_profile", "parse_dtype", "profile_to_dict",
    "profile_to_toml", "save_profile", "write_profile", "builtin_profile_text", "describe_profile", "merge_tables",
    "parse_bytes", "parse_seconds", "parse_ms", "parse_gbps", "parse_gops", "dumps_toml",
]
