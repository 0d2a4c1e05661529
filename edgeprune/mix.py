"""Which storage type llama.cpp's quantizer writes for each tensor of a GGUF dtype (a "mix").

A GGUF dtype is a llama.cpp file type: most linear weights get its base type, but the quantizer
(src/llama-quant.cpp, `llama_tensor_get_type`, in the llama.cpp that llama-cpp-python 0.3.36
vendors) gives some tensors more bits by role and layer, then falls back to another type where a
row does not split into whole blocks. This module restates those rules for the dtypes of the menu
(`edgeprune.dtypes.GGUF_DTYPES`) so that sizes and latencies can be predicted without exporting;
tests/test_quantize.py checks every prediction against the types llama.cpp really writes.

The rules, per file type (layer counts are the GGUF block count n; "more-bits layers" are
i < n/8, i >= 7n/8, and every third layer in between):

* output projection -- `output.weight`, or `token_embd.weight` when the embedding is tied: Q8_0
  when the base type's block does not divide its rows, else Q6_K (Q8_0 for q8_0 itself);
  an untied `token_embd` keeps the base type.
* q4_k_m, q5_k_m: attn_v (counted over the layers that have one) and ffn_down of more-bits
  layers get Q6_K.
* q3_k_m: the first two attn_v get Q5_K, the rest Q4_K; ffn_down gets Q5_K for i < n/16 and
  Q4_K elsewhere; attn_output gets Q4_K.
* iq4_nl: attn_v gets Q5_K when layer 0 has at least 4 query heads per KV head; without an
  importance matrix, ffn_down of layers i < n/8 gets Q5_K.
* q4_0, q5_0 with an importance matrix: ffn_down of layers i < n/8 gets Q4_1 / Q5_1.
* an override (the first matching pattern) replaces the rule for its tensor -- and then the
  quantizer's attn_v / ffn_down counters do not advance for it, which shifts the layers the
  rules above see for the later tensors.
* finally the row-length fallback (`dtypes.storage_for_row`): Q4_K -> Q5_0, Q5_K -> Q5_1,
  Q6_K -> Q8_0, Q3_K -> Q4_0, and F16 when even a block of 32 does not divide the row.

f32 and f16 are written by the exporter directly: every 2-D weight takes that type.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from edgeprune import dtypes
from edgeprune.errors import EdgepruneError

ROLES = ("token_embd", "output", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
# Storage types a GGUF tensor can take (the rest of dtypes.STORAGE are onnxruntime settings).
GGUF_STORAGE = tuple(n for n in dtypes.STORAGE if not n.startswith("int"))
OVERRIDE_ALIASES = ("output", "token_embd")

_NAME = re.compile(r"^(?:blk\.(\d+)\.)?(\w+)\.weight$")


def tensor_name(role: str, layer: int | None) -> str:
    """GGUF name of a 2-D weight: ("attn_q", 3) -> "blk.3.attn_q.weight", ("output", None) -> "output.weight"."""
    return f"{role}.weight" if layer is None else f"blk.{layer}.{role}.weight"


def _role_layer(name_or_role: str, layer: int | None) -> tuple[str, int | None]:
    m = _NAME.match(name_or_role)
    role, layer = (m.group(2), int(m.group(1)) if m.group(1) is not None else None) if m else (name_or_role, layer)
    if role not in ROLES:
        raise EdgepruneError(f"unknown tensor role '{name_or_role}': use one of {', '.join(ROLES)} (or a GGUF tensor name)")
    if (layer is None) != (role in ("token_embd", "output")):
        raise EdgepruneError(f"tensor '{name_or_role}' needs a layer index" if layer is None else f"'{role}' has no layer index")
    return role, layer


def storage_name(name: str) -> str:
    """A GGUF storage type as typed by a user ('Q8_0' -> 'q8_0'), or an EdgepruneError."""
    key = str(name).strip().lower()
    if key not in GGUF_STORAGE:
        raise EdgepruneError(f"unknown GGUF tensor type '{name}': use one of {', '.join(GGUF_STORAGE)}")
    return key


def output_override(storage: str | None) -> dict | None:
    """The overrides that store the output projection (the tied embedding) as `storage`; None: llama.cpp's rule."""
    return {"output": storage} if storage else None


def override_patterns(overrides: dict | None, tied: bool) -> list[tuple[str, str]]:
    """User overrides -> [(regex, storage)] in the user's order, as llama.cpp's `tt_overrides` take them.

    Keys: "output" (the output projection: token_embd.weight when tied), "token_embd", an exact
    tensor name such as "blk.0.ffn_down.weight", or any other regex searched in tensor names
    (e.g. r"blk\\.0\\.ffn_down"). Exact names and aliases become anchored patterns.
    """
    patterns = []
    for key, storage in (overrides or {}).items():
        key = str(key)
        if key in OVERRIDE_ALIASES:
            name = "token_embd.weight" if key == "output" and tied else f"{key}.weight"
            pattern = "^" + re.escape(name) + "$"
        elif re.fullmatch(r"[\w.]+\.weight", key):
            pattern = "^" + re.escape(key) + "$"
        else:
            pattern = key
        try:
            re.compile(pattern)
        except re.error as exc:
            raise EdgepruneError(f"override pattern '{key}' is not a valid regex: {exc}") from None
        patterns.append((pattern, storage_name(storage)))
    return patterns


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_types(
    dtype: str,
    tensors: Iterable[tuple],
    tied: bool,
    overrides: dict | None = None,
    imatrix: bool = False,
    n_layers: int | None = None,
    n_gqa: int | None = None,
) -> dict[str, str]:
    """{GGUF tensor name: storage type} that llama.cpp writes for these 2-D weights.

    tensors: (name or role, layer, rows, row length) per weight -- a GGUF name ("blk.3.ffn_down.weight",
      layer then ignored) or a role of ROLES with its layer (None for token_embd/output); rows is
      the output dimension, row length the input dimension (what must split into blocks).
    tied: the output projection is the embedding (no output.weight in the file).
    imatrix: whether an importance matrix is given (it changes the q4_0/q5_0/iq4_nl rules).
    n_layers: the GGUF block count (default: the highest layer index + 1).
    n_gqa: layer 0's query heads per KV head (default: layer 0's attn_q rows // attn_v rows).
    """
    d = dtypes.get(dtype, "gguf")
    items = sorted((_role_layer(str(t[0]), t[1]) + (int(t[2]), int(t[3])) for t in tensors),
                   key=lambda t: -1 if t[1] is None else t[1])  # llama.cpp walks layer by layer
    names = [tensor_name(role, layer) for role, layer, _, _ in items]
    if not d.quantized:
        return {name: d.base for name in names}
    layers = [layer for _, layer, _, _ in items if layer is not None]
    n = n_layers if n_layers is not None else (max(layers) + 1 if layers else 0)
    if n_gqa is None:
        first = {role: rows for role, layer, rows, _ in items if layer == min(layers, default=0)}
        n_gqa = first["attn_q"] // first["attn_v"] if first.get("attn_v") else 1
    patterns = [(re.compile(p), s) for p, s in override_patterns(overrides, tied)]
    n_attn_v = sum(role == "attn_v" for role, *_ in items)
    i_attn_v = i_ffn_down = 0
    out = {}
    for name, (role, layer, rows, row) in zip(names, items):
        storage = next((s for p, s in patterns if p.search(name)), None)
        if storage is None:  # no override: the file type's rule
            storage = d.base
            if role == "output" or (tied and role == "token_embd"):
                if row % dtypes.STORAGE[d.base].block:
                    storage = "q8_0"
                elif d.base != "q8_0":
                    storage = "q6_k"
            elif role == "attn_v":
                if dtype == "q3_k_m":
                    storage = "q5_k" if i_attn_v < 2 else "q4_k"
                elif dtype == "iq4_nl" and n_gqa >= 4:
                    storage = "q5_k"
                elif dtype in ("q4_k_m", "q5_k_m") and _use_more_bits(i_attn_v, n_attn_v):
                    storage = "q6_k"
                i_attn_v += 1
            elif role == "ffn_down":
                i = i_ffn_down  # llama.cpp counts ffn_down tensors, which is the layer index unless overrides skip some
                if dtype == "q3_k_m":
                    storage = "q5_k" if i < n // 16 else "q4_k"
                elif dtype in ("q4_k_m", "q5_k_m") and _use_more_bits(i, n):
                    storage = "q6_k"
                elif dtype == "iq4_nl" and i < n // 8 and not imatrix:
                    storage = "q5_k"
                elif dtype in ("q4_0", "q5_0") and imatrix and i < n // 8:
                    storage = "q4_1" if dtype == "q4_0" else "q5_1"
                i_ffn_down += 1
            elif role == "attn_output" and dtype == "q3_k_m":
                storage = "q4_k"
        out[name] = dtypes.storage_for_row(storage, row)
    return out


def mix_bytes(
    dtype: str,
    tensors: Iterable[tuple],
    tied: bool,
    overrides: dict | None = None,
    imatrix: bool = False,
    n_layers: int | None = None,
    n_gqa: int | None = None,
) -> int:
    """Bytes of these 2-D weights as llama.cpp's quantizer writes them for `dtype`.

    Same arguments as `tensor_types`: tensors are the geometry's weights as (name or role, layer,
    rows, row length) tuples, e.g. ("ffn_down", 3, hidden, ffn_width_of_layer_3) or
    ("token_embd", None, vocab, hidden). Each tensor counts rows * row / block * block_bytes of its
    storage type (ggml's exact layout); norms, biases and file metadata are not included.
    """
    tensors = list(tensors)
    types = tensor_types(dtype, tensors, tied, overrides, imatrix, n_layers, n_gqa)
    total = 0
    for t in tensors:
        role, layer = _role_layer(str(t[0]), t[1])
        st = dtypes.STORAGE[types[tensor_name(role, layer)]]
        total += int(t[2]) * (int(t[3]) // st.block) * st.block_bytes
    return total
