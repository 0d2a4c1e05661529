"""One export entry point for both formats, and the runtime that scores an artifact (fit, export, benchmarks)."""

from __future__ import annotations

from pathlib import Path

from edgeprune import mix
from edgeprune.exporters.gguf import export_gguf
from edgeprune.exporters.llamacpp import llamacpp_logits_fn
from edgeprune.exporters.onnx import export_onnx, ort_logits_fn


def export_artifact(model, tokenizer, fmt: str, dtype: str, out: Path, verify: bool = True, imatrix=None, head=None) -> dict:
    if fmt == "gguf":
        return export_gguf(model, tokenizer, out, dtype=dtype, verify=verify, imatrix=imatrix, overrides=mix.output_override(head))
    return export_onnx(model, tokenizer, out, dtype=dtype, verify=verify)


def runtime_logits_fn(fmt: str, path: Path, n_ctx: int, n_threads: int | None = None):
    """int tokens [T] -> float32 logits [T, vocab] through the artifact's runtime (llama.cpp keeps
    `n_ctx` tokens of context; onnxruntime's graph takes any length)."""
    if fmt == "gguf":
        return llamacpp_logits_fn(path, n_ctx=n_ctx, n_threads=n_threads)
    return ort_logits_fn(path)
