"""The one dtype vocabulary: every weight type a user can name, and how each is stored.

Two layers of names:

* **storage types** (`STORAGE`): what one tensor is stored as -- a ggml type in a GGUF
  (`q4_k`, `q5_0`, ...) or an onnxruntime MatMulNBits setting (`int4`, `int8`). Each has a block
  size (a row -- the weight's input dimension -- must be a whole number of blocks) and a size per
  block, so bits per weight follow; K-quants and IQ types have llama.cpp's fallback for rows that
  do not divide (src/llama-quant.cpp `tensor_type_fallback`; F16 when even that does not divide).
* **export dtypes** (`EXPORT_DTYPES`): what a user types after `--dtype`, per format. A GGUF dtype
  is a llama.cpp file type (`LLAMA_FTYPE_*`): a *mix* in which llama.cpp's quantizer picks each
  tensor's storage type by role and layer (`mix.py` says which; the exporter reports what was
  really written). An ONNX dtype is one MatMulNBits setting for every linear weight.

A dtype named for the wrong format is an error (exit 2), never a silent substitution:
`--format gguf --dtype int4` says to use q4_0 (or another 4-bit GGUF type) instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeprune.errors import EdgepruneError

FORMATS = ("gguf", "onnx")
BACKENDS = ("llama.cpp", "onnxruntime")
BACKEND_FORMAT = {"llama.cpp": "gguf", "onnxruntime": "onnx"}
FORMAT_BACKEND = {v: k for k, v in BACKEND_FORMAT.items()}


@dataclass(frozen=True)
class Storage:
    """One tensor storage type. `block_bytes` per `block` weights, scales included."""

    name: str
    block: int
    block_bytes: int
    fallback: str | None = None  # llama.cpp's type when a row is not a multiple of `block`

    @property
    def bytes_per_weight(self) -> float:
        return self.block_bytes / self.block

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.block_bytes / self.block


# Block layouts are ggml's (ggml-common.h) and onnxruntime's MatMulNBits (symmetric, f32 scale).
STORAGE = {s.name: s for s in (
    Storage("f32", 1, 4),
    Storage("f16", 1, 2),
    Storage("bf16", 1, 2),
    Storage("q8_0", 32, 34),
    Storage("q6_k", 256, 210, fallback="q8_0"),
    Storage("q5_1", 32, 24),
    Storage("q5_0", 32, 22),
    Storage("q5_k", 256, 176, fallback="q5_1"),
    Storage("q4_1", 32, 20),
    Storage("q4_0", 32, 18),
    Storage("q4_k", 256, 144, fallback="q5_0"),
    Storage("iq4_nl", 32, 18),
    Storage("iq4_xs", 256, 136, fallback="iq4_nl"),
    Storage("q3_k", 256, 110, fallback="q4_0"),  # the vendored llama.cpp's choice (not iq4_nl)
    Storage("q2_k", 256, 84, fallback="q4_0"),
    Storage("int8", 32, 36),  # MatMulNBits 8-bit, block 32: 32 B + f32 scale
    Storage("int4", 32, 20),  # MatMulNBits 4-bit, block 32: 16 B + f32 scale
    Storage("int4_b128", 128, 68),  # MatMulNBits 4-bit, block 128: 64 B + f32 scale
)}
KV_BYTES = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}  # KV-cache element types


def storage_for_row(name: str, row: int) -> str:
    """The storage type llama.cpp really writes for a tensor of `name` whose rows have `row` weights."""
    st = STORAGE[name]
    if row % st.block == 0 or name.startswith("int"):  # onnxruntime's MatMulNBits pads the last block
        return name
    if st.fallback is None:
        return "f16" if st.block > 1 else name
    fb = STORAGE[st.fallback]
    return fb.name if row % fb.block == 0 else "f16"


def tensor_bytes(storage: str, rows: int, row: int) -> float:
    """Bytes of a [rows, row] tensor stored as `storage` (after the row-length fallback)."""
    st = STORAGE[storage_for_row(storage, row)]
    return rows * -(-row // st.block) * st.block_bytes


@dataclass(frozen=True)
class ExportDtype:
    """A name a user types after --dtype."""

    name: str
    format: str  # "gguf" | "onnx"
    base: str  # storage type of most linear weights
    ftype: str  # GGUF: llama_cpp's LLAMA_FTYPE_* constant name; ONNX: ""
    counterpart: str  # the other format's dtype of about the same bits (fit exports both)
    summary: str

    @property
    def quantized(self) -> bool:
        return self.base not in ("f32", "f16", "bf16")


EXPORT_DTYPES = {d.name: d for d in (
    ExportDtype("f32", "gguf", "f32", "LLAMA_FTYPE_ALL_F32", "fp32", "32-bit floats (exact)"),
    ExportDtype("f16", "gguf", "f16", "LLAMA_FTYPE_MOSTLY_F16", "fp32", "16-bit floats"),
    ExportDtype("q8_0", "gguf", "q8_0", "LLAMA_FTYPE_MOSTLY_Q8_0", "int8", "8.5 bpw, blocks of 32"),
    ExportDtype("q6_k", "gguf", "q6_k", "LLAMA_FTYPE_MOSTLY_Q6_K", "int8", "6.56 bpw K-quant"),
    ExportDtype("q5_k_m", "gguf", "q5_k", "LLAMA_FTYPE_MOSTLY_Q5_K_M", "int8", "llama.cpp's Q5_K mix (Q6_K for sensitive tensors)"),
    ExportDtype("q5_1", "gguf", "q5_1", "LLAMA_FTYPE_MOSTLY_Q5_1", "int8", "6 bpw, blocks of 32 with offset"),
    ExportDtype("q5_0", "gguf", "q5_0", "LLAMA_FTYPE_MOSTLY_Q5_0", "int8", "5.5 bpw, blocks of 32"),
    ExportDtype("q4_k_m", "gguf", "q4_k", "LLAMA_FTYPE_MOSTLY_Q4_K_M", "int4", "llama.cpp's Q4_K mix (Q6_K for sensitive tensors)"),
    ExportDtype("q4_1", "gguf", "q4_1", "LLAMA_FTYPE_MOSTLY_Q4_1", "int4", "5 bpw, blocks of 32 with offset"),
    ExportDtype("q4_0", "gguf", "q4_0", "LLAMA_FTYPE_MOSTLY_Q4_0", "int4", "4.5 bpw, blocks of 32"),
    ExportDtype("iq4_nl", "gguf", "iq4_nl", "LLAMA_FTYPE_MOSTLY_IQ4_NL", "int4", "4.5 bpw, non-linear grid, blocks of 32"),
    ExportDtype("q3_k_m", "gguf", "q3_k", "LLAMA_FTYPE_MOSTLY_Q3_K_M", "int4", "llama.cpp's Q3_K mix"),
    ExportDtype("fp32", "onnx", "f32", "", "f32", "32-bit floats (exact)"),
    ExportDtype("int8", "onnx", "int8", "", "q8_0", "MatMulNBits 8-bit, block 32"),
    ExportDtype("int4", "onnx", "int4", "", "q4_0", "MatMulNBits 4-bit, block 32 (embedding too)"),
    ExportDtype("int4_b128", "onnx", "int4_b128", "", "q4_0", "MatMulNBits 4-bit, block 128 (embedding too): fewer scales"),
)}
GGUF_DTYPES = tuple(n for n, d in EXPORT_DTYPES.items() if d.format == "gguf")
ONNX_DTYPES = tuple(n for n, d in EXPORT_DTYPES.items() if d.format == "onnx")
FORMAT_DTYPES = {"gguf": GGUF_DTYPES, "onnx": ONNX_DTYPES}

# Other spellings users type. "f32" is both formats' name for full precision.
_ALIASES = {"float32": "f32", "float16": "f16", "fp16": "f16", "q8": "q8_0", "q4": "q4_0", "q4_k": "q4_k_m",
            "q5_k": "q5_k_m", "q3_k": "q3_k_m", "uint8": "int8", "qint8": "int8", "uint4": "int4"}


def _key(name: str) -> str:
    key = str(name).strip().lower().replace("-", "_")
    return _ALIASES.get(key, key)


def normalize(name: str, fmt: str | None = None) -> str:
    """'Q4_K_M' -> 'q4_k_m'. With `fmt`, the name that format uses ('f32' <-> 'fp32');
    a dtype of the other format is an EdgepruneError naming the nearest right choice."""
    key = _key(name)
    if fmt is None:
        if key in EXPORT_DTYPES:
            return key
        raise EdgepruneError(f"unknown dtype '{name}': use one of {', '.join(EXPORT_DTYPES)}")
    if fmt not in FORMATS:
        raise EdgepruneError(f"unknown format '{fmt}': use gguf or onnx")
    if key in ("f32", "fp32"):
        return "f32" if fmt == "gguf" else "fp32"
    d = EXPORT_DTYPES.get(key)
    if d is None:
        raise EdgepruneError(f"unknown {fmt} dtype '{name}': use one of {', '.join(FORMAT_DTYPES[fmt])}")
    if d.format != fmt:
        raise EdgepruneError(f"'{name}' is an {d.format} dtype, not a {fmt} one: for {fmt} use {d.counterpart} "
                             f"(or one of {', '.join(FORMAT_DTYPES[fmt])})")
    return key


def get(name: str, fmt: str | None = None) -> ExportDtype:
    return EXPORT_DTYPES[normalize(name, fmt)]


def for_format(name: str, fmt: str) -> str:
    """The dtype of `fmt` that stands for `name` (itself, or its counterpart): fit exports the
    profile's dtype in every format it writes."""
    d = get(name)
    return d.name if d.format == fmt else normalize(d.counterpart, fmt)


# A profile measures rates (prefill GOPS, decode GB/s) for the dtypes it was calibrated with; a
# dtype it lacks borrows the rate of the nearest measured kernel family, and the prediction says so.
RATE_LIKE = {"fp32": "f32", "q6_k": "q8_0", "q5_k_m": "q4_k_m", "q4_k_m": "q4_0", "q3_k_m": "q4_k_m",
             "q5_1": "q5_0", "q5_0": "q4_0", "q4_1": "q4_0", "iq4_nl": "q4_0", "int4_b128": "int4"}


def rate_keys(name: str) -> list[str]:
    """`name`, then the dtypes whose measured rate stands in for it, nearest first."""
    keys = [name]
    while keys[-1] in RATE_LIKE and RATE_LIKE[keys[-1]] not in keys:
        keys.append(RATE_LIKE[keys[-1]])
    return keys
