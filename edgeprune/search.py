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
from dataclasses import dataclass

import numpy as np
import torch

from edgeprune import arch, dtypes, latency
from edgeprune.errors import EdgepruneError
from edgeprune.geometry import ModelGeometry
from edgeprune.plan import PrunePlan
from edgeprune.apply import masked
from edgeprune.prune import make_plan

SPARSITY_GRID = tuple(round(x, 2) for x in np.arange(0.0, 0.81, 0.05))
DROP_GRID = (0, 2, 4, 6)
FRONTIER_SPARSITIES = (0.2, 0.4, 0.6)
# Mixed precision: besides llama.cpp's own rule for the output projection (Q6_K, or Q8_0 for rows
# that are not whole 256-blocks), the search tries it in Q5_0. The tied embedding of a small model
# is a large share of the bytes read per decoded token (28M of SmolLM2-135M's 135M parameters),
# so a smaller head buys speed that pruning would otherwise have to buy with layers.
HEAD_VARIANTS = (None, "q5_0")


def mix_label(dtype: str, head: str | None) -> str:
    return dtype + (f"-output-{head}" if head else "")


def mixes(dtypes_: list[str], fmt: str) -> list[tuple[str, str | None]]:
    """(dtype, head override) pairs the search tries: each profile dtype with llama.cpp's own output
    rule, and for quantized GGUF dtypes each HEAD_VARIANTS override too (llama.cpp's rule always
    stores the output in Q6_K or Q8_0, more bits than the variants)."""
    return [(d, h) for d in dtypes_ for h in (HEAD_VARIANTS if fmt == "gguf" and dtypes.get(d, "gguf").quantized else (None,))]


@dataclass
class Candidate:
    sparsity: float
    drop_layers: int
    dtype: str
    plan: PrunePlan | None  # None = the dense model
    prediction: latency.Prediction
    check: latency.TargetCheck
    head: str | None = None  # storage override of the output projection (mixed precision)
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
        return s + (f", -{self.drop_layers} layers" if self.drop_layers else "") + f", {self.mix}"

    @property
    def mix(self) -> str:
        return mix_label(self.dtype, self.head)

    def to_dict(self) -> dict:
        return {
            "sparsity": self.sparsity,
            "drop_layers": self.drop_layers,
            "dtype": self.dtype,
            "head": self.head,
            "mix": self.mix,
            "label": self.label,
            "widths": self.plan.widths() if self.plan else None,
            "achieved": self.plan.achieved if self.plan else None,
            "prediction": self.prediction.to_dict(),
            "targets": self.check.to_dict(),
            "kl_structure": self.kl_structure,
            "kl_quant": self.kl_quant,
            "quality_kl": None if math.isinf(self.quality) else self.quality,
        }


def geometry_of(model, plan: PrunePlan | None) -> ModelGeometry:
    """A candidate's geometry: the plan's own (no model is built), or the dense model's."""
    return arch.geometry(model) if plan is None else plan.geometry()


def enumerate_candidates(model, stats, base: dict, profile, mix_menu, targets, align: int, seed: int = 0,
                         sparsities=SPARSITY_GRID, drops=DROP_GRID, allocation="cfsp", score="cfsp",
                         imatrix: bool = True, shapes: str = "per-layer") -> list[Candidate]:
    """Every (structure, mix) with its predicted latency and memory on `profile`; `mix_menu` is
    `mixes(...)`'s (dtype, head override) pairs. shapes "uniform": only structures whose layers
    share one shape (what a GGUF of Qwen3 or Gemma 3 can load)."""
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
                plans[(p, drop)] = make_plan(model, stats, base, p, method=allocation, score=score,
                                             drop_layers=drop, align=align, seed=seed, shapes=shapes,
                                             recover="none")  # fit tries the recoveries itself
            except EdgepruneError:
                continue  # e.g. dropping layers alone already removes more than p asks
    out = []
    for (p, drop), plan in plans.items():
        geom = geometry_of(model, plan)
        for dtype, head in mix_menu:
            pred = latency.predict_for_profile(geom, profile, dtype, head_dtype=head, imatrix=imatrix)
            out.append(Candidate(p, drop, dtype, plan, pred, latency.check_targets(pred, targets, profile.memory.budget), head))
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
    return min(feasible, key=lambda c: (round(c.quality, 6), dtype_order.index(c.dtype), c.head or "", c.sparsity, c.drop_layers))


def best(candidates: list[Candidate], dtype_order: list[str], dense: bool) -> Candidate | None:
    """The best feasible dense (or pruned) candidate by the quality proxy."""
    return choose([c for c in candidates if (c.plan is None) == dense], dtype_order)


def to_evaluate(candidates: list[Candidate]) -> list[tuple[float, int]]:
    """(sparsity, drop) keys worth a structure-KL evaluation: for each (drop, dtype) the least pruned
    feasible candidate, plus a coarse grid for the frontier plot."""
    keys = set()
    by_group: dict[tuple[int, str], list[Candidate]] = {}
    for c in candidates:
        if c.check.ok:
            by_group.setdefault((c.drop_layers, c.mix), []).append(c)
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
            reach.append(f"{name}: the best candidate reaches {latency.format_value(name, top.value)} (limit {latency.format_value(name, top.limit)})")
    return best, reach


def structure_kls(lm, keys, dense_lp, heldout, candidates, progress=None) -> dict:
    plans = {c.key: c.plan for c in candidates}
    kls = {}
    for n, key in enumerate(keys):
        plan = plans[key]
        if plan is None:
            kls[key] = 0.0
        else:
            with masked(lm.model, plan) as pruned:
                kls[key] = kl_to_dense(dense_lp, pruned, heldout)
        if progress:
            progress(n + 1, len(keys))
    return kls
