"""Sequential second-order FFN channel selection (ZipLM / SlimGPT style), run inside the lstsq refit.

The plan fixes each block's FFN *width*; this re-chooses *which* channels fill it, on the inputs
the block really sees in the pruned network (blocks 0..l-1 already pruned and refit), for the
target the refit then fits (recover.py: the dense block's output by default).

For block l, with the dense FFN put back at full width in the pruned block:
  X  [T, n]  the dense FFN's down_proj input (act(gate x) * up x) on the pruned stream, fit tokens only
  Y  [T, d]  the target the refit uses: the dense block output minus the pruned block's residual and
             attention part ("block"), or the dense down_proj output on dense inputs ("layer")
  W0 [d, n]  the dense down_proj
The refit's objective over all n columns is the quadratic
  E(W) = ||X W^T + b - Y||² + λ ||W - W0||²,   Hessian H = G + λI,  G = Xc^T Xc (centred when b is fit)
with minimiser W*. Keeping only the columns K (W_j = 0 off K) and re-solving the rest raises E by
exactly the structured-OBS amount, so the greedy removal of condition.obs_order (one column at a
time, W* and H^-1 updated by rank one) picks K. λ = SELECT_RIDGE · mean diag G.

The difference from `--score condition` (COMP-style, condition.py): that one scores on the dense
network's Gram with the dense weights as the target; this one on the pruned network's own inputs
with the refit's target, one block after another, so later blocks choose channels that also cancel
the error the earlier ones left (the sequential error feedback of SparseGPT / ZipLM).

Cost per block: one pass of the fit tokens through the block at full FFN width, an n x n Gram and
inverse (n = dense FFN width), and the greedy removal.
"""

from __future__ import annotations

import torch

from edgeprune.apply import prune_ffn
from edgeprune.calibrate import block_output
from edgeprune.condition import _ridge_inverse, obs_order

SELECT_RIDGE = 1e-2



@torch.no_grad()
def reselect_ffn(pl, dl, lp, h_p: torch.Tensor, h_out_dense: torch.Tensor, dense_y: torch.Tensor, kwargs: dict,
                 fit: torch.Tensor, target: str, intercept: bool, batch_size: int) -> dict:
    """Re-choose block `pl`'s FFN channels (same count) in place; `lp.ffn_keep` is updated to match.

    pl: the pruned block (its FFN is rebuilt from `dl`'s at the new channels; a down_proj bias the
    plan asked for is kept, zero); dl: the dense block; h_p: the pruned network's inputs to this block
    [rows, seq, d]; h_out_dense: the dense block's outputs; dense_y: the dense down_proj's outputs on
    dense inputs; fit [rows, seq] bool: the tokens to select on (the held-out ones stay unseen)."""
    width = len(lp.ffn_keep)
    mlp = pl.mlp
    kept_modules = (mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.intermediate_size)
    down = dl.mlp.down_proj
    n, d = down.in_features, down.out_features
    device = down.weight.device
    f = dict(dtype=torch.float64, device=device)
    g, xy, sx, sy, count = torch.zeros(n, n, **f), torch.zeros(n, d, **f), torch.zeros(n, **f), torch.zeros(d, **f), 0
    seen = {}
    # the dense FFN at full width inside the pruned block, for one pass (the dense modules are only read)
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = dl.mlp.gate_proj, dl.mlp.up_proj, down
    hook = down.register_forward_hook(lambda m, a, o: seen.update(x=a[0], y=o))
    try:
        for i in range(0, len(h_p), batch_size):
            out = block_output(pl(h_p[i : i + batch_size], use_cache=False, **kwargs))
            x, y = seen["x"].double(), seen["y"].double()
            want = dense_y[i : i + batch_size].double() if target == "layer" else y + (h_out_dense[i : i + batch_size].double() - out.double())
            m = fit[i : i + batch_size].to(device)
            x, want = x[m], want[m]
            g += x.T @ x
            xy += x.T @ want
            sx += x.sum(0)
            sy += want.sum(0)
            count += len(x)
    finally:
        hook.remove()
        mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.intermediate_size = kept_modules
    if intercept:  # the bias is unpenalised: solve on centred sums
        g.addr_(sx, sx, alpha=-1 / max(count, 1))
        xy.addr_(sx, sy, alpha=-1 / max(count, 1))
    lam = SELECT_RIDGE * float(g.diagonal().mean().clamp_min(1e-30))  # the λ _ridge_inverse adds
    hinv = _ridge_inverse(g, SELECT_RIDGE)
    del g
    w0t = down.weight.detach().double().T
    w_star = (hinv @ (xy + lam * w0t)).T.contiguous()  # [d, n]: the minimiser of E over all columns
    removed = set(obs_order(hinv, w_star, n - width))
    keep = [j for j in range(n) if j not in removed]
    before = list(lp.ffn_keep)
    bias = mlp.down_proj.bias
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = dl.mlp.gate_proj, dl.mlp.up_proj, down
    prune_ffn(pl, keep)  # slices copies of the dense rows/columns: the dense block is untouched
    if bias is not None:
        mlp.down_proj.bias = torch.nn.Parameter(torch.zeros_like(bias))
    lp.ffn_keep = keep
    return {"tokens": count, "changed": len(set(keep) - set(before)), "width": width}
