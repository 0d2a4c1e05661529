"""Qwen2 / Qwen2.5: the Llama block with q/k/v biases and NEOX-style RoPE (llama.cpp's `qwen2`
graph rotates halves, as HF does, so Q/K rows are written unpermuted). `qwen2` reads only the
q/k/v biases, builds every layer from layer 0's shape and sizes q/o as hidden x hidden; per-layer
shapes, pruned heads and FLAP's o/down biases go to `deci`, which reads every bias and rotates adjacent pairs (rows permuted)."""

from edgeprune.families import QKV_BIASES, Family

QWEN2 = Family(
    name="qwen2",
    model_types=("qwen2",),
    gguf_archs=("qwen2",),
    uniform_arch="qwen2",
    per_layer_arch="deci",
    uniform_biases=QKV_BIASES,
    uniform_full_heads=True,
    examples="Qwen2, Qwen2.5",
)
