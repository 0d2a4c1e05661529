"""The Llama family: pre-norm RMSNorm blocks, rotary attention with GQA, SwiGLU FFN, optional
biases, tied or untied embeddings, Llama 3.x rope scaling (written as GGUF `rope_freqs`).
Per-layer FFN widths and head counts go to GGUF as llama.cpp's `deci` architecture (it builds each
layer at its own shape; the `llama` graph builds every layer from layer 0's values); uniform
shapes stay `llama`."""

from edgeprune.families import Family

LLAMA = Family(
    name="llama",
    model_types=("llama",),
    gguf_archs=("llama",),
    uniform_arch="llama",
    per_layer_arch="deci",
    examples="Llama, Llama 3.x, SmolLM2, TinyLlama",
)
