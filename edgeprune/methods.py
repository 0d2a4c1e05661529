"""How each method chooses what to keep: CFSP/uniform/FASP/COMP ranking (`ranked_plan`) and FLAP's
global ranking (`flap_plan`). `edgeprune.prune.make_plan` is the one entry point that dispatches
here; the budget comes from budget.py. Recovery (what happens to the weights after removal) lives in recover.py; a plan
records which recovery it wants in `plan.method["recover"]` and carries the bias flags that
recovery needs, so checkpoints reload as stock transformers models (any family) with optional biases.

Budget (budget.py): `sparsity` p removes p x (dense FFN parameters) with target "ffn", or
p x (dense attention + FFN parameters) with target "linear" (FLAP's default and the benchmarks').
Dropped layers count towards it.

Units that can be removed
  * an FFN channel j: row j of gate and up, column j of down -- 3·d parameters;
  * a KV group g (GQA): one K and one V head and its G query heads (rows of q, columns of o) --
    (2G + 2)·head_dim·d parameters. Runtimes need whole heads and a whole group per KV head, so
    this is the smallest interlinked attention unit (FASP's "o columns <-> v rows", widened to
    the group). Layer 0 keeps its attention whole (llama.cpp derives the head size from it) and
    every layer keeps at least one KV group.

cfsp / uniform
  CFSP's per-block widths (allocate.py) or the same width everywhere, channels ranked by
  `--score` (importance.py). `--allocation sensitivity` (cfsp, fasp, comp) refines CFSP's widths by
  measured cost: per block, the change of the network's output KL when only that block is made
  narrower or wider than CFSP gave it; the widths then solve a budgeted choice (sensitivity.py). With `heads=True` a block's keep ratio k_l also sets its KV groups,
  round(k_l · n_kv) clamped to [1, n_kv], ranked by importance.kv_group_scores; the FFN budget
  is re-solved so the total still hits the target.

flap (FLAP, AAAI 2024)
  Fluctuation metric S_j = Var(X_j) · ||W[:, j]||² at the input of down_proj (FFN channels) and
  o_proj (attention channels), exact float64 variance from the calibration pass. Standardised
  per layer and module, (S - mean) / std; a KV group's score is the mean of its channels'
  standardised scores. One global ranking over every FFN channel and KV group of every kept
  layer; units are kept best-first, each weighing the parameters it carries, until the kept
  parameters reach the budget. FFN widths are then rounded to multiples of `align`
  (largest remainder, total preserved) and filled with each layer's best channels.
  Native recovery: bias compensation (recover.py).

fasp (FASP, arXiv 2501.09412)
  Interlinked removal, Wanda-style score on the consuming matrix s_j = ||X_j||_2 · sum_i |W[i, j]|
  (down_proj for FFN channels, o_proj for attention, averaged over a KV group), the same ratio
  in every layer (or CFSP's allocation with allocation="cfsp"). Native recovery: least-squares
  restoration of the consuming matrix (recover.py).

comp (COMP, arXiv 2501.15255)
  Coarse: drop the blocks with the smallest Block Influence 1 - cos(h_in, h_out) (prune.py).
  Default: round(num_layers / 15) blocks, at least 1 (2 of SmolLM2's 30).
  Fine: neurons ranked by a matrix-condition metric ("condition", below) inside the remaining
  blocks, uniform width by default. Native recovery: mask tuning (recover.py).

The "condition" neuron metric (COMP's metric was not retrieved; this is edgeprune's design)
  Let G = X^T X be the Gram of the down_proj input over the calibration tokens, W = W_down
  (d x n) and M = (G + λI)^-1 (λ = 1e-3 · mean diag G). Removing channel j and refitting the
  remaining columns of W by least squares raises the layer's output error ||X W^T - X_K W_K'^T||²
  by exactly (the structured Optimal-Brain-Surgeon identity)

        e_j = ||W[:, j]||² / M_jj = ||W[:, j]||² · G_jj / VIF_j,       VIF_j = G_jj · M_jj,

  where VIF_j is channel j's variance inflation factor: the diagonal of G^-1 in G's own scale,
  1 / (1 - R_j²) with R_j² the fraction of channel j explained by the other channels. Channels
  that are nearly collinear with the rest -- the ones that make G ill-conditioned -- have a large
  VIF and a small e_j: they can go, because the others can stand in for them. Plain activation
  norm is e_j with VIF_j = 1 (no redundancy credited) and no weight norm.
  Selection is greedy, one channel at a time: remove the channel with the smallest e_j, update M
  to the inverse of G restricted to the survivors (rank-one Schur complement M - M_:j M_j: / M_jj)
  and W by the OBS compensation W -= W_:j M_j: / M_jj, re-score, repeat. So two duplicated
  channels are not both removed because each looks redundant while the other is there. The refit is
  only used for scoring; the weights are changed by the chosen recovery (`lstsq` realises the
  refit the metric assumes; COMP's mask tuning realises only its diagonal part).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from edgeprune import allocate, arch, budget, sensitivity
from edgeprune.condition import condition_keep, condition_order
from edgeprune.errors import EdgepruneError
from edgeprune.importance import FFN_SCORES, ffn_scores, kv_group_scores
from edgeprune.plan import LayerPlan, PrunePlan


# ------------------------------------------------------------------------------------ helpers
def _geometry(model):
    cfg = model.config
    hd = arch.head_dim(model)
    n_kv = cfg.num_key_value_heads
    q_per_group = cfg.num_attention_heads // n_kv
    d = cfg.hidden_size
    return d, cfg.intermediate_size, hd, n_kv, q_per_group


def _standardize(s: torch.Tensor) -> torch.Tensor:
    s = s.double()
    std = s.std(unbiased=False)
    return (s - s.mean()) / (std if std > 0 else 1.0)


def _ranked(scores: torch.Tensor) -> list[int]:
    """All indices, best score first, ties broken by index (deterministic)."""
    return [int(i) for i in np.lexsort((np.arange(len(scores)), -scores.double().numpy()))]


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k best scores, sorted."""
    return sorted(_ranked(scores)[:k])


def _ratios(allocation, stats, kept, keep_mean, temperature, min_keep) -> np.ndarray:
    if allocation in ("cfsp", "sensitivity"):  # sensitivity refines CFSP's widths afterwards (_per_layer_shapes)
        return allocate.cfsp_keep_ratios([stats.blocks[i].angular for i in kept], keep_mean, temperature, min_keep)
    return allocate.uniform_keep_ratios(len(kept), keep_mean)


def _best_first(score, layer, block, seed, index, lo) -> list[int]:
    """Block `index`'s FFN channels, best first (the order `_keep` takes them in at any width >= lo)."""
    if score == "condition":  # the greedy removal order does not depend on the width
        removed = condition_order(layer, block, layer.mlp.down_proj.in_features - lo)
        gone = set(removed)
        return [j for j in range(layer.mlp.down_proj.in_features) if j not in gone] + removed[::-1]
    return _ranked(ffn_scores(score, layer, block, seed=seed, layer_index=index))


def _keep(score, layer, block, width, seed, index) -> list[int]:
    if score == "condition":
        return condition_keep(layer, block, width)
    return _top(ffn_scores(score, layer, block, seed=seed, layer_index=index), width)


def sensitivity_widths(model, stats, kept, score, seed, align, lo, ids, base_widths, progress=None) -> tuple[list[int], dict]:
    """The sensitivity allocation around `base_widths` (CFSP's): measured costs, then the budgeted
    choice at the same total (sensitivity.py). The measurement is cached on the stats object per
    (kept layers, score, base widths), so re-planning the same structure does not measure again."""
    cache = stats.__dict__.setdefault("_sensitivity", {})
    key = (tuple(kept), score, seed, align, lo, tuple(base_widths))
    if key not in cache:
        layers = arch.layers(model)
        orders = {i: _best_first(score, layers[i], stats.blocks[i], seed, i, lo) for i in kept}
        cache[key] = sensitivity.measure(model, ids, kept, orders, dict(zip(kept, base_widths)), align, lo, progress=progress)
    m = cache[key]
    curves = [sensitivity.cost_curve(m["widths"][i], m["kl"][i], w, align) for i, w in zip(kept, base_widths)]
    return sensitivity.allocate_widths(curves, align, sum(base_widths)), m


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


# ----------------------------------------------------------------------------- cfsp/uniform/fasp/comp
def _uniform_shapes(n, n_kv, n_layers, heads, keep_mean, keep_params, attn_full, kv_unit, ch_unit, align, min_keep):
    """One KV-group count and one FFN width for every kept layer (runtimes that build every layer
    from layer 0's shape): groups follow the keep ratio, the FFN takes the rest of the budget."""
    kv = min(n_kv, max(1, _round_half_up(keep_mean * n_kv))) if heads else n_kv
    while kv < n_kv and attn_full - (n_kv - kv) * n_layers * kv_unit + n * n_layers * ch_unit < keep_params:
        kv += 1
    ffn_budget = (keep_params - (attn_full - (n_kv - kv) * n_layers * kv_unit)) / ch_unit
    width = _round_half_up(ffn_budget / n_layers / align) * align
    width = int(min(n, max(budget.min_width(n, align, min_keep), width)))
    return [kv] * n_layers, [width] * n_layers


def _per_layer_shapes(allocation, stats, kept, heads, n, n_kv, keep_params, kept_full, attn_full, kv_unit, ch_unit, align,
                      temperature, min_keep):
    """KV groups and FFN widths per kept layer from the allocation's keep ratios (CFSP: block importance;
    sensitivity starts from CFSP's and is refined by ranked_plan)."""
    ratios = _ratios(allocation, stats, kept, keep_params / kept_full, temperature, min_keep)
    kv_counts = [n_kv] * len(kept)
    if heads:
        kv_counts = [n_kv if i == 0 else min(n_kv, max(1, _round_half_up(r * n_kv))) for i, r in zip(kept, ratios)]
        # attention alone must not remove more than the budget: give groups back to the best-kept layers
        while attn_full - sum(n_kv - c for c in kv_counts) * kv_unit + n * len(kept) * ch_unit < keep_params and \
                any(c < n_kv for c in kv_counts):
            j = max((j for j, c in enumerate(kv_counts) if c < n_kv), key=lambda j: (ratios[j], -j))
            kv_counts[j] += 1
    attn_kept = attn_full - sum(n_kv - c for c in kv_counts) * kv_unit
    ffn_budget = min(int(round((keep_params - attn_kept) / ch_unit)), n * len(kept))
    if not heads:  # FFN-only: CFSP's ratios around the FFN keep mean
        ratios = _ratios(allocation, stats, kept, ffn_budget / (n * len(kept)), temperature, min_keep)
    return kv_counts, allocate.round_widths(ratios, n, align, ffn_budget, min_width=int(np.ceil(min_keep * n)))


def ranked_plan(model, stats, base, allocation, score, heads, sparsity, target, drop_layers, align, temperature, min_keep, seed,
                uniform: bool = False, ids=None, progress=None):
    """uniform: every kept layer gets the same FFN width and KV groups (the allocation is uniform).
    allocation "sensitivity" measures the model on the calibration `ids` (sensitivity.py)."""
    layers = arch.layers(model)
    d, n, hd, n_kv, _ = _geometry(model)
    dropped, kept, keep_params = budget.solve(model, stats, sparsity, target, drop_layers)
    kv_unit, ch_unit = budget.kv_group_params(layers[0], hd), budget.ffn_channel_params(layers[0])
    attn_full = sum(sum(p.numel() for p in layers[i].self_attn.parameters()) for i in kept)
    kept_full = sum(budget.layer_linear(layers[i]) for i in kept)
    if uniform:
        allocation = "uniform"
        kv_counts, widths = _uniform_shapes(n, n_kv, len(kept), heads, keep_params / kept_full, keep_params, attn_full,
                                            kv_unit, ch_unit, align, min_keep)
    else:
        kv_counts, widths = _per_layer_shapes(allocation, stats, kept, heads, n, n_kv, keep_params, kept_full, attn_full,
                                              kv_unit, ch_unit, align, temperature, min_keep)
        if allocation == "sensitivity":
            widths, measured = sensitivity_widths(model, stats, kept, score, seed, align, budget.min_width(n, align, min_keep), ids,
                                                  widths, progress)
    layer_plans = []
    for i, width, kv in zip(kept, widths, kv_counts):
        layer, block = layers[i], stats.blocks[i]
        ffn_keep = _keep(score, layer, block, width, seed, i)
        kv_keep = list(range(n_kv)) if kv == n_kv else _top(kv_group_scores(score if score in FFN_SCORES else "activation", layer, block, hd, seed=seed, layer_index=i), kv)
        layer_plans.append(LayerPlan(index=i, ffn_keep=ffn_keep, kv_keep=kv_keep))
    method = {"allocation": allocation, "score": score, "sparsity": sparsity, "target": target, "drop_layers": drop_layers,
              "align": align, "temperature": temperature, "min_keep": min_keep, "seed": seed,
              "shapes": "uniform" if uniform else "per-layer"}
    if allocation == "sensitivity" and not uniform:  # what the widths were chosen from, for the report
        method["sensitivity"] = {"rows": measured["rows"], "tokens": measured["tokens"], "seconds": round(measured["seconds"], 1),
                                 "base_kl": measured["base_kl"], "base_widths": [measured["base_widths"][i] for i in kept],
                                 "kl": {str(i): [[w, c] for w, c in zip(measured["widths"][i], measured["kl"][i])] for i in kept}}
    return PrunePlan(
        base=base,
        method=method,
        calibration=dict(stats.description),
        layers=layer_plans,
        dropped_layers=dropped,
    )


# ----------------------------------------------------------------------------------------- FLAP
def flap_channel_scores(layer, block) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardised fluctuation scores: FFN channels [n] and attention channels [heads·head_dim]."""
    ffn = block.ffn.var * layer.mlp.down_proj.weight.detach().double().pow(2).sum(0)
    attn = block.attn.var * layer.self_attn.o_proj.weight.detach().double().pow(2).sum(0)
    return _standardize(ffn), _standardize(attn)


def flap_plan(model, stats, base, heads, sparsity, target, drop_layers, align, temperature, min_keep, seed):
    layers = arch.layers(model)
    d, n, hd, n_kv, q_per_group = _geometry(model)
    dropped, kept, keep_params = budget.solve(model, stats, sparsity, target, drop_layers)
    lo = budget.min_width(n, align, min_keep)

    # every unit: (score, params, layer position, kind 0=ffn 1=kv, index); forced ones are kept first
    ffn_scores_, kv_scores = {}, {}
    forced_params = 0.0
    forced_ffn = {}
    forced_kv = {}
    units_score, units_params, units_pos, units_kind, units_idx = [], [], [], [], []
    for pos, i in enumerate(kept):
        layer = layers[i]
        ch_unit, kv_unit = budget.ffn_channel_params(layer), budget.kv_group_params(layer, hd)
        f, a = flap_channel_scores(layer, stats.blocks[i])
        ffn_scores_[pos] = f
        g = a.view(n_kv, -1).mean(1)  # a group's score: mean of its channels' standardised scores
        kv_scores[pos] = g
        forced_ffn[pos] = set(_top(f, lo))
        forced_params += lo * ch_unit
        if not heads or i == 0:
            forced_kv[pos] = set(range(n_kv))
        else:
            forced_kv[pos] = set(_top(g, 1))
        forced_params += len(forced_kv[pos]) * kv_unit
        for j in range(n):
            if j not in forced_ffn[pos]:
                units_score.append(float(f[j])); units_params.append(ch_unit); units_pos.append(pos); units_kind.append(0); units_idx.append(j)
        for j in range(n_kv):
            if j not in forced_kv[pos]:
                units_score.append(float(g[j])); units_params.append(kv_unit); units_pos.append(pos); units_kind.append(1); units_idx.append(j)

    if forced_params > keep_params:
        raise EdgepruneError(f"--sparsity {sparsity} leaves {keep_params / 1e6:.2f}M attention+FFN parameters, below the "
                             f"{forced_params / 1e6:.2f}M every layer must keep (one KV group, {lo} FFN channels): lower --sparsity")
    # best first; ties by (layer, kind, index) so the plan is deterministic
    order = np.lexsort((np.array(units_idx), np.array(units_kind), np.array(units_pos), -np.array(units_score)))
    cum = forced_params + np.cumsum(np.array(units_params, dtype=np.float64)[order])
    n_take = int(np.searchsorted(cum, keep_params, side="right"))  # keep best-first while within the budget
    ffn_count = {pos: len(forced_ffn[pos]) for pos in range(len(kept))}
    kv_keep = {pos: set(forced_kv[pos]) for pos in range(len(kept))}
    for u in order[:n_take]:
        if units_kind[u] == 0:
            ffn_count[units_pos[u]] += 1
        else:
            kv_keep[units_pos[u]].add(units_idx[u])

    attn_kept = sum(len(kv_keep[pos]) * budget.kv_group_params(layers[i], hd) for pos, i in enumerate(kept))
    ch_unit = budget.ffn_channel_params(layers[0])
    ffn_budget = int(round((keep_params - attn_kept) / ch_unit))
    ffn_budget = max(min(ffn_budget, n * len(kept)), lo * len(kept))
    ratios = np.array([ffn_count[pos] / n for pos in range(len(kept))], dtype=np.float64)
    widths = allocate.round_widths(ratios, n, align, ffn_budget, min_width=lo)
    layer_plans = [
        LayerPlan(index=i, ffn_keep=_top(ffn_scores_[pos], w), kv_keep=sorted(kv_keep[pos]))
        for pos, (i, w) in enumerate(zip(kept, widths))
    ]
    return PrunePlan(
        base=base,
        method={"allocation": "global", "score": "flap", "sparsity": sparsity, "target": target, "drop_layers": drop_layers,
                "align": align, "temperature": temperature, "min_keep": min_keep, "seed": seed},
        calibration=dict(stats.description),
        layers=layer_plans,
        dropped_layers=dropped,
    )
