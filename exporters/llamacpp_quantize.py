"""llama.cpp's own quantizer: an F32 GGUF -> any quantized GGUF dtype of the menu.

`llama_model_quantize` picks each tensor's storage type from the file type (`LLAMA_FTYPE_*`), the
tensor's role and layer, per-tensor overrides (`tt_overrides`, regex -> ggml type, first match
wins) and the row-length fallbacks; with an importance matrix (`imatrix`, per-column mean squared
input activation of each weight) it weighs every column's rounding error by how strongly that
column is driven. What was written is read back from the file (`read_tensor_types`).
"""

from __future__ import annotations

import ctypes

import gguf
import numpy as np

from edgeprune import dtypes
from edgeprune.errors import EdgepruneError
from edgeprune.exporters.llamacpp import llamacpp_log, resolve_threads
from edgeprune.mix import override_patterns


def ggml_type_id(storage: str) -> int:
    """ggml's enum value of a storage type name ('q8_0' -> 8); gguf-py's numbering is ggml's."""
    return int(gguf.GGMLQuantizationType[storage.upper()])


def quantize_gguf(src, dst, dtype: str, imatrix: dict | None = None, overrides: dict | None = None,
                  tied: bool = True, n_threads: int | None = None) -> None:
    """Quantize the F32 GGUF `src` into `dst` as `dtype` with llama.cpp.

    imatrix: {GGUF tensor name: float32 [row length]} mean squared activations (entries for tensors
      the file does not have are ignored by llama.cpp).
    overrides: see `edgeprune.mix.override_patterns`; `tied` says what "output" names.
    """
    try:
        import llama_cpp
    except ImportError:
        raise EdgepruneError(f"{dtype} needs llama.cpp's quantizer: pip install llama-cpp-python") from None
    d = dtypes.get(dtype, "gguf")
    if not d.quantized:
        raise EdgepruneError(f"{dtype} is not a quantized GGUF dtype: the exporter writes it directly")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, d.ftype)
    params.nthread = resolve_threads(n_threads)
    keep = []  # the arrays and strings the C structs point into must outlive the call
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()  # zeroed: the last one ends the list
        for entry, (name, values) in zip(entries, imatrix.items()):
            arr = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
            keep.append(arr)
            entry.name = name.encode()
            entry.data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entry.size = arr.size
        keep.append(entries)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    patterns = override_patterns(overrides, tied)
    if patterns:
        table = (llama_cpp.llama_model_tensor_override * (len(patterns) + 1))()  # null pattern ends it
        for entry, (pattern, storage) in zip(table, patterns):
            entry.pattern = pattern.encode()
            entry.type = ggml_type_id(storage)
        keep.append(table)
        params.tt_overrides = ctypes.cast(table, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    with llamacpp_log() as log:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        reason = next((ln for ln in reversed(log) if "failed to quantize" in ln), None) or next((ln for ln in reversed(log) if ln), f"error {rc}")
        raise EdgepruneError(f"llama.cpp could not quantize to {dtype}: {reason}")


def read_tensor_types(path) -> dict[str, tuple[str, int]]:
    """{tensor name: (storage type, bytes)} as stored in a GGUF file."""
    reader = gguf.GGUFReader(str(path))
    return {t.name: (gguf.GGMLQuantizationType(t.tensor_type).name.lower(), int(t.n_bytes)) for t in reader.tensors}
