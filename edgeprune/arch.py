"""Per-layer shapes of a (possibly pruned) Llama-family model, read from and written to its modules.

A pruned model is a stock `LlamaForCausalLM` whose `nn.Linear` modules have different sizes in
different layers. The modules are the truth: exporters read shapes from them, and loaders
rebuild them from a list of `LayerShape` before loading weights (never `ignore_mismatched_sizes`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from edgeprune.hf_modeling import resize_layer  # noqa: F401  (one implementation, shared with checkpoints)


@dataclass(frozen=True)
class LayerShape:
    n_heads: int
    n_kv_heads: int
    ffn: int
    ffn_bias: bool = False  # bias on down_proj (FLAP compensation / mask folding)
    attn_out_bias: bool = False  # bias on o_proj (FLAP compensation for pruned heads)

    def to_dict(self) -> dict:
        return asdict(self)


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


def is_uniform(model) -> bool:
    """True when every layer has the dense config's shape (no per-layer arrays needed)."""
    cfg = model.config
    return all(
        s.n_heads == cfg.num_attention_heads
        and s.n_kv_heads == cfg.num_key_value_heads
        and s.ffn == cfg.intermediate_size
        for s in layer_shapes(model)
    )


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


@torch.no_grad()
def state_fingerprint(model) -> str:
    """sha256 over every tensor in the state dict, in name order: identifies a model's weights."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()
