"""Per-layer shapes of a (possibly pruned) decoder of any family (edgeprune.families), read from
and written to its modules.

A pruned model is a stock transformers model (LlamaForCausalLM, Qwen3ForCausalLM, ...) whose
`nn.Linear` modules have different sizes in different layers. The modules are the truth: exporters read shapes from them, and loaders
rebuild them from a list of `LayerShape` before loading weights (never `ignore_mismatched_sizes`).
"""

from __future__ import annotations

from torch import nn

from edgeprune.geometry import LayerShape, ModelGeometry
from edgeprune.hf_modeling import resize_layer  # noqa: F401  (one implementation, shared with checkpoints)


def layers(model) -> nn.ModuleList:
    return model.model.layers


def head_dim(model) -> int:
    cfg = model.config
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def layer_shape(layer, hd: int) -> LayerShape:
    attn, mlp = layer.self_attn, layer.mlp
    return LayerShape(
        n_heads=attn.q_proj.out_features // hd,
        n_kv_heads=attn.k_proj.out_features // hd,
        ffn=mlp.down_proj.in_features,
        ffn_bias=mlp.down_proj.bias is not None,
        attn_out_bias=attn.o_proj.bias is not None,
    )


def layer_shapes(model) -> list[LayerShape]:
    hd = head_dim(model)
    return [layer_shape(layer, hd) for layer in layers(model)]


def geometry(model, name: str = "") -> ModelGeometry:
    """The model's geometry as its modules say (what a loaded or pruned model really is)."""
    emb = model.model.embed_tokens
    lm_head = getattr(model, "lm_head", None)
    tied = lm_head is None or lm_head.weight is emb.weight or lm_head.weight.data_ptr() == emb.weight.data_ptr()
    first = layers(model)[0].self_attn.q_proj if len(layers(model)) else None
    return ModelGeometry(hidden=emb.embedding_dim, vocab=emb.num_embeddings, head_dim=head_dim(model),
                         layers=tuple(layer_shapes(model)), tied=bool(tied),
                         qkv_bias=bool(first is not None and first.bias is not None),
                         name=name or getattr(model.config, "_name_or_path", "") or "")


def keep_layers(model, keep: list[int]) -> None:
    """Drop every decoder layer not in `keep` (indices into the current list) and renumber."""
    kept = [layers(model)[i] for i in keep]
    model.model.layers = nn.ModuleList(kept)
    for new_idx, layer in enumerate(kept):
        layer.self_attn.layer_idx = new_idx
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new_idx
    model.config.num_hidden_layers = len(kept)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]


def param_counts(model) -> dict[str, int]:
    """Parameters by part. The embedding and lm_head are counted apart: pruning never shrinks them."""
    emb = model.model.embed_tokens.weight.numel()
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    head = 0 if tied else model.lm_head.weight.numel()
    attn = ffn = norms = 0
    for layer in layers(model):
        attn += sum(p.numel() for p in layer.self_attn.parameters())
        ffn += sum(p.numel() for p in layer.mlp.parameters())
        norms += sum(p.numel() for n, p in layer.named_parameters() if "norm" in n)
    norms += model.model.norm.weight.numel()
    return {
        "embedding": emb,
        "lm_head_untied": head,
        "attention": attn,
        "ffn": ffn,
        "norms": norms,
        "linear": attn + ffn,
        "total": emb + head + attn + ffn + norms,
    }
