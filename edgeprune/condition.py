"""COMP's fine stage: the matrix-condition neuron metric (design and derivation in methods.py's docstring)."""

from __future__ import annotations

import math
import weakref

import torch

from edgeprune.errors import EdgepruneError

CONDITION_RIDGE = 1e-3
CONDITION_CHUNK = 64


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
    return obs_order(_ridge_inverse(g, ridge), layer.mlp.down_proj.weight.detach().double().clone(), n_remove, chunk)


def obs_order(m: torch.Tensor, w: torch.Tensor, n_remove: int, chunk: int = CONDITION_CHUNK) -> list[int]:
    """Greedy structured-OBS removal of `n_remove` input columns of `w` [d, n] (float64; consumed) for the quadratic E(W) = (W - W*) H (W - W*)^T, W* = `w`, M = H^-1 = `m` [n, n]: removing
    column j and re-solving the others raises E by ||w[:, j]||² / M_jj, and the survivors become
    w - w[:, j] M[j, :] / M_jj (ZipLM / SlimGPT). Positions in the returned order are column indices."""
    n = m.shape[0]
    alive = torch.arange(n, device=m.device)
    order: list[int] = []
    while len(order) < n_remove:
        c = min(chunk, n_remove - len(order))
        diag = m.diagonal().clone()
        wn = w.pow(2).sum(0)
        f = torch.zeros(c, len(alive), dtype=torch.float64, device=m.device)  # rank-one factors: current M = m - f^T f
        gone = torch.zeros(len(alive), dtype=torch.bool, device=m.device)
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
