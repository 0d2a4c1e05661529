"""Allocation from measured sensitivity: CFSP's widths, corrected by asking the model itself.

CFSP's angular distance says how much a block changes its input, not how much the *output* of the
network suffers when that block loses channels. Here the second is measured, at the operating
point: every kept block l first gets the width w0_l that CFSP's allocation gives it (the base
network, all blocks pruned at once); then, one block at a time, block l alone is made narrower and
wider by STEP of the FFN width, w0_l - STEP and w0_l + STEP (channels taken in the plan's own score
order), and

    c_l(w) = KL(p_dense || p_{block l at w}) - KL(p_dense || p_base)     nats per token, c_l(w0_l) = 0

on the first `rows` calibration sequences. The hidden state entering block l in the base network
is cached once, so a measurement runs blocks l..L and the head only. Measuring around the widths
that will actually ship, with every other block already pruned, captures how errors compound; a
measurement against the dense network (every other block whole) does not: on SmolLM2-135M at 30%
that variant cut single blocks to 96 channels and lost 13% of perplexity to CFSP.

The widths then solve a budgeted choice within that trust region (a multiple-choice knapsack, exact
by dynamic programming):

    minimise  sum_l c_l(w_l)   subject to  sum_l w_l = sum_l w0_l,   w_l in [w0_l - STEP, w0_l + STEP]

with c_l linear between the three measured points, on multiples of `align`, and made
non-increasing in w. Adding the per-block costs assumes their effects add up near the operating
point (first order), which is why the region is kept small. benchmarks/prune_quality.py measures
the result against CFSP's allocation on held-out text.

Switching a channel off is exact: every family's FFN computes down(act(gate(x)) * up(x)), so a zero
row of up_proj removes channel j's contribution without changing any shape (the rows are restored).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from edgeprune import arch
from edgeprune.calibrate import embed, rotary, run_block
from edgeprune.errors import EdgepruneError

STEP = 0.125  # of the FFN width: how far one block may move from CFSP's width (the trust region)
ROWS = 2  # calibration sequences the KL is measured on (cost grows linearly with them)
CHUNK = 256  # tokens per head evaluation: a 262k-vocabulary head (Gemma 3) stays at ~0.3 GB a chunk


def _head_logprobs(model, hidden: torch.Tensor) -> torch.Tensor:
    logits = model.lm_head(model.model.norm(hidden)).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.log_softmax(logits, -1)


def _kl(model, dense_lp: torch.Tensor, hidden: torch.Tensor) -> float:
    """Mean KL(p_dense || p) per token, p from `hidden` through the final norm and head, in chunks."""
    h = hidden.reshape(-1, hidden.shape[-1])
    total = 0.0
    for i in range(0, len(h), CHUNK):
        lp = _head_logprobs(model, h[i : i + CHUNK])
        ref = dense_lp[i : i + CHUNK]
        total += float((ref.exp() * (ref - lp)).sum())
    return total / len(h)


def _dense_logprobs(model, hidden: torch.Tensor) -> torch.Tensor:
    h = hidden.reshape(-1, hidden.shape[-1])
    return torch.cat([_head_logprobs(model, h[i : i + CHUNK]) for i in range(0, len(h), CHUNK)])


def _run(layers, hidden, position):
    for layer in layers:
        hidden = run_block(layer, hidden, position)
    return hidden


def _switch_off(up, saved, order, width):
    up.data.copy_(saved)
    up.data[torch.tensor(order[width:], dtype=torch.long)] = 0


@torch.no_grad()
def measure(model, ids: torch.Tensor, kept: list[int], orders: dict[int, list[int]], base_widths: dict[int, int], align: int,
            lo: int, step: float = STEP, rows: int = ROWS, progress=None) -> dict:
    """c_l(w) at w0_l -/+ step for every kept layer index l (module docstring). `orders[l]`: block
    l's FFN channels best first; `base_widths[l]`: w0_l. The model is left as it was."""
    if ids is None or len(ids) == 0:
        raise EdgepruneError("the sensitivity allocation measures the model on calibration tokens: pass the calibration ids")
    start = time.perf_counter()
    x = ids[:rows]
    layers = arch.layers(model)
    n = layers[kept[0]].mlp.down_proj.in_features
    delta = max(align, int(round(step * n / align)) * align)
    hidden = embed(model, x)
    position = rotary(model, x.shape[1], hidden[:1])
    dense_lp = _dense_logprobs(model, _run(list(layers), hidden, position))
    saved = {i: layers[i].mlp.up_proj.weight.data.clone() for i in kept}
    widths, costs = {}, {}
    try:
        for i in kept:
            _switch_off(layers[i].mlp.up_proj.weight, saved[i], orders[i], base_widths[i])
        inputs = []  # the hidden state entering each kept layer in the base network
        h = hidden
        for i in kept:
            inputs.append(h)
            h = _run([layers[i]], h, position)
        base_kl = _kl(model, dense_lp, h)
        total, done = 2 * len(kept), 0
        for pos, i in enumerate(kept):
            w0 = base_widths[i]
            ws = [w for w in (w0 - delta, w0 + delta) if lo <= w <= n]
            cs = []
            for w in ws:
                _switch_off(layers[i].mlp.up_proj.weight, saved[i], orders[i], w)
                cs.append(_kl(model, dense_lp, _run([layers[j] for j in kept[pos:]], inputs[pos], position)) - base_kl)
                done += 1
                if progress:
                    progress(done, total)
            _switch_off(layers[i].mlp.up_proj.weight, saved[i], orders[i], w0)
            widths[i], costs[i] = ws, cs
    finally:
        for i in kept:
            layers[i].mlp.up_proj.weight.data.copy_(saved[i])
    return {"widths": widths, "kl": costs, "base_widths": dict(base_widths), "base_kl": base_kl, "tokens": int(x.numel()),
            "rows": int(len(x)), "step": delta, "seconds": time.perf_counter() - start}


def cost_curve(widths: list[int], costs: list[float], w0: int, align: int) -> tuple[int, np.ndarray]:
    """(first width, c(w) at first, first + align, ...): linear through the measured points and
    (w0, 0) over their span, non-increasing in w."""
    xs = np.array(sorted(list(widths) + [w0]), dtype=np.float64)
    ys = np.array([dict(zip(widths, costs)).get(int(x), 0.0) for x in xs], dtype=np.float64)
    grid = np.arange(xs[0], xs[-1] + 1, align, dtype=np.float64)
    c = np.interp(grid, xs, ys)
    return int(xs[0]), np.minimum.accumulate(c)  # wider never costs more (a rise there is noise: flattened)


def allocate_widths(curves: list[tuple[int, np.ndarray]], align: int, budget: int) -> list[int]:
    """One width per curve (its first width + k * align) summing to `budget` channels that minimises
    the summed cost: exact dynamic programming over the layers, in units of `align`."""
    units = int(round(budget / align))
    lo_u = [first // align for first, _ in curves]
    hi_u = [first // align + len(c) - 1 for first, c in curves]
    if not sum(lo_u) <= units <= sum(hi_u):
        raise EdgepruneError(f"the FFN budget of {budget} channels cannot be split over {len(curves)} blocks within their ranges")
    best = np.full(units + 1, np.inf)
    best[0] = 0.0
    choice = np.zeros((len(curves), units + 1), dtype=np.int64)
    for li, (first, curve) in enumerate(curves):
        nxt = np.full(units + 1, np.inf)
        for k, cost in enumerate(curve):
            u = first // align + k
            if u > units:
                break
            cand = np.full(units + 1, np.inf)
            cand[u:] = best[: units + 1 - u] + cost
            better = cand < nxt
            nxt[better] = cand[better]
            choice[li][better] = u
        best = nxt
    out, u = [], units
    for li in range(len(curves) - 1, -1, -1):
        out.append(int(choice[li][u]) * align)
        u -= int(choice[li][u])
    return out[::-1]
