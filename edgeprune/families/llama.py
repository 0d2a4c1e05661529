"""The Llama family: pre-norm RMSNorm blocks, rotary attention with GQA, SwiGLU FFN, optional
attention biases (as Qwen2 has), tied or untied embeddings. Per-layer FFN widths and head counts
go to GGUF as llama.cpp's `deci` architecture (it builds each layer at its own shape; the `llama`
graph builds every layer from layer 0's values); uniform shapes stay `llama`."""

from edgeprune.families import Family

LLAMA = Family(
    name="llama",
    model_types=("llama",),
    gguf_archs=("llama",),
    linears={
        "attn_q": ("self_attn", "q_proj"), "attn_k": ("self_attn", "k_proj"), "attn_v": ("self_attn", "v_proj"),
        "attn_output": ("self_attn", "o_proj"),
        "ffn_gate": ("mlp", "gate_proj"), "ffn_up": ("mlp", "up_proj"), "ffn_down": ("mlp", "down_proj"),
    },
    norms={"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"},
    uniform_arch="llama",
    per_layer_arch="deci",
    examples="Llama-family decoders: Llama, SmolLM2, TinyLlama, ...",
)
