"""Block-wise tuning after the lstsq refit (`lstsq_tune` epochs): gradient steps on one pruned block's
FFN -- gate, up and down together, which no closed form reaches -- towards the dense block's output.

Per block l, after its refit, on the same calibration tokens and the same held-out rows:
  x_t   the FFN's input in the pruned network (fixed: the attention before it does not train)
  r_t   the rest of the block output, out_t - post(FFN(x_t)), post = the family's post-FFN norm or identity
  y_t   the dense block's output on the dense inputs (lstsq's "block" target)
  loss  mean over fit tokens of w_t ||r_t + post(FFN_θ(x_t)) - y_t||²,  w_t = token_weights(y_t) (below)
An FFN acts on each token alone, so the fit tokens are shuffled as independent samples (mini-batches
of TUNE_TOKENS). Adam, TUNE_LR, `epochs` passes, or fewer tokens where a block is large (TUNE_WORK). After every pass the held-out loss is measured;
the block keeps its best weights, and the refit ones when no pass beat them (never worse on held-out
rows, like the refit itself).

Why: the refit solves down_proj alone; the kept channels' gate and up rows still compute what they
computed in the dense block, although the channels that worked with them are gone.
"""

from __future__ import annotations

import time

import torch

from edgeprune.calibrate import block_output

TUNE_LR = 1e-3  # measured on SmolLM2-135M at 31.7 % FFN: 1e-4 53.10, 1e-3 52.33, 2e-3 (8 epochs, overfitting after 3) 53.24
TUNE_TOKENS = 512
# at most this many (trained parameters x tokens seen) per block: SmolLM2-135M's 4 epochs of 12k tokens
# (<= 1.3e11) are within it; a Llama-3.2-1B block (50M FFN parameters) gets about one epoch of fit's 3k
# tokens, ~10 s, so the tuning adds minutes, not the ~10 that 4 epochs would add to its 25-minute fit
TUNE_WORK = 1.5e11


def token_weights(h: torch.Tensor) -> torch.Tensor:
    """1 / mean square of each token's dense block output [..., d] -> [...]: the next block's RMSNorm
    divides each token by its size, so an error counts by its size relative to the token's. Unweighted,
    one token dominates: SmolLM2's first position holds 97% of layer 15's squared output norm. (The
    same weights in the lstsq refit itself changed nothing: SmolLM2-135M at 31.7% FFN, ppl 53.61 ->
    53.59, so the refit stays unweighted.)"""
    ms = h.double().pow(2).mean(-1)
    return 1 / (ms + 1e-6 * float(ms.mean().clamp_min(1e-30)))



def _ffn_io(block, h: torch.Tensor, kwargs: dict, post, batch_size: int):
    """(FFN inputs, the rest of the block output) of `block` on inputs `h`, flattened to tokens."""
    seen = {}
    pre = block.mlp.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    hook = block.mlp.register_forward_hook(lambda m, a, o: seen.update(y=o))
    xs, rest = [], []
    try:
        for i in range(0, len(h), batch_size):
            out = block_output(block(h[i : i + batch_size], use_cache=False, **kwargs))
            xs.append(seen["x"].reshape(-1, seen["x"].shape[-1]))
            rest.append((out - post(seen["y"])).reshape(-1, out.shape[-1]))
    finally:
        pre.remove()
        hook.remove()
    return torch.cat(xs), torch.cat(rest)


def tune_ffn(block, h_p: torch.Tensor, h_out_dense: torch.Tensor, kwargs: dict, fit: torch.Tensor, held_rows: torch.Tensor,
             held_mask: torch.Tensor, epochs: int, batch_size: int, post=None, seed: int = 0) -> dict:
    """Tune `block`'s FFN in place (see the module docstring); returns the held-out losses and what was kept.

    h_p [rows, seq, d]: the block's inputs in the pruned network; h_out_dense: the dense block outputs;
    fit [rows, seq] bool: the fit tokens; held_rows / held_mask: the held-out rows and their tokens;
    post: the post-FFN norm module or None."""
    start = time.perf_counter()
    post = post if post is not None else (lambda t: t)
    mlp = block.mlp
    params = [p for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj) for p in lin.parameters()]
    with torch.no_grad():
        x, rest = _ffn_io(block, h_p, kwargs, post, batch_size)
        y = h_out_dense.reshape(-1, h_out_dense.shape[-1])
        w = token_weights(y)
        held = torch.zeros(h_p.shape[:2], dtype=torch.bool, device=h_p.device)
        held[held_rows.to(h_p.device)] = held_mask.to(h_p.device)
        fit_idx, held_idx = fit.to(h_p.device).reshape(-1).nonzero().squeeze(1), held.reshape(-1).nonzero().squeeze(1)
        w = (w / w[fit_idx].mean()).to(x.dtype)

    def loss_on(idx: torch.Tensor) -> torch.Tensor:
        pred = rest[idx] + post(mlp(x[idx]))
        return (w[idx] * (pred - y[idx]).pow(2).sum(-1)).mean()

    @torch.no_grad()
    def heldout() -> float:
        return float(sum(loss_on(held_idx[i : i + 4096]) * len(held_idx[i : i + 4096]) for i in range(0, len(held_idx), 4096))
                     / max(len(held_idx), 1))

    flags = [p.requires_grad for p in params]
    best_loss, before = None, None
    saved = [p.detach().clone() for p in params]
    g = torch.Generator().manual_seed(seed)
    losses, tokens_seen = [], 0
    try:
        before = best_loss = heldout()
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=TUNE_LR)
        budget = min(epochs * len(fit_idx), max(TUNE_TOKENS, int(TUNE_WORK / sum(p.numel() for p in params))))
        while budget > 0:
            order = fit_idx[torch.randperm(len(fit_idx), generator=g).to(fit_idx.device)][:budget]
            budget -= len(order)
            tokens_seen += len(order)
            with torch.enable_grad():
                for i in range(0, len(order), TUNE_TOKENS):
                    loss = loss_on(order[i : i + TUNE_TOKENS])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            losses.append(heldout())
            if losses[-1] < best_loss * (1 - 1e-6):
                best_loss = losses[-1]
                saved = [p.detach().clone() for p in params]
    finally:
        with torch.no_grad():
            for p, s, flag in zip(params, saved, flags):
                p.copy_(s)
                p.requires_grad_(flag)
                p.grad = None
    return {"heldout_before": before, "heldout_after": best_loss, "heldout_by_epoch": losses, "tokens": tokens_seen,
            "kept": best_loss < before, "seconds": time.perf_counter() - start}
