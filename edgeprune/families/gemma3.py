"""Gemma 3 (text): four RMSNorms per block (before and after attention, before and after the FFN),
each scaling by (1 + w); per-head q/k RMSNorm; GeGLU (tanh GELU gate); embeddings times sqrt(d);
sliding-window layers (rotary base `rope_local_base_freq`) between global ones (`rope_theta`),
as config.layer_types lists them. llama.cpp's `gemma3` graph has all of it, reads the window
pattern per layer from GGUF (so dropped layers keep their kind) but builds every layer from layer
0's shape and reads no o/FFN biases: a Gemma 3 GGUF needs uniform widths and head counts."""

from edgeprune.families import QKV_BIASES, Family

GEMMA3 = Family(
    name="gemma3",
    model_types=("gemma3_text",),
    gguf_archs=("gemma3",),
    uniform_arch="gemma3",
    per_layer_arch=None,
    norms={"attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
           "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"},
    uniform_biases=QKV_BIASES,
    qk_norm=True,
    norm_offset=1.0,
    activation="gelu_tanh",
    embed_scale=True,
    sliding_layers=True,
    examples="Gemma 3 (text)",
)
