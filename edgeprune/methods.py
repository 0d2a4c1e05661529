"""The seed pruning methods beside CFSP -- FLAP, FASP, COMP -- and `make_method_plan`, the one
entry point the pipeline, the CLI and the benchmarks use to turn calibration statistics into a
PrunePlan. Recovery (what happens to the weights after removal) lives in recover.py; a plan
records which recovery it wants in `plan.method["recover"]` and carries the bias flags that
recovery needs, so checkpoints reload as stock LlamaForCausalLM with optional biases.

Budget. As in prune.py: `sparsity` p removes p x (dense FFN parameters) with target "ffn", or
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
  `--score` (importance.py). With `heads=True` a block's keep ratio k_l also sets its KV groups,
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

import json
import math
import weakref

import numpy as np
import torch

from edgeprune import allocate, arch
from edgeprune.calibrate import CalibrationStats
from edgeprune.errors import EdgepruneError
from edgeprune.importance import FFN_SCORES, ffn_scores, kv_group_scores
from edgeprune.plan import LayerPlan, PrunePlan
from edgeprune.prune import TARGETS, achieved, layers_to_drop, make_plan, validate_sparsity

METHODS = ("cfsp", "uniform", "flap", "fasp", "comp")
CLOSED_FORM_RECOVERIES = ("bias", "lstsq", "mask")
RECOVERIES = ("none",) + CLOSED_FORM_RECOVERIES + ("lora",)
COMP_SCORES = ("condition",) + FFN_SCORES
NATIVE_RECOVERY = {"cfsp": "none", "uniform": "none", "flap": "bias", "fasp": "lstsq", "comp": "mask"}
DEFAULT_SCORE = {"cfsp": "cfsp", "uniform": "cfsp", "flap": "flap", "fasp": "wanda-sp", "comp": "condition"}
DEFAULT_TARGET = {"cfsp": "ffn", "uniform": "ffn", "flap": "linear", "fasp": "ffn", "comp": "ffn"}
CONDITION_RIDGE = 1e-3
CONDITION_CHUNK = 64


# ------------------------------------------------------------------------------------ options
def parse_recover(recover: str | None, method: str) -> list[str]:
    """'bias', 'lstsq+lora', 'none', None (the method's native recovery) -> ordered list of steps."""
    if recover is None:
        recover = NATIVE_RECOVERY[method]
    steps = [s.strip() for s in str(recover).split("+") if s.strip()]
    bad = [s for s in steps if s not in RECOVERIES]
    if bad or not steps:
        raise EdgepruneError(f"--recover must be one of {', '.join(RECOVERIES)} (or one of bias, lstsq, mask + lora, e.g. bias+lora), got '{recover}'")
    if steps == ["none"]:
        return []
    if "none" in steps:
        raise EdgepruneError(f"--recover none cannot be combined with other recoveries, got '{recover}'")
    closed = [s for s in steps if s in CLOSED_FORM_RECOVERIES]
    if len(closed) > 1:
        raise EdgepruneError(f"--recover takes at most one of bias, lstsq, mask (each re-fits the same weights), got '{recover}'")
    if steps.count("lora") > 1 or ("lora" in steps and steps[-1] != "lora"):
        raise EdgepruneError(f"--recover: lora comes last, once (e.g. bias+lora), got '{recover}'")
    return steps


def resolve_options(method: str = "cfsp", score: str | None = None, target: str | None = None,
                    allocation: str | None = None, heads: bool | None = None, recover: str | None = None,
                    recover_args: dict | None = None) -> dict:
    """Check a method's options and fill its defaults, before any model is loaded (one-line errors)."""
    if method not in METHODS:
        raise EdgepruneError(f"--method must be one of {', '.join(METHODS)}, got {method}")
    target = target or DEFAULT_TARGET[method]
    if target not in TARGETS:
        raise EdgepruneError(f"--target must be one of {', '.join(TARGETS)}, got {target}")
    if method in ("cfsp", "uniform"):
        if allocation not in (None, method):
            raise EdgepruneError(f"--allocation applies to --method fasp and comp; --method {method} is itself the allocation")
        allocation = method
    elif method == "flap":
        if allocation not in (None, "global"):
            raise EdgepruneError("--method flap ranks all layers together (global allocation): --allocation does not apply")
        allocation = "global"
    else:
        allocation = allocation or "uniform"
        if allocation not in allocate.ALLOCATIONS:
            raise EdgepruneError(f"--allocation must be one of {', '.join(allocate.ALLOCATIONS)}, got {allocation}")
    if method == "flap":
        if score not in (None, "flap"):
            raise EdgepruneError("--method flap ranks by its fluctuation metric: --score does not apply (try --method uniform --score flap)")
    score = score or DEFAULT_SCORE[method]
    if score not in COMP_SCORES:
        raise EdgepruneError(f"--score must be one of {', '.join(COMP_SCORES)}, got {score}")
    if method == "comp" and heads:
        raise EdgepruneError("--method comp prunes layers and FFN neurons, not heads: drop --heads (or use flap, fasp, cfsp)")
    heads = (method == "flap") if heads is None else bool(heads)
    steps = parse_recover(recover, method)
    recover_args = {k: v for k, v in (recover_args or {}).items() if v is not None}
    lora_keys = [k for k in recover_args if k.startswith("lora_")]
    if lora_keys and "lora" not in steps:
        raise EdgepruneError(f"{', '.join('--' + k.replace('_', '-') for k in sorted(lora_keys))} only apply with --recover lora (or X+lora)")
    from edgeprune.recover import check_recover_args

    recover_args = check_recover_args(steps, recover_args)
    return {"method": method, "score": score, "target": target, "allocation": allocation, "heads": heads,
            "recover": "+".join(steps) or "none", "recover_args": recover_args}


def needs_gram(method: str = "cfsp", score: str | None = None, recover: str | None = None) -> bool:
    """Whether the calibration pass must collect Gram matrices (lstsq, mask tuning, the condition metric)."""
    score = score or DEFAULT_SCORE.get(method, "cfsp")
    steps = parse_recover(recover, method) if method in METHODS else []
    return score == "condition" or any(s in ("lstsq", "mask") for s in steps)


def default_drop_layers(method: str, num_layers: int) -> int:
    return max(1, int(math.floor(num_layers / 15 + 0.5))) if method == "comp" else 0


# -------------------------------------------------------------------------------- the dispatcher
def make_method_plan(
    model,
    stats: CalibrationStats,
    base: dict,
    sparsity: float,
    method: str = "cfsp",
    target: str | None = None,
    allocation: str | None = None,
    score: str | None = None,
    drop_layers: int | None = None,
    heads: bool | None = None,
    align: int = 32,
    temperature: float = allocate.DEFAULT_TEMPERATURE,
    min_keep: float = 0.05,
    seed: int = 0,
    recover: str | None = None,
    recover_args: dict | None = None,
) -> PrunePlan:
    """A PrunePlan for any method; `recover` (None = the method's native one) is recorded in it."""
    validate_sparsity(sparsity)
    opts = resolve_options(method, score, target, allocation, heads, recover, recover_args)
    if drop_layers is None:
        drop_layers = default_drop_layers(method, len(arch.layers(model)))
    if opts["score"] == "condition" and stats.blocks and stats.blocks[0].ffn.gram is None:
        raise EdgepruneError("the condition score needs Gram matrices: calibrate with gram=True")
    common = dict(sparsity=sparsity, target=opts["target"], drop_layers=drop_layers, align=align,
                  temperature=temperature, min_keep=min_keep, seed=seed)
    if method == "flap":
        plan = _flap_plan(model, stats, base, heads=opts["heads"], **common)
    else:
        plan = _ranked_plan(model, stats, base, opts["allocation"], opts["score"], opts["heads"], **common)
    plan.method.update({"method": method, "allocation": opts["allocation"], "score": opts["score"], "heads": opts["heads"]})
    plan = with_recovery(plan, opts["recover"], opts["recover_args"])
    plan.achieved = achieved(model, plan)
    if opts["heads"]:
        plan.achieved["kv_groups"] = [len(lp.kv_keep) for lp in plan.layers]
    return plan


def with_recovery(plan: PrunePlan, recover: str | None, recover_args: dict | None = None) -> PrunePlan:
    """A copy of `plan` that records `recover` and carries the bias flags it needs (same kept units).

    Lets one selection be tried with several recoveries without re-planning."""
    from edgeprune.recover import bias_flags, check_recover_args

    method = plan.method.get("method", plan.method.get("allocation", "cfsp"))
    steps = parse_recover(recover, method if method in METHODS else "cfsp")
    args = check_recover_args(steps, {k: v for k, v in (recover_args or {}).items() if v is not None})
    new = PrunePlan.from_dict(json.loads(plan.to_json()))
    new.method.update({"recover": "+".join(steps) or "none", "recover_args": args})
    ffn_b, attn_b = bias_flags(new.method["recover"], args)
    for lp in new.layers:
        lp.ffn_bias = ffn_b and len(lp.ffn_keep) < new.base["ffn"]
        lp.attn_out_bias = attn_b and len(lp.kv_keep) < new.base["kv_heads"]
    return new


# ------------------------------------------------------------------------------------ helpers
def _geometry(model):
    cfg = model.config
    hd = arch.head_dim(model)
    n_kv = cfg.num_key_value_heads
    q_per_group = cfg.num_attention_heads // n_kv
    d = cfg.hidden_size
    return d, cfg.intermediate_size, hd, n_kv, q_per_group


def kv_group_params(layer, head_dim: int) -> int:
    """Parameters one KV group carries, from the module shapes: q rows, k and v rows, o columns."""
    attn = layer.self_attn
    n_kv = attn.k_proj.out_features // head_dim
    total = sum(lin.weight.numel() for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
    return total // n_kv


def ffn_channel_params(layer) -> int:
    mlp = layer.mlp
    return (mlp.gate_proj.in_features + mlp.up_proj.in_features + mlp.down_proj.out_features)


def _layer_linear(layer) -> int:
    return sum(p.numel() for p in layer.self_attn.parameters()) + sum(p.numel() for p in layer.mlp.parameters())


def _budget(model, stats, sparsity, target, drop_layers):
    """(dropped, kept, parameters the kept layers' attention+FFN may still hold)."""
    layers = arch.layers(model)
    dropped = layers_to_drop(stats, drop_layers)
    kept = [i for i in range(len(layers)) if i not in dropped]
    counts = arch.param_counts(model)
    to_remove = sparsity * (counts["ffn"] if target == "ffn" else counts["linear"])
    keep_params = counts["linear"] - to_remove
    kept_full = sum(_layer_linear(layers[i]) for i in kept)
    if keep_params > kept_full:
        removed = counts["linear"] - kept_full
        raise EdgepruneError(
            f"dropping {drop_layers} layers already removes more than --sparsity {sparsity} asks "
            f"({removed / 1e6:.1f}M of {to_remove / 1e6:.1f}M parameters): raise --sparsity or drop fewer layers"
        )
    return dropped, kept, keep_params


def _min_width(n: int, align: int, min_keep: float) -> int:
    lo = max(align, int(np.ceil(min_keep * n)))
    return min(n, int(math.ceil(lo / align) * align))


def _standardize(s: torch.Tensor) -> torch.Tensor:
    s = s.double()
    std = s.std(unbiased=False)
    return (s - s.mean()) / (std if std > 0 else 1.0)


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k best scores, ties broken by index (deterministic), sorted."""
    order = np.lexsort((np.arange(len(scores)), -scores.double().numpy()))
    return sorted(int(i) for i in order[:k])


def _ratios(allocation, stats, kept, keep_mean, temperature, min_keep) -> np.ndarray:
    if allocation == "cfsp":
        return allocate.cfsp_keep_ratios([stats.blocks[i].angular for i in kept], keep_mean, temperature, min_keep)
    return allocate.uniform_keep_ratios(len(kept), keep_mean)


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


# ----------------------------------------------------------------------------- cfsp/uniform/fasp/comp
def _ranked_plan(model, stats, base, allocation, score, heads, sparsity, target, drop_layers, align, temperature, min_keep, seed):
    if not heads and score != "condition":
        # exactly the core planner: same widths and channels as `edgeprune prune --method cfsp|uniform`
        plan = make_plan(model, stats, base, sparsity, target=target, allocation=allocation, score=score,
                         drop_layers=drop_layers, align=align, temperature=temperature, min_keep=min_keep, seed=seed)
        return plan
    layers = arch.layers(model)
    d, n, hd, n_kv, _ = _geometry(model)
    dropped, kept, keep_params = _budget(model, stats, sparsity, target, drop_layers)
    kv_unit, ch_unit = kv_group_params(layers[0], hd), ffn_channel_params(layers[0])
    attn_full = sum(sum(p.numel() for p in layers[i].self_attn.parameters()) for i in kept)
    kept_full = sum(_layer_linear(layers[i]) for i in kept)
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
    budget = min(int(round((keep_params - attn_kept) / ch_unit)), n * len(kept))
    if not heads:  # FFN-only: CFSP's ratios around the FFN keep mean, as prune.make_plan
        ratios = _ratios(allocation, stats, kept, budget / (n * len(kept)), temperature, min_keep)
    widths = allocate.round_widths(ratios, n, align, budget, min_width=int(np.ceil(min_keep * n)))
    layer_plans = []
    for i, width, kv in zip(kept, widths, kv_counts):
        layer, block = layers[i], stats.blocks[i]
        if score == "condition":
            ffn_keep = condition_keep(layer, block, width)
        else:
            ffn_keep = _top(ffn_scores(score, layer, block, seed=seed, layer_index=i), width)
        kv_keep = list(range(n_kv)) if kv == n_kv else _top(kv_group_scores(score if score in FFN_SCORES else "activation", layer, block, hd, seed=seed, layer_index=i), kv)
        layer_plans.append(LayerPlan(index=i, ffn_keep=ffn_keep, kv_keep=kv_keep))
    return PrunePlan(
        base=base,
        method={"allocation": allocation, "score": score, "sparsity": sparsity, "target": target, "drop_layers": drop_layers,
                "align": align, "temperature": temperature, "min_keep": min_keep, "seed": seed},
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


def _flap_plan(model, stats, base, heads, sparsity, target, drop_layers, align, temperature, min_keep, seed):
    layers = arch.layers(model)
    d, n, hd, n_kv, q_per_group = _geometry(model)
    dropped, kept, keep_params = _budget(model, stats, sparsity, target, drop_layers)
    lo = _min_width(n, align, min_keep)

    # every unit: (score, params, layer position, kind 0=ffn 1=kv, index); forced ones are kept first
    ffn_scores_, kv_scores = {}, {}
    forced_params = 0.0
    forced_ffn = {}
    forced_kv = {}
    units_score, units_params, units_pos, units_kind, units_idx = [], [], [], [], []
    for pos, i in enumerate(kept):
        layer = layers[i]
        ch_unit, kv_unit = ffn_channel_params(layer), kv_group_params(layer, hd)
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

    attn_kept = sum(len(kv_keep[pos]) * kv_group_params(layers[i], hd) for pos, i in enumerate(kept))
    ch_unit = ffn_channel_params(layers[0])
    budget = int(round((keep_params - attn_kept) / ch_unit))
    budget = max(min(budget, n * len(kept)), lo * len(kept))
    ratios = np.array([ffn_count[pos] / n for pos in range(len(kept))], dtype=np.float64)
    widths = allocate.round_widths(ratios, n, align, budget, min_width=lo)
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


# ------------------------------------------------------------------------- COMP condition metric
def condition_scores(layer, block, ridge: float = CONDITION_RIDGE) -> torch.Tensor:
    """One-shot e_j = ||W_down[:, j]||² / [(G + λI)^-1]_jj (higher = keep); see the module docstring."""
    g = block.ffn.gram
    if g is None:
        raise EdgepruneError("the condition score needs Gram matrices: calibrate with gram=True")
    w = layer.mlp.down_proj.weight.detach().double()
    m = _ridge_inverse(g, ridge)
    return w.pow(2).sum(0) / m.diagonal()


def _ridge_inverse(g: torch.Tensor, ridge: float) -> torch.Tensor:
    g = g.double()
    lam = ridge * float(g.diagonal().mean().clamp_min(1e-30))
    a = g + lam * torch.eye(g.shape[0], dtype=torch.float64)
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_inverse(chol)
    return torch.linalg.pinv(a, hermitian=True)


_ORDER_CACHE: dict = {}  # id(ChannelStats) -> (weakref, weight data_ptr, ridge, removal order so far)


def condition_keep(layer, block, width: int, ridge: float = CONDITION_RIDGE, chunk: int = CONDITION_CHUNK) -> list[int]:
    """Greedy OBS-style removal by the condition metric down to `width` channels (sorted kept indices).

    The greedy order does not depend on the target width, so the removal order is cached per
    (calibration statistics, weights): planning several sparsities costs one pass per layer."""
    n = layer.mlp.down_proj.in_features
    w = layer.mlp.down_proj.weight
    key = id(block.ffn)
    hit = _ORDER_CACHE.get(key)
    if hit and hit[0]() is block.ffn and hit[1] == (w.data_ptr(), tuple(w.shape)) and hit[2] == ridge and len(hit[3]) >= n - width:
        order = hit[3]
    else:
        order = condition_order(layer, block, n - width, ridge, chunk)
        _ORDER_CACHE[key] = (weakref.ref(block.ffn), (w.data_ptr(), tuple(w.shape)), ridge, order)
    removed = set(order[: n - width])
    return [j for j in range(n) if j not in removed]


def condition_order(layer, block, n_remove: int, ridge: float = CONDITION_RIDGE, chunk: int = CONDITION_CHUNK) -> list[int]:
    """The first `n_remove` channels in the greedy removal order (see the module docstring).

    Exact one-at-a-time greedy: after each removal the inverse Gram M and the compensated W are
    updated (rank one), so a channel stops looking redundant once its stand-in is gone. The rank-one
    updates of M are kept as factors and folded in every `chunk` removals (one matrix product)."""
    g = block.ffn.gram
    if g is None:
        raise EdgepruneError("the condition score needs Gram matrices: calibrate with gram=True")
    n = g.shape[0]
    m = _ridge_inverse(g, ridge)
    w = layer.mlp.down_proj.weight.detach().double().clone()
    alive = torch.arange(n)
    order: list[int] = []
    while len(order) < n_remove:
        c = min(chunk, n_remove - len(order))
        diag = m.diagonal().clone()
        wn = w.pow(2).sum(0)
        f = torch.zeros(c, len(alive), dtype=torch.float64)  # rank-one factors: current M = m - f^T f
        gone = torch.zeros(len(alive), dtype=torch.bool)
        for t in range(c):
            e = wn / diag.clamp_min(1e-300)
            e[gone] = math.inf
            j = int(torch.argmin(e))  # ties: the lowest position (= lowest channel index)
            col = m[:, j] - f[:t].T @ f[:t, j]
            pivot = max(float(col[j]), 1e-300)
            w -= torch.outer(w[:, j], col / pivot)  # OBS: zero column j, compensate the others
            f[t] = col / math.sqrt(pivot)
            diag -= f[t] * f[t]
            wn = w.pow(2).sum(0)
            gone[j] = True
            order.append(int(alive[j]))
        m = m - f.T @ f
        keep = (~gone).nonzero().squeeze(1)
        m = m[keep][:, keep]
        w = w[:, keep]
        alive = alive[keep]
    return order
