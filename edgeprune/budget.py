"""The pruning budget, solved in one place for every method.

`sparsity` p removes p x (dense FFN parameters) when target = "ffn" (the default), or
p x (dense attention + FFN parameters) when target = "linear". Dropped layers count towards that
budget: what the kept blocks may still hold is re-solved so the total parameter target still
holds. Embeddings and norms never count (pruning never shrinks them) and are reported apart.
Parameter units are read off the module shapes, never hard-coded.
"""

from __future__ import annotations

import math

import numpy as np

from edgeprune import arch
from edgeprune.calibrate import CalibrationStats
from edgeprune.errors import EdgepruneError
from edgeprune.plan import PrunePlan

TARGETS = ("ffn", "linear")


def validate_sparsity(sparsity: float) -> None:
    if not 0.0 < sparsity < 0.95:
        raise EdgepruneError(f"--sparsity must be in (0, 0.95), got {sparsity}")



def layers_to_drop(stats: CalibrationStats, k: int) -> list[int]:
    """The k blocks with the smallest Block Influence 1 - cos(h_in, h_out); block 0 always stays
    (llama.cpp derives the head size from layer 0, and it is never unimportant in practice)."""
    n = len(stats.blocks)
    if not 0 <= k < n - 1:
        raise EdgepruneError(f"--drop-layers must be between 0 and {n - 2} for a {n}-layer model, got {k}")
    order = sorted(range(1, n), key=lambda i: stats.blocks[i].one_minus_cos)
    return sorted(order[:k])



def kv_group_params(layer, head_dim: int) -> int:
    """Parameters one KV group carries, from the module shapes: q rows, k and v rows, o columns."""
    attn = layer.self_attn
    n_kv = attn.k_proj.out_features // head_dim
    total = sum(lin.weight.numel() for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
    return total // n_kv



def ffn_channel_params(layer) -> int:
    mlp = layer.mlp
    return (mlp.gate_proj.in_features + mlp.up_proj.in_features + mlp.down_proj.out_features)



def layer_linear(layer) -> int:
    return sum(p.numel() for p in layer.self_attn.parameters()) + sum(p.numel() for p in layer.mlp.parameters())



def solve(model, stats, sparsity, target, drop_layers):
    """(dropped, kept, parameters the kept layers' attention+FFN may still hold)."""
    layers = arch.layers(model)
    dropped = layers_to_drop(stats, drop_layers)
    kept = [i for i in range(len(layers)) if i not in dropped]
    counts = arch.param_counts(model)
    to_remove = sparsity * (counts["ffn"] if target == "ffn" else counts["linear"])
    keep_params = counts["linear"] - to_remove
    kept_full = sum(layer_linear(layers[i]) for i in kept)
    if keep_params > kept_full:
        removed = counts["linear"] - kept_full
        raise EdgepruneError(
            f"dropping {drop_layers} layers already removes more than --sparsity {sparsity} asks "
            f"({removed / 1e6:.1f}M of {to_remove / 1e6:.1f}M parameters): raise --sparsity or drop fewer layers"
        )
    return dropped, kept, keep_params



def min_width(n: int, align: int, min_keep: float) -> int:
    lo = max(align, int(np.ceil(min_keep * n)))
    return min(n, int(math.ceil(lo / align) * align))



def achieved(dense_model, plan: PrunePlan) -> dict:
    """Sparsity actually reached: of the FFN, of all linear layers, of the whole model."""
    dense = arch.param_counts(dense_model)
    cfg = dense_model.config
    d, hd = cfg.hidden_size, plan.base["head_dim"]
    ffn = sum(3 * d * w for w in plan.widths())
    attn = sum((2 * s.n_heads + 2 * s.n_kv_heads) * hd * d for s in plan.layer_shapes())
    norms = (2 * len(plan.layers) + 1) * d
    total = dense["embedding"] + dense["lm_head_untied"] + ffn + attn + norms
    return {
        "ffn_widths": plan.widths(),
        "ffn_sparsity": round(1 - ffn / dense["ffn"], 6),
        "linear_sparsity": round(1 - (ffn + attn) / dense["linear"], 6),
        "model_sparsity": round(1 - total / dense["total"], 6),
        "params_dense": dense["total"],
        "params_pruned": total,
        "params_embedding": dense["embedding"] + dense["lm_head_untied"],
        "layers_kept": len(plan.layers),
    }
