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
    heads: bool = False  # KV groups pruned with the FFN channels under the one parameter budget

    @property
    def key(self) -> tuple[float, int, bool]:
        return (self.sparsity, self.drop_layers, self.heads)

    @property
    def quality(self) -> float:
        if self.kl_structure is None or self.kl_quant is None:
            return math.inf
        return self.kl_structure + self.kl_quant

    @property
    def label(self) -> str:
        s = "dense" if self.plan is None else f"{self.sparsity:.0%} FFN-eq" + (f" with {self.kv_removed} KV groups" if self.heads else "")
        return s + (f", -{self.drop_layers} layers" if self.drop_layers else "") + f", {self.mix}"

    @property
    def kv_removed(self) -> int:
        return 0 if self.plan is None else self.plan.kv_groups_removed()

    @property
    def mix(self) -> str:
        return mix_label(self.dtype, self.head)

    def to_dict(self) -> dict:
        return {
            "sparsity": self.sparsity,
            "drop_layers": self.drop_layers,
            "heads": self.heads,
            "kv_groups_removed": self.kv_removed,
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
                         imatrix: bool = True, shapes: str = "per-layer", heads: bool = False) -> list[Candidate]:
    """Every (structure, mix) with its predicted latency and memory on `profile`; `mix_menu` is
    `mixes(...)`'s (dtype, head override) pairs. shapes "uniform": only structures whose layers
    share one shape (what a GGUF of Qwen3 or Gemma 3 can load). heads: each sparsity also with KV
    groups pruned jointly with the FFN channels under the same parameter budget (prune --heads),
    where that removes at least one group."""
    n_layers = model.config.num_hidden_layers
    plans: dict[tuple[float, int, bool], PrunePlan | None] = {}
    for drop in drops:
        if drop > n_layers - 2:
            continue
        for p in sparsities:
            if p == 0.0:
                if drop == 0:
                    plans[(0.0, 0, False)] = None
                continue
            for kv in (False, True) if heads else (False,):
                try:
                    plan = make_plan(model, stats, base, p, method=allocation, score=score, drop_layers=drop, align=align,
                                     seed=seed, shapes=shapes, heads=kv, recover="none")  # fit tries the recoveries itself
                except EdgepruneError:
                    continue  # e.g. dropping layers alone already removes more than p asks
                if kv and not plan.kv_groups_removed():
                    continue  # no group removed: the FFN-only structure
                plans[(p, drop, kv)] = plan
    out = []
    for (p, drop, kv), plan in plans.items():
        geom = geometry_of(model, plan)
        for dtype, head in mix_menu:
            pred = latency.predict_for_profile(geom, profile, dtype, head_dtype=head, imatrix=imatrix)
            out.append(Candidate(p, drop, dtype, plan, pred, latency.check_targets(pred, targets, profile.memory.budget), head,
                                 heads=kv))
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


def dominates(a: tuple[str, str | None], b: tuple[str, str | None], fmt: str) -> bool:
    """Whether GGUF mix `a` stores every tensor in at least as many bits as mix `b` in a way its
    quantization KL is taken as a lower bound on `b`'s: the same dtype with llama.cpp's own output
    rule (Q6_K or Q8_0) against a Q5_0 output, or q8_0 against any mix with the same or a smaller
    output type. Nothing is assumed between the 4- to 6-bit types: on the Gemma 3 270M source (itself
    Q4_K_M) q4_k_m scored 0.008 nats and q5_k_m 0.016 (benchmarks/results/shipped_quality)."""
    if fmt != "gguf" or a == b or not (dtypes.get(a[0], "gguf").quantized and dtypes.get(b[0], "gguf").quantized):
        return False
    (da, ha), (db, hb) = a, b
    head_ok = ha is None or ha == hb
    return head_ok and (da == db or da == "q8_0")


def score_mixes(candidates: list[Candidate], score, fmt: str, menu: list[tuple[str, str | None]]) -> tuple[dict, dict]:
    """Quantization KLs of the mixes that can still make a finalist, each scored by `score(mix)`
    (an export, a llama.cpp quantization and a runtime pass: ~1 min each at 1B, issue #15).

    A finalist is the best pruned candidate (structure KL + quantization KL) or the best dense one
    (quantization KL), among those that meet the targets, and structure KLs are known first. A mix
    not yet scored is bounded below by the KL of a scored mix that `dominates` it (else 0): it is
    scored, lowest bound first, only while that bound could still beat a finalist. Returns
    ({mix: KL}, {mix: why it was not scored})."""
    feasible = [m for m in menu if any(c.check.ok and (c.dtype, c.head) == m for c in candidates)]
    pruned_best = {m: min((c.kl_structure for c in candidates if c.check.ok and c.plan is not None and (c.dtype, c.head) == m
                           and c.kl_structure is not None), default=math.inf) for m in feasible}
    dense_ok = {m: any(c.check.ok and c.plan is None and (c.dtype, c.head) == m for c in candidates) for m in feasible}
    quant: dict = {}

    def bound(m) -> tuple[float, str | None]:
        by = [(quant[a], a) for a in quant if dominates(a, m, fmt)]
        return max(by, key=lambda t: t[0]) if by else (0.0, None)

    def incumbents() -> tuple[float, float]:
        return (min((pruned_best[m] + quant[m] for m in quant), default=math.inf),
                min((quant[m] for m in quant if dense_ok[m]), default=math.inf))

    def reach(m) -> float:  # the best a finalist with mix m could still score
        lb, _ = bound(m)
        return min(pruned_best[m] + lb, lb if dense_ok[m] else math.inf)

    def open_(m) -> bool:
        lb, _ = bound(m)
        pruned_in, dense_in = incumbents()
        return round(pruned_best[m] + lb, 6) < round(pruned_in, 6) or (dense_ok[m] and round(lb, 6) < round(dense_in, 6))

    while pending := [m for m in feasible if m not in quant and open_(m)]:
        m = min(pending, key=lambda m: (reach(m), menu.index(m)))
        quant[m] = score(m)
    skipped = {}
    for m in feasible:
        if m not in quant:
            lb, by = bound(m)
            skipped[mix_label(*m)] = (f"cannot make a finalist: at best {reach(m):.4f} nats (" +
                                      (f"{mix_label(*by)} keeps every tensor in as many bits and scored {lb:.4f}"
                                       if by else "quantization KL >= 0") + ")")
    return quant, skipped


def choose(candidates: list[Candidate], dtype_order: list[str]) -> Candidate | None:
    feasible = [c for c in candidates if c.check.ok and not math.isinf(c.quality)]
    if not feasible:
        return None
    return min(feasible, key=lambda c: (round(c.quality, 6), dtype_order.index(c.dtype), c.head or "", c.sparsity, c.drop_layers, c.heads))


def best(candidates: list[Candidate], dtype_order: list[str], dense: bool) -> Candidate | None:
    """The best feasible dense (or pruned) candidate by the quality proxy."""
    return choose([c for c in candidates if (c.plan is None) == dense], dtype_order)


def to_evaluate(candidates: list[Candidate]) -> list[tuple[float, int, bool]]:
    """(sparsity, drop, heads) keys worth a structure-KL evaluation: for each (drop, heads, dtype) the
    least pruned feasible candidate, plus a coarse grid of FFN-only structures for the frontier plot."""
    keys = set()
    by_group: dict[tuple[int, bool, str], list[Candidate]] = {}
    for c in candidates:
        if c.check.ok:
            by_group.setdefault((c.drop_layers, c.heads, c.mix), []).append(c)
    for group in by_group.values():
        keys.add(min(group, key=lambda c: c.sparsity).key)
    for c in candidates:
        if c.sparsity in FRONTIER_SPARSITIES and c.drop_layers in (0, 2) and not c.heads:
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
