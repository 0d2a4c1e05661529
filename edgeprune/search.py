"""`fit`'s search: the best-quality pruned model that meets a device profile's targets.

Candidates are (FFN-equivalent sparsity, layers dropped, export dtype). For each, the plan is
made from the one calibration pass (cheap: scores and top-k, no model is built), its geometry
goes through the latency/memory model of the profile, and only candidates that meet every
target are scored for quality:

    quality proxy = KL(dense || pruned) on held-out self-generated text   (structure, torch)
                  + KL(dense || dense exported as dtype) on the same text  (quantization, runtime)

The two KLs are measured separately and added (for small perturbations they are close to
additive); the structure KL depends only on (sparsity, dropped layers), the quantization KL only
on the dtype, so each is measured once. For each (dropped layers, dtype) the least pruned
feasible candidate is the best one (KL grows with sparsity), so only those are evaluated,
plus a coarse grid for the frontier plot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from edgeprune import latency
from edgeprune.errors import EdgepruneError
from edgeprune.plan import PrunePlan
from edgeprune.prune import make_plan, pruned_copy

SPARSITY_GRID = tuple(round(x, 2) for x in np.arange(0.0, 0.81, 0.05))
DROP_GRID = (0, 2, 4, 6)
FRONTIER_SPARSITIES = (0.2, 0.4, 0.6)


@dataclass
class Candidate:
    sparsity: float
    drop_layers: int
    dtype: str
    plan: PrunePlan | None  # None = the dense model
    prediction: latency.Prediction
    check: latency.TargetCheck
    kl_structure: float | None = None
    kl_quant: float | None = None

    @property
    def key(self) -> tuple[float, int]:
        return (self.sparsity, self.drop_layers)

    @property
    def quality(self) -> float:
        if self.kl_structure is None or self.kl_quant is None:
            return math.inf
        return self.kl_structure + self.kl_quant

    @property
    def label(self) -> str:
        s = "dense" if self.plan is None else f"{self.sparsity:.0%} FFN-eq"
        return s + (f", -{self.drop_layers} layers" if self.drop_layers else "") + f", {self.dtype}"

    def to_dict(self) -> dict:
        return {
            "sparsity": self.sparsity,
            "drop_layers": self.drop_layers,
            "dtype": self.dtype,
            "label": self.label,
            "widths": self.plan.widths() if self.plan else None,
            "achieved": self.plan.achieved if self.plan else None,
            "prediction": self.prediction.to_dict(),
            "targets": self.check.to_dict(),
            "kl_structure": self.kl_structure,
            "kl_quant": self.kl_quant,
            "quality_kl": None if math.isinf(self.quality) else self.quality,
        }


@dataclass
class SearchResult:
    candidates: list[Candidate]
    chosen: Candidate | None
    dense_by_dtype: dict = field(default_factory=dict)


def geometry_of(model, plan: PrunePlan | None, name: str = "") -> latency.ModelGeometry:
    dense = latency.ModelGeometry.from_model(model, name=name)
    return dense if plan is None else dense.with_layers(plan.layer_shapes(), name)


def enumerate_candidates(model, stats, base: dict, profile, dtypes, targets, align: int, seed: int = 0,
                         sparsities=SPARSITY_GRID, drops=DROP_GRID, allocation="cfsp", score="cfsp") -> list[Candidate]:
    n_layers = model.config.num_hidden_layers
    plans: dict[tuple[float, int], PrunePlan | None] = {}
    for drop in drops:
        if drop > n_layers - 2:
            continue
        for p in sparsities:
            if p == 0.0:
                if drop == 0:
                    plans[(0.0, 0)] = None
                continue
            try:
                plans[(p, drop)] = make_plan(model, stats, base, p, allocation=allocation, score=score,
                                             drop_layers=drop, align=align, seed=seed)
            except EdgepruneError:
                continue  # e.g. dropping layers alone already removes more than p asks
    out = []
    for (p, drop), plan in plans.items():
        geom = geometry_of(model, plan)
        for dtype in dtypes:
            pred = latency.predict_for_profile(geom, profile, dtype)
            out.append(Candidate(p, drop, dtype, plan, pred, latency.check_targets(pred, targets, profile.memory.budget)))
    return out


@torch.no_grad()
def dense_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.log_softmax(model(ids[i : i + 4], use_cache=False).logits.float(), -1) for i in range(0, len(ids), 4)])


def _mean_kl(dense_lp: torch.Tensor, batches) -> float:
    """Mean over tokens of KL(dense || q), natural log; `batches` yields (rows of dense_lp, log q)."""
    total, count = 0.0, 0
    for rows, lq in batches:
        lp = dense_lp[rows]
        total += float((lp.exp() * (lp - lq)).sum())
        count += lp.shape[0] * lp.shape[1]
    return total / count


@torch.no_grad()
def kl_to_dense(dense_lp: torch.Tensor, model, ids: torch.Tensor) -> float:
    """Mean over tokens of KL(dense || model) for a torch model."""
    return _mean_kl(dense_lp, ((slice(i, i + 4), torch.log_softmax(model(ids[i : i + 4], use_cache=False).logits.float(), -1))
                               for i in range(0, len(ids), 4)))


def quant_kl(dense_lp: torch.Tensor, logits_fn, ids: torch.Tensor) -> float:
    """KL(dense torch || dense exported) with a runtime's LogitsFn (llama.cpp / onnxruntime)."""
    return _mean_kl(dense_lp, ((slice(i, i + 1), torch.log_softmax(torch.from_numpy(logits_fn(row)).float(), -1)[None])
                               for i, row in enumerate(ids.numpy())))


def choose(candidates: list[Candidate], dtype_order: list[str]) -> Candidate | None:
    feasible = [c for c in candidates if c.check.ok and not math.isinf(c.quality)]
    if not feasible:
        return None
    return min(feasible, key=lambda c: (round(c.quality, 6), dtype_order.index(c.dtype), c.sparsity, c.drop_layers))


def to_evaluate(candidates: list[Candidate]) -> list[tuple[float, int]]:
    """(sparsity, drop) keys worth a structure-KL evaluation: for each (drop, dtype) the least pruned
    feasible candidate, plus a coarse grid for the frontier plot."""
    keys = set()
    by_group: dict[tuple[int, str], list[Candidate]] = {}
    for c in candidates:
        if c.check.ok:
            by_group.setdefault((c.drop_layers, c.dtype), []).append(c)
    for group in by_group.values():
        keys.add(min(group, key=lambda c: c.sparsity).key)
    for c in candidates:
        if c.sparsity in FRONTIER_SPARSITIES and c.drop_layers in (0, 2):
            keys.add(c.key)
    return sorted(keys)


def closest_miss(candidates: list[Candidate]) -> tuple[Candidate, list[str]]:
    """The candidate whose worst target miss is smallest, and per target the best value any candidate reaches."""
    best = max(candidates, key=lambda c: min(ch.margin for ch in c.check.checks))
    reach = []
    for name in {ch.name for c in candidates for ch in c.check.checks}:
        checks = [ch for c in candidates for ch in c.check.checks if ch.name == name]
        top = max(checks, key=lambda ch: ch.margin)
        if not top.ok:
            reach.append(f"{name}: the best candidate reaches {latency._fmt(name, top.value)} (limit {latency._fmt(name, top.limit)})")
    return best, reach


def structure_kls(lm, keys, dense_lp, heldout, candidates, progress=None) -> dict:
    plans = {c.key: c.plan for c in candidates}
    kls = {}
    for n, key in enumerate(keys):
        plan = plans[key]
        if plan is None:
            kls[key] = 0.0
        else:
            pruned = pruned_copy(lm.model, plan)
            kls[key] = kl_to_dense(dense_lp, pruned, heldout)
            del pruned
        if progress:
            progress(n + 1, len(keys))
    return kls
