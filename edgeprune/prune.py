"""From calibration statistics to a PrunePlan (CFSP allocation, COMP-style layer dropping).

Budget. `sparsity` p removes p x (dense FFN parameters) when target = "ffn" (the default), or
p x (dense attention + FFN parameters) when target = "linear". Dropped layers count towards that
budget: the FFN channels left for the remaining blocks are re-solved so the total parameter
target still holds. Embeddings and norms never count (pruning never shrinks them) and are
reported separately.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from edgeprune import allocate, arch
from edgeprune.apply import apply_plan
from edgeprune.calibrate import CalibrationStats
from edgeprune.errors import EdgepruneError
from edgeprune.importance import FFN_SCORES, ffn_scores
from edgeprune.plan import LayerPlan, PrunePlan

TARGETS = ("ffn", "linear")


def layers_to_drop(stats: CalibrationStats, k: int) -> list[int]:
    """The k blocks with the smallest Block Influence 1 - cos(h_in, h_out); block 0 always stays
    (llama.cpp derives the head size from layer 0, and it is never unimportant in practice)."""
    n = len(stats.blocks)
    if not 0 <= k < n - 1:
        raise EdgepruneError(f"--drop-layers must be between 0 and {n - 2} for a {n}-layer model, got {k}")
    order = sorted(range(1, n), key=lambda i: stats.blocks[i].one_minus_cos)
    return sorted(order[:k])


def validate_sparsity(sparsity: float) -> None:
    if not 0.0 < sparsity < 0.95:
        raise EdgepruneError(f"--sparsity must be in (0, 0.95), got {sparsity}")


def make_plan(
    model,
    stats: CalibrationStats,
    base: dict,
    sparsity: float,
    target: str = "ffn",
    allocation: str = "cfsp",
    score: str = "cfsp",
    drop_layers: int = 0,
    align: int = 32,
    temperature: float = allocate.DEFAULT_TEMPERATURE,
    min_keep: float = 0.05,
    seed: int = 0,
) -> PrunePlan:
    validate_sparsity(sparsity)
    if target not in TARGETS:
        raise EdgepruneError(f"--target must be one of {', '.join(TARGETS)}, got {target}")
    if allocation not in allocate.ALLOCATIONS:
        raise EdgepruneError(f"--allocation must be one of {', '.join(allocate.ALLOCATIONS)}, got {allocation}")
    if score not in FFN_SCORES:
        raise EdgepruneError(f"--score must be one of {', '.join(FFN_SCORES)}, got {score}")
    layers = arch.layers(model)
    n_layers, d, n = len(layers), model.config.hidden_size, model.config.intermediate_size
    dropped = layers_to_drop(stats, drop_layers)
    kept = [i for i in range(n_layers) if i not in dropped]

    counts = arch.param_counts(model)
    per_channel = 3 * d  # one FFN channel = a row of gate and up, a column of down
    to_remove = sparsity * (counts["ffn"] if target == "ffn" else counts["linear"])
    removed_by_dropping = sum(
        sum(p.numel() for p in layers[i].self_attn.parameters()) + sum(p.numel() for p in layers[i].mlp.parameters())
        for i in dropped
    )
    ffn_left = n * len(kept) * per_channel
    budget = int(round((ffn_left - (to_remove - removed_by_dropping)) / per_channel))
    if budget > n * len(kept):
        raise EdgepruneError(
            f"dropping {drop_layers} layers already removes more than --sparsity {sparsity} asks "
            f"({removed_by_dropping / 1e6:.1f}M of {to_remove / 1e6:.1f}M parameters): raise --sparsity or drop fewer layers"
        )

    keep_mean = budget / (n * len(kept))
    if allocation == "cfsp":
        ratios = allocate.cfsp_keep_ratios([stats.blocks[i].angular for i in kept], keep_mean, temperature, min_keep)
    else:
        ratios = allocate.uniform_keep_ratios(len(kept), keep_mean)
    widths = allocate.round_widths(ratios, n, align, budget, min_width=int(np.ceil(min_keep * n)))

    n_kv = model.config.num_key_value_heads
    layer_plans = []
    for i, width in zip(kept, widths):
        scores = ffn_scores(score, layers[i], stats.blocks[i], seed=seed, layer_index=i)
        top = torch.topk(scores, width).indices.sort().values.tolist()
        layer_plans.append(LayerPlan(index=i, ffn_keep=top, kv_keep=list(range(n_kv))))

    plan = PrunePlan(
        base=base,
        method={
            "allocation": allocation,
            "score": score,
            "sparsity": sparsity,
            "target": target,
            "drop_layers": drop_layers,
            "align": align,
            "temperature": temperature,
            "min_keep": min_keep,
            "seed": seed,
        },
        calibration=dict(stats.description),
        layers=layer_plans,
        dropped_layers=dropped,
    )
    plan.achieved = achieved(model, plan)
    return plan


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


def pruned_copy(model, plan: PrunePlan):
    """A pruned deep copy of the dense `model` (the dense model stays intact for comparisons)."""
    pruned = copy.deepcopy(model)
    apply_plan(pruned, plan)
    return pruned
