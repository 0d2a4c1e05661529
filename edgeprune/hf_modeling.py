"""Per-layer decoders (Llama, Mistral, Qwen2, Qwen3, Gemma 3) for plain transformers users (they opt in with transformers' trust_remote_code flag; edgeprune itself never does).

edgeprune copies this file into every pruned checkpoint as `modeling_edgeprune.py` and points
config.json's `auto_map` at it, so

    AutoModelForCausalLM.from_pretrained(pruned_dir, trust_remote_code=...)   # the user opts in

builds each layer at its pruned shape before the weights load (no `ignore_mismatched_sizes`).
It imports nothing from edgeprune on purpose: the checkpoint must work without edgeprune.
config.json carries `edgeprune_layer_shapes`: one {n_heads, n_kv_heads, ffn, ffn_bias,
attn_out_bias} per kept layer.
"""

from torch import nn
from transformers import Gemma3ForCausalLM, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM


def _linear(n_in, n_out, bias, like):
    return nn.Linear(n_in, n_out, bias=bias, device=like.weight.device, dtype=like.weight.dtype)


def resize_layer(layer, shape, head_dim):
    """Replace a decoder layer's linear modules by empty ones of `shape` (weights load afterwards)."""
    get = shape.get if isinstance(shape, dict) else lambda k, d=None: getattr(shape, k, d)
    n_heads, n_kv, ffn = get("n_heads"), get("n_kv_heads"), get("ffn")
    attn, mlp = layer.self_attn, layer.mlp
    d = attn.q_proj.in_features
    qkv_bias = attn.q_proj.bias is not None
    attn.q_proj = _linear(d, n_heads * head_dim, qkv_bias, attn.q_proj)
    attn.k_proj = _linear(d, n_kv * head_dim, qkv_bias, attn.k_proj)
    attn.v_proj = _linear(d, n_kv * head_dim, qkv_bias, attn.v_proj)
    attn.o_proj = _linear(n_heads * head_dim, d, bool(get("attn_out_bias", False)), attn.o_proj)
    attn.num_key_value_groups = n_heads // n_kv
    mlp_bias = mlp.gate_proj.bias is not None
    mlp.gate_proj = _linear(d, ffn, mlp_bias, mlp.gate_proj)
    mlp.up_proj = _linear(d, ffn, mlp_bias, mlp.up_proj)
    mlp.down_proj = _linear(ffn, d, bool(get("ffn_bias", False)) or mlp_bias, mlp.down_proj)
    mlp.intermediate_size = ffn


def per_layer(base):
    """`base` (a transformers *ForCausalLM) whose layers are resized to config.edgeprune_layer_shapes."""

    class PerLayer(base):
        def __init__(self, config):
            super().__init__(config)
            shapes = getattr(config, "edgeprune_layer_shapes", None) or []
            if shapes and len(shapes) != len(self.model.layers):
                raise ValueError(f"config has {len(shapes)} layer shapes for {len(self.model.layers)} layers")
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            for layer, shape in zip(self.model.layers, shapes):
                resize_layer(layer, shape, head_dim)

    PerLayer.__name__ = PerLayer.__qualname__ = "Edgeprune" + base.__name__
    return PerLayer


# config.json's auto_map names one of these (checkpoint.save_pruned).
EdgepruneLlamaForCausalLM = per_layer(LlamaForCausalLM)
EdgepruneMistralForCausalLM = per_layer(MistralForCausalLM)
EdgepruneQwen2ForCausalLM = per_layer(Qwen2ForCausalLM)
EdgepruneQwen3ForCausalLM = per_layer(Qwen3ForCausalLM)
EdgepruneGemma3ForCausalLM = per_layer(Gemma3ForCausalLM)
