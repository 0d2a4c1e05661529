"""How many FFN channels each block keeps.

CFSP's coarse step: block importance D_l (mean angular distance between a block's input and
output) becomes a keep ratio

    s_l = sigmoid(tau * (D_l - mean D))
    k_l = s_l / mean(s) * (1 - p)                 (mean keep ratio exactly 1 - p)

If the largest k_l would exceed 1 the spread around the mean is shrunk (mean preserved), then
every k_l is clamped to [min_keep, 1]. Widths are k_l * n rounded to a multiple of `align`
(32 for Q4_0/Q8_0 GGUF, 256 for K-quants, 128 in the paper) by largest remainder, so the total
hits the channel budget as closely as the alignment allows.
"""

from __future__ import annotations

import math

import numpy as np

from edgeprune.errors import EdgepruneError

ALLOCATIONS = ("cfsp", "uniform", "sensitivity")  # sensitivity: measured per-block cost (sensitivity.py)
DEFAULT_TEMPERATURE = 20.0  # chosen on SmolLM2-135M (benchmarks/prune_quality.py sweeps it)


def cfsp_keep_ratios(importance: list[float], keep_mean: float, temperature: float = DEFAULT_TEMPERATURE, min_keep: float = 0.05) -> np.ndarray:
    d = np.asarray(importance, dtype=np.float64)
    s = 1.0 / (1.0 + np.exp(-temperature * (d - d.mean())))
    k = s / s.mean() * keep_mean
    if k.max() > 1.0:  # shrink the spread so the most important block keeps exactly everything
        k = keep_mean + (k - keep_mean) * (1.0 - keep_mean) / (k.max() - keep_mean)
    return np.clip(k, min_keep, 1.0)


def uniform_keep_ratios(n_blocks: int, keep_mean: float) -> np.ndarray:
    return np.full(n_blocks, keep_mean, dtype=np.float64)


def round_widths(ratios: np.ndarray, full: int, align: int, budget: int, min_width: int | None = None) -> list[int]:
    """Widths that are multiples of `align`, within [min_width, full], summing as close to `budget` as possible."""
    if align < 1 or full % align:
        raise EdgepruneError(f"--align {align} must divide the FFN width {full}")
    lo = max(align, min_width or align)
    lo = math.ceil(lo / align) * align
    n = len(ratios)
    if budget < n * lo - align // 2:
        raise EdgepruneError(
            f"the sparsity asks for {budget} FFN channels over {n} blocks, below the minimum of {lo} per block "
            f"(--align {align}): lower --sparsity or --drop-layers"
        )
    budget = min(budget, n * full)
    raw = np.clip(ratios * full, lo, full)
    raw = raw * budget / raw.sum()  # re-scale after clamping so the budget is what gets rounded
    widths = np.clip(np.floor(raw / align) * align, lo, full).astype(int)
    remainder = raw - widths
    while budget - widths.sum() >= align / 2:
        room = np.where(widths + align <= full, remainder, -np.inf)
        i = int(np.argmax(room))
        if not np.isfinite(room[i]):
            break
        widths[i] += align
        remainder[i] -= align
    while widths.sum() - budget > align / 2:
        room = np.where(widths - align >= lo, -remainder, -np.inf)
        i = int(np.argmax(room))
        if not np.isfinite(room[i]):
            break
        widths[i] -= align
        remainder[i] += align
    return [int(w) for w in widths]
