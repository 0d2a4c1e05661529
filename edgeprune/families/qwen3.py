"""Qwen3: the Llama block plus a per-head RMSNorm on queries and keys before RoPE (NEOX style).
llama.cpp's `qwen3` graph builds every layer from layer 0's shape and `deci` has no q/k norms, so
a Qwen3 GGUF needs the same FFN width and head counts in every layer (ONNX holds any)."""

from edgeprune.families import QKV_BIASES, Family

QWEN3 = Family(
    name="qwen3",
    model_types=("qwen3",),
    gguf_archs=("qwen3",),
    uniform_arch="qwen3",
    per_layer_arch=None,
    uniform_biases=QKV_BIASES,
    qk_norm=True,
    examples="Qwen3",
)
