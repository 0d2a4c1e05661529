"""Recovery after structural removal: what the remaining weights do about what was cut.

All closed-form recoveries work on the *consuming* matrix of a pruned unit -- down_proj for FFN
channels, o_proj for attention (the query-head channels of removed KV groups). K = kept input
channels, P = pruned ones, W = the dense consuming matrix (d x n), X its input (tokens x n).
bias and mask use the dense model's calibration statistics at that input (see calibrate.py):
sums, means, and for mask the Gram G = X^T X (float64). T = calibration tokens, mu = mean of X.

  bias   (FLAP)  b += W[:, P] @ mu[P]: each pruned channel is replaced by its calibration mean.
                 The layer's output error drops by T·||W_P mu_P||² (never rises).
  lstsq  (FASP, with sequential error feedback as in SparseGPT / ZipLM) refit the kept columns on
                 the *pruned* network's own inputs, block after block: the calibration tokens run
                 through the already pruned-and-refit blocks 0..l-1, so block l is fit on the inputs
                 it will really see. Per pruned consumer (o_proj first when KV groups went, then
                 down_proj), with X_p its input in the pruned network, Y the target (below) and W0
                 the kept columns:
                     W <- argmin ||X_p W^T + b - Y||² + λ ||W - W0||²      (b unpenalised, float64)
                 i.e. ridge towards the kept weights, not towards zero. λ = r · mean diag of the
                 (centred) Gram of X_p, r chosen per consumer from `lstsq_ridge` (default grid
                 1e-3, 1e-2, 1e-1, 1) by the *held-out* error of the dense block's output: every
                 4th calibration row is held out (the last quarter of positions when there is one
                 row), the rest is fit. "unchanged" (λ = ∞) is always a candidate and wins unless a
                 finite λ strictly lowers the held-out error, so by construction the refit never
                 makes a block's held-out error worse. The report lists, per block, the chosen λ
                 and the held-out error before/after, and says "lstsq cannot help here" when every
                 block was left unchanged.
                 `lstsq_inputs="dense"` is the one-pass FASP variant on the dense Gram instead:
                     W_K <- W G[:, K] (G[K, K] + λI)^-1,     λ = ridge · mean(diag G[K, K])
                 (kept for comparison). With `lstsq_intercept` (default) a bias is fitted jointly.
                 Options of the sequential refit, each measured side by side in
                 benchmarks/prune_quality.py before it could become a default:
                   `lstsq_select="obs"`  re-choose which FFN channels fill each block's width by
                       sequential structured OBS on the block's pruned inputs (reselect.py; ZipLM /
                       SlimGPT); the plan's ffn_keep is updated to match.
                   `lstsq_tune=E`  then E epochs of Adam on each refit block's whole FFN (gate, up,
                       down) towards the dense block output, kept only where held-out rows improve
                       (blocktune.py).
                 Measured on SmolLM2-135M (fp32, CFSP FFN pruning, 16 x 512 WikiText-2 valid tokens,
                 perplexity on 8 x 512 test windows, dense 30.15), none / dense one-pass / pruned
                 inputs: 20 % 39.8 / 42.0 / 38.0, 30 % 48.2 / 49.6 / 43.1, 50 % 98.5 / 69.9 / 61.6;
                 the refit took 60-90 s on one CPU thread (about 3 calibration passes).
  mask   (COMP)  one scale s_k per kept channel, least squares on the dense layer output:
                     (G[K,K] ∘ W_K^T W_K + λI) s = (G[K,:] ∘ W_K^T W) 1 + λ·1
                 (ridge λ = ridge · mean diagonal shrinks s toward 1 -- the variance cap), then
                 s is clipped to `mask_clip` (default [0.5, 2]) and folded into W_K's columns.
                 `mask_intercept` also fits a bias (the same solve on the centred Gram).
  lora   (CFSP's IG-LoRA) low-rank adapters B·A on every linear layer of the kept blocks, rank
                 of block l = lora_rank · w_l (rounded, >= 1) with w_l = D_l / mean D ("importance",
                 default), (1/D_l) / mean(1/D) ("inverse") or 1 ("uniform"); D_l = angular
                 distance of the dense block. A few hundred AdamW steps (lora_batch rows of
                 lora_seqlen tokens, warm-up then linear decay) of next-token loss on the
                 calibration token ids, then W += (alpha/r)·B·A is merged: the saved model is a
                 plain Llama again (no adapter modules, same shapes).
                 Cost on SmolLM2-135M, measured on the shared 2-core CPU (1 torch thread, load ~5):
                 ~8 s per step of 2 x 128 tokens, so `--lora-steps 30` takes ~4 min and the default
                 200 steps ~30 min there; the base weights are frozen, so backward computes input
                 gradients only (about one extra forward).

bias and mask use only the dense statistics (one calibration pass, as FLAP does); lstsq needs the
calibration token ids (`needs()`), like lora and kd. Closed-form steps run before lora or kd when
combined (e.g. "bias+lora", "lstsq+kd").
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from edgeprune import arch
from edgeprune.blocktune import tune_ffn
from edgeprune.calibrate import CalibrationStats, ChannelStats, block_kwargs, block_output, calibrate, embed, rotary
# LoRA lives in distill.py (kd_lora_rank trains adapters too); IG-LoRA below reuses it, and
# LoRALinear stays importable from here
from edgeprune.distill import KD_DEFAULTS, KD_LORA_LR, LoRALinear, attach_lora, distill, merge_lora  # noqa: F401
from edgeprune.errors import EdgepruneError
from edgeprune.offload import to_device, visiting
from edgeprune.plan import PrunePlan
from edgeprune.reselect import reselect_ffn

CLOSED_FORM = ("bias", "lstsq", "mask")  # the recoveries solved in closed form from calibration data, one block at a time

# lstsq's block-wise tuning (blocktune.py) by default: measured on SmolLM2-135M (benchmarks/prune_quality.py
# protocol) it lowered perplexity at 31.7 % and 49.2 % FFN sparsity (53.61 -> 52.33, 73.49 -> 70.02) and left
# 21.4 % as it was (45.53 -> 45.52), for ~3 s a block (large blocks see fewer tokens: blocktune.TUNE_WORK)
LSTSQ_TUNE_EPOCHS = 4
DEFAULTS = {
    "bias": {},
    "lstsq": {"lstsq_ridge": "auto", "lstsq_intercept": True, "lstsq_inputs": "pruned", "lstsq_target": "block", "lstsq_select": "plan",
              "lstsq_tune": LSTSQ_TUNE_EPOCHS},
    "mask": {"mask_ridge": 1e-2, "mask_clip": [0.5, 2.0], "mask_intercept": False},
    "lora": {"lora_steps": 200, "lora_rank": 8, "lora_lr": 5e-4, "lora_batch": 2, "lora_seqlen": 128, "lora_direction": "importance",
             "lora_alpha": 2.0, "lora_seed": 0},
    "kd": dict(KD_DEFAULTS),
}
KD_HELDOUT_FRACTION = 8  # kd keeps 1/8 of the calibration rows (at least 1) apart to decide whether it helped
LORA_DIRECTIONS = ("importance", "inverse", "uniform")
LSTSQ_GRID = (1e-3, 1e-2, 1e-1, 1.0)  # "auto": ridge strengths tried per consumer (x mean diag of its Gram), besides "unchanged"
LSTSQ_DENSE_RIDGE = 1e-2  # lstsq_inputs="dense" with lstsq_ridge "auto": the one fixed ridge of the one-pass FASP solve
LSTSQ_HELDOUT_EVERY = 4  # lstsq holds every 4th calibration row out to choose the ridge
LSTSQ_INPUTS = ("pruned", "dense")
LSTSQ_TARGETS = ("block", "layer")
LSTSQ_SELECT = ("plan", "obs")  # which FFN channels the refit keeps: the plan's, or re-chosen by sequential OBS (reselect.py)


def _steps(recover: str | None) -> list[str]:
    return [s for s in (recover or "none").split("+") if s and s != "none"]


def check_recover_args(steps: list[str], args: dict) -> dict:
    """The arguments of the chosen steps with defaults filled in; unknown or out-of-range ones refused."""
    known = {k for s in DEFAULTS.values() for k in s}
    unknown = sorted(set(args) - known)
    if unknown:
        raise EdgepruneError(f"unknown recovery argument(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    out = {}
    for s in steps:
        for k, v in DEFAULTS[s].items():
            out[k] = args[k] if args.get(k) is not None else v
    extra = sorted(k for k in args if k not in out and args[k] is not None)
    if extra:
        raise EdgepruneError(f"recovery argument(s) {', '.join(extra)} do not apply to --recover {'+'.join(steps) or 'none'}")
    if "lora_steps" in out and (not isinstance(out["lora_steps"], int) or out["lora_steps"] < 1):
        raise EdgepruneError(f"--lora-steps must be a positive integer, got {out['lora_steps']}")
    if "lora_rank" in out and (not isinstance(out["lora_rank"], int) or out["lora_rank"] < 1):
        raise EdgepruneError(f"--lora-rank must be a positive integer, got {out['lora_rank']}")
    if "lora_batch" in out and out["lora_batch"] < 1:
        raise EdgepruneError(f"lora_batch must be >= 1, got {out['lora_batch']}")
    if "lora_seqlen" in out and out["lora_seqlen"] < 8:
        raise EdgepruneError(f"lora_seqlen must be >= 8, got {out['lora_seqlen']}")
    if "lora_lr" in out and not out["lora_lr"] > 0:
        raise EdgepruneError(f"lora_lr must be positive, got {out['lora_lr']}")
    if out.get("lora_direction", "importance") not in LORA_DIRECTIONS:
        raise EdgepruneError(f"lora_direction must be one of {', '.join(LORA_DIRECTIONS)}, got {out['lora_direction']}")
    if "mask_clip" in out:
        lo, hi = out["mask_clip"]
        if not 0 <= lo <= 1 <= hi:
            raise EdgepruneError(f"mask_clip must be [lo, hi] with 0 <= lo <= 1 <= hi, got {out['mask_clip']}")
        out["mask_clip"] = [float(lo), float(hi)]
    if "kd_seconds" in out and not (isinstance(out["kd_seconds"], (int, float)) and 0 < out["kd_seconds"] < 86_400):
        raise EdgepruneError(f"--recover-time must be between 0 and 24 hours, got {out['kd_seconds']}")
    if "kd_seconds" in out:
        _check_kd(out, args)
    if "mask_ridge" in out and not out["mask_ridge"] >= 0:
        raise EdgepruneError(f"mask_ridge must be >= 0, got {out['mask_ridge']}")
    if "lstsq_ridge" in out:
        out["lstsq_ridge"] = _check_ridge(out["lstsq_ridge"])
    if out.get("lstsq_inputs", "pruned") not in LSTSQ_INPUTS:
        raise EdgepruneError(f"lstsq_inputs must be one of {', '.join(LSTSQ_INPUTS)}, got {out['lstsq_inputs']}")
    if out.get("lstsq_target", "block") not in LSTSQ_TARGETS:
        raise EdgepruneError(f"lstsq_target must be one of {', '.join(LSTSQ_TARGETS)}, got {out['lstsq_target']}")
    if out.get("lstsq_select", "plan") not in LSTSQ_SELECT:
        raise EdgepruneError(f"lstsq_select must be one of {', '.join(LSTSQ_SELECT)}, got {out['lstsq_select']}")
    tune = out.get("lstsq_tune", 0)
    if not (isinstance(tune, int) and not isinstance(tune, bool) and 0 <= tune <= 100):
        raise EdgepruneError(f"lstsq_tune must be a whole number of epochs from 0 (off) to 100, got {tune}")
    if out.get("lstsq_inputs", "pruned") != "pruned":
        for key, plain in (("lstsq_select", "plan"), ("lstsq_tune", 0)):
            if out.get(key, plain) != plain:
                raise EdgepruneError(f"{key}={out[key]} works on the pruned network's inputs: it needs lstsq_inputs=pruned")
    return dict(sorted(out.items()))


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_kd(out: dict, args: dict) -> None:
    """kd's arguments, in place; kd_lr given for neither mode follows kd_lora_rank (see KD_LORA_LR)."""
    if not (_is_number(out["kd_lr"]) and out["kd_lr"] > 0):
        raise EdgepruneError(f"kd_lr must be a positive number, got {out['kd_lr']}")
    if not (isinstance(out["kd_batch"], int) and not isinstance(out["kd_batch"], bool) and out["kd_batch"] >= 1):
        raise EdgepruneError(f"kd_batch must be a positive integer, got {out['kd_batch']}")
    if not (_is_number(out["kd_hidden"]) and out["kd_hidden"] >= 0):
        raise EdgepruneError(f"kd_hidden must be a number >= 0 (the weight of hidden-state matching; 0 turns it off), got {out['kd_hidden']}")
    if not (isinstance(out["kd_lora_rank"], int) and not isinstance(out["kd_lora_rank"], bool) and out["kd_lora_rank"] >= 0):
        raise EdgepruneError(f"kd_lora_rank must be an integer >= 0 (0 trains the kept weights fully), got {out['kd_lora_rank']}")
    out["kd_hidden"] = float(out["kd_hidden"])
    if out["kd_lora_rank"] and args.get("kd_lr") is None:
        out["kd_lr"] = KD_LORA_LR


def _check_ridge(v):
    """lstsq_ridge: "auto" (the LSTSQ_GRID), one number >= 0, or a list of them (the grid to choose from)."""
    if v == "auto":
        return v
    vals = v if isinstance(v, (list, tuple)) else [v]
    ok = bool(vals) and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0 for x in vals)
    if not ok:
        raise EdgepruneError(f"lstsq_ridge must be 'auto', a number >= 0 or a list of them, got {v}")
    return [float(x) for x in vals] if isinstance(v, (list, tuple)) else float(v)


def _ridge_grid(v) -> list[float]:
    if v is None or v == "auto":
        return list(LSTSQ_GRID)
    return sorted({float(x) for x in (v if isinstance(v, (list, tuple)) else [v])})


def bias_flags(recover: str | None, args: dict | None) -> tuple[bool, bool]:
    """(down_proj bias, o_proj bias) that pruned layers need for this recovery."""
    steps, args = _steps(recover), args or {}
    need = "bias" in steps or ("lstsq" in steps and args.get("lstsq_intercept", True)) or ("mask" in steps and args.get("mask_intercept", False))
    return need, need


def needs(recover: str | None) -> dict:
    """What the recovery `recover` needs from calibration: statistics, Gram matrices (mask; lstsq
    builds its own Gram from the pruned network's inputs), the calibration token ids (lstsq, lora, kd)."""
    steps = _steps(recover)
    return {"stats": bool(steps), "gram": "mask" in steps, "ids": any(s in ("lstsq", "lora", "kd") for s in steps)}


# ------------------------------------------------------------------------ closed-form solutions
def _split(n: int, keep: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[keep] = False
    return mask.nonzero().squeeze(1)


def bias_solution(w: torch.Tensor, st: ChannelStats, keep: torch.Tensor):
    """(W_K, bias delta): pruned channels replaced by their calibration means."""
    w = w.double()
    pruned = _split(w.shape[1], keep)
    return w[:, keep], w[:, pruned] @ st.mean[pruned]


def lstsq_solution(w: torch.Tensor, st: ChannelStats, keep: torch.Tensor, ridge: float = 1e-2, intercept: bool = True):
    """(W_K', bias delta or None): ridge least-squares refit of the kept columns (+ a bias)."""
    if st.gram is None:
        raise EdgepruneError("lstsq restoration needs Gram matrices: calibrate with gram=True")
    w, g = w.double(), st.gram
    g_kk = g[keep][:, keep]
    rhs = g[keep] @ w.T  # [K, d] = G[K, :] W^T
    lam = ridge * float(g_kk.diagonal().mean().clamp_min(1e-30))
    k = len(keep)
    if intercept:
        a = torch.zeros(k + 1, k + 1, dtype=torch.float64)
        a[:k, :k] = g_kk + lam * torch.eye(k, dtype=torch.float64)
        a[:k, k] = a[k, :k] = st.sum[keep]
        a[k, k] = float(st.tokens)
        rhs = torch.cat([rhs, (st.sum @ w.T)[None]])
        theta = _psd_solve(a, rhs)
        return theta[:k].T, theta[k]
    theta = _psd_solve(g_kk + lam * torch.eye(k, dtype=torch.float64), rhs)
    return theta.T, None


def mask_solution(w: torch.Tensor, st: ChannelStats, keep: torch.Tensor, ridge: float = 1e-2, clip=(0.5, 2.0), intercept: bool = False):
    """(W_K · diag(s), bias delta or None, s): per-channel scales fitted to the dense output, capped."""
    if st.gram is None:
        raise EdgepruneError("mask tuning needs Gram matrices: calibrate with gram=True")
    w, g = w.double(), st.gram
    if intercept:  # the optimal bias for any scales is the mean residual: solve on the centred Gram
        g = g - torch.outer(st.sum, st.sum) / max(st.tokens, 1)
    wk = w[:, keep]
    m = g[keep][:, keep] * (wk.T @ wk)
    r = (g[keep] * (wk.T @ w)).sum(1)
    lam = ridge * float(m.diagonal().mean().clamp_min(1e-30))
    s = _psd_solve(m + lam * torch.eye(len(keep), dtype=torch.float64), (r + lam)[:, None])[:, 0]
    s = s.clamp(float(clip[0]), float(clip[1]))
    bias = None
    if intercept:
        mu = st.mean
        bias = w @ mu - wk @ (s * mu[keep])
    return wk * s[None], bias, s


def _psd_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(b, chol)
    return torch.linalg.lstsq(a, b).solution


# ---------------------------------------------------------------------------- applying to a model
def _attn_channels(kv_keep: list[int], q_per_group: int, head_dim: int) -> torch.Tensor:
    return torch.tensor([(g * q_per_group + h) * head_dim + i for g in kv_keep for h in range(q_per_group) for i in range(head_dim)],
                        dtype=torch.long)


def block_pairs(pruned, dense, plan: PrunePlan):
    """(index, dense block, pruned block or None, LayerPlan or None) in the dense model's order, for a
    pruned copy next to its dense model (apply.pruning_in_place yields the same for one model)."""
    kept = {lp.index: (pos, lp) for pos, lp in enumerate(plan.layers)}
    pruned_layers = arch.layers(pruned)
    for li, dl in enumerate(arch.layers(dense)):
        pos, lp = kept.get(li, (None, None))
        yield li, dl, (None if pos is None else pruned_layers[pos]), lp


def _consumers(blocks, plan: PrunePlan, stats: CalibrationStats):
    """(pruned linear, dense weight, channel stats, kept input channels, name) for every pruned consumer."""
    hd = plan.base["head_dim"]
    q_per_group = plan.queries_per_group
    for li, dl, layer, lp in blocks:
        if lp is None:
            continue
        block = stats.blocks[li]
        if len(lp.ffn_keep) < dl.mlp.down_proj.in_features:
            yield (layer.mlp.down_proj, dl.mlp.down_proj.weight.detach(), block.ffn,
                   torch.tensor(lp.ffn_keep, dtype=torch.long), f"layer {li} down_proj", lp.ffn_bias)
        if len(lp.kv_keep) < plan.base["kv_heads"]:
            yield (layer.self_attn.o_proj, dl.self_attn.o_proj.weight.detach(), block.attn,
                   _attn_channels(lp.kv_keep, q_per_group, hd), f"layer {li} o_proj", lp.attn_out_bias)


@torch.no_grad()
def _write(lin: nn.Linear, weight: torch.Tensor, bias_delta: torch.Tensor | None, name: str) -> None:
    lin.weight.copy_(weight.to(lin.weight.dtype))
    if bias_delta is not None:
        if lin.bias is None:
            raise EdgepruneError(f"{name}: recovery computed a bias but the plan has no bias flag there (make the plan with the same --recover)")
        lin.bias.add_(bias_delta.to(lin.bias.dtype))


def closed_form(blocks, plan: PrunePlan, stats: CalibrationStats, kind: str, args: dict) -> dict:
    """Apply one of bias / lstsq / mask to every pruned consumer in `blocks` (block_pairs) in place."""
    done, scales = 0, []
    for lin, w, st, keep, name, has_bias in _consumers(blocks, plan, stats):
        if kind == "bias":
            new, delta = bias_solution(w, st, keep)
        elif kind == "lstsq":
            new, delta = lstsq_solution(w, st, keep, _dense_ridge(args.get("lstsq_ridge")), args.get("lstsq_intercept", True))
        elif kind == "mask":
            new, delta, s = mask_solution(w, st, keep, args["mask_ridge"], args["mask_clip"], args["mask_intercept"])
            scales.append(s)
        else:
            raise ValueError(kind)
        _write(lin, new, delta, name)
        done += 1
    info = {"consumers": done}
    if scales:
        s = torch.cat(scales)
        lo, hi = args["mask_clip"]
        info.update({"scale_min": float(s.min()), "scale_max": float(s.max()), "scale_mean": float(s.mean()),
                     "clipped_fraction": float(((s <= lo) | (s >= hi)).double().mean())})
    return info


def _dense_ridge(v) -> float:
    if v is None or v == "auto":
        return LSTSQ_DENSE_RIDGE
    if isinstance(v, (list, tuple)):
        if len(v) != 1:
            raise EdgepruneError("lstsq_inputs='dense' takes one lstsq_ridge (it has no held-out rows to choose from a grid)")
        v = v[0]
    return float(v)


# -------------------------------------------------------- lstsq on the pruned network's own inputs
def heldout_split(rows: int, seqlen: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fit mask [rows, seqlen], held-out rows, held-out mask [len(held-out rows), seqlen]).

    Every LSTSQ_HELDOUT_EVERY-th row is held out (the last row when there are fewer); with a single
    row, its last quarter of positions is (they still attend to the fitted ones, as in use)."""
    fit = torch.ones(rows, seqlen, dtype=torch.bool)
    if rows >= 2:
        held = torch.arange(LSTSQ_HELDOUT_EVERY - 1, rows, LSTSQ_HELDOUT_EVERY)
        if len(held) == 0:
            held = torch.tensor([rows - 1])
        fit[held] = False
        return fit, held, torch.ones(len(held), seqlen, dtype=torch.bool)
    cut = max(1, min(seqlen - 1, (3 * seqlen + 3) // 4))
    fit[0, cut:] = False
    return fit, torch.tensor([0]), ~fit



class _Normal:
    """The least-squares system of one consumer over the fit tokens, accumulated in float64.

    Two exact forms of the same ridge solution, chosen by size (T fit tokens, K kept input
    columns, d outputs), with R = Y - X W0^T the residual of the kept weights:
      primal  W^T = W0^T + (X^T X + λI)^-1 X^T R      a K x K system: the Gram is summed batch by batch
      dual    W^T = W0^T + X^T (X X^T + λI)^-1 R      a T x T system: the rows are kept
    ((X^T X + λI)^-1 X^T = X^T (X X^T + λI)^-1). The dual form is taken when T < K and it costs fewer
    flops: a 1B model's down_proj refit on fit's 3k tokens has K ~ 6-8k, where each ridge's K x K
    Cholesky solve with d = 2048 right-hand sides dominated the refit (issue #15)."""

    def __init__(self, k: int, d: int, device, tokens: int | None = None, ridges: int = 1):
        f = dict(dtype=torch.float64, device=device)
        self.k, self.d = k, d
        self.dual = tokens is not None and dual_is_cheaper(tokens, k, d, ridges)
        if self.dual:  # the rows themselves: T x (K + d), less than the K x K Gram since T < K
            self.x, self.y = torch.empty(tokens, k, **f), torch.empty(tokens, d, **f)
        else:
            self.xx, self.xy = torch.zeros(k, k, **f), torch.zeros(k, d, **f)
        self.sx, self.sy, self.n = torch.zeros(k, **f), torch.zeros(d, **f), 0
        self.centred = False

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.double(), y.double()
        if self.dual:
            if self.n + len(x) > len(self.x):
                raise RuntimeError(f"more than the {len(self.x)} fit tokens these equations were sized for")
            self.x[self.n : self.n + len(x)] = x
            self.y[self.n : self.n + len(x)] = y
        else:
            self.xx += x.T @ x
            self.xy += x.T @ y
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.n += x.shape[0]

    def solutions(self, w0: torch.Tensor, ridges: list[float], intercept: bool):
        """Yield (r, W [d, K], bias delta [d] or None) for W = argmin ||X W^T + b - Y||² + λ||W - W0||²,
        λ = r · mean diag of the (centred) Gram, one ridge at a time; the intercept is unpenalised
        (solved on centred sums, centred in place: iterate it once). Each λ > 0 is one Cholesky solve
        (K x K, or T x T in the dual form); λ = 0 is the least-squares solution nearest W0 (the
        λ -> 0 limit), through an eigendecomposition. On a 1B model's down_proj (K ~ 5.7k) one
        eigendecomposition for the whole grid took ~10x the time of a Cholesky and held three more
        K x K copies (issue #15). Beside the Gram there is one factor at a time (the ridge is added
        to the diagonal and taken off again)."""
        if self.centred:
            raise RuntimeError("these normal equations were centred in place by an earlier solutions(): accumulate them again")
        n = max(self.n, 1)
        w0t = w0.double().T
        if intercept:
            self.centred = True  # centred in place (no K x K temporary): the sums are used once
        if self.dual:
            x, y = self.x[: self.n], self.y[: self.n]
            if intercept:
                x.sub_(self.sx / n)
                y.sub_(self.sy / n)
            a, r = x @ x.T, y - x @ w0t  # T x T, and the kept weights' residual T x d
            scale = float(a.diagonal().sum()) / self.k  # trace(X X^T) / K: the mean diagonal of the (centred) K x K Gram
            rhs = lambda lam: r  # noqa: E731
            back = lambda z, lam: w0t + x.T @ z  # noqa: E731
        else:
            a, xy = self.xx, self.xy
            if intercept:
                a.addr_(self.sx, self.sx, alpha=-1 / n)
                xy.addr_(self.sx, self.sy, alpha=-1 / n)
            scale = float(a.diagonal().mean())
            # (G + λI)^-1 (X^T Y + λ W0^T) = W0^T + (G + λI)^-1 X^T R; λ = 0 needs the second form
            rhs = lambda lam: xy + lam * w0t if lam > 0 else xy - a @ w0t  # noqa: E731
            back = lambda z, lam: z if lam > 0 else w0t + z  # noqa: E731
        scale = max(scale, 1e-30)
        for ridge in ridges:
            lam = ridge * scale
            if lam <= 0:  # least squares on the numerical range, nearest the kept weights
                evals, vecs = torch.linalg.eigh((a + a.T) / 2)
                inv = torch.where(evals > evals.max() * 1e-12, 1 / evals.clamp_min(1e-300), torch.zeros_like(evals))
                z = vecs @ ((vecs.T @ rhs(lam)) * inv[:, None])
                del evals, vecs
            else:  # the ridge goes on the diagonal and comes off again: one factor beside the system, not two
                diagonal = a.diagonal().clone()
                a.diagonal().add_(lam)
                try:
                    z = _psd_solve(a, rhs(lam))
                finally:
                    a.diagonal().copy_(diagonal)
            w = back(z, lam).T
            yield ridge, w, ((self.sy - w @ self.sx) / n if intercept else None)


def dual_is_cheaper(tokens: int, k: int, d: int, ridges: int = 1) -> bool:
    """Whether _Normal's T x T form costs fewer flops than the K x K one (only when T < K, so that
    the rows it keeps are smaller than the Gram)."""
    if tokens >= k:
        return False
    primal = 2 * tokens * k * k + ridges * (k**3 / 3 + 2 * k * k * d)
    dual = 2 * tokens * tokens * k + 2 * tokens * k * d + ridges * (tokens**3 / 3 + 2 * tokens * tokens * d + 2 * tokens * k * d)
    return dual < primal


def _post_ffn_norm(model) -> str | None:
    """The decoder layer attribute of the norm after the FFN (Gemma 3's post_feedforward_layernorm), or None."""
    from edgeprune.families import family_of

    return family_of(model).norms.get("post_ffw_norm")


def _post_norm(model, consumer: str) -> bool:
    """Whether a norm sits between `consumer`'s output and the residual stream (Gemma 3's
    post-attention and post-FFN norms): there the block output is not linear in the weights."""
    from edgeprune.families import family_of

    norms = family_of(model).norms
    return ("post_ffw_norm" if consumer == "down_proj" else "post_attention_norm") in norms


@torch.no_grad()
def _run(layer, hidden: torch.Tensor, kwargs: dict, batch_size: int) -> torch.Tensor:
    return torch.cat([block_output(layer(hidden[i : i + batch_size], use_cache=False, **kwargs)) for i in range(0, len(hidden), batch_size)])


@dataclass(frozen=True)
class _RefitOptions:
    """How sequential_lstsq refits (its recovery arguments, resolved once)."""
    split: tuple  # heldout_split(): fit mask, held-out rows, their mask
    ridges: list
    intercept: bool
    target: str  # "block" or "layer" (per consumer: "layer" where a post-norm follows it)
    post_norm: dict
    batch_size: int
    select: str = "plan"  # LSTSQ_SELECT
    tune: int = 0  # lstsq_tune: epochs of block-wise tuning of each refit FFN (blocktune.py)
    post_ffn: str | None = None  # the decoder layer's post-FFN norm attribute (Gemma 3), for the tuning


def _sqerr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return float((a.double() - b.double()).pow(2).sum(-1)[mask].sum())


@torch.no_grad()
def _refit_consumer(layer, name: str, lin: nn.Linear, h_in: torch.Tensor, h_in_dense: torch.Tensor, h_out_dense: torch.Tensor,
                    dense_y: torch.Tensor, target: str, kwargs: dict, opt: _RefitOptions) -> dict:
    """Refit one consumer of a pruned block in place; returns what was chosen and why."""
    (fit, held, held_mask), ridges, intercept, batch_size = opt.split, opt.ridges, opt.intercept, opt.batch_size
    device = lin.weight.device
    w0 = lin.weight.detach().clone()
    b0 = lin.bias.detach().clone() if lin.bias is not None else None
    eq = _Normal(lin.in_features, lin.out_features, device, tokens=int(fit.sum()), ridges=len(ridges))
    seen = {}
    hook = lin.register_forward_hook(lambda m, a, o: seen.update(x=a[0], y=o))
    err_before = ref = 0.0
    is_held = torch.zeros(len(h_in), dtype=torch.bool)
    is_held[held] = True
    held_pos = {int(r): j for j, r in enumerate(held)}
    try:
        for i in range(0, len(h_in), batch_size):
            out = block_output(layer(h_in[i : i + batch_size], use_cache=False, **kwargs))
            x, y_old = seen["x"], seen["y"].double()
            if target == "layer":  # the dense consumer's output on the dense inputs
                want = dense_y[i : i + batch_size].double()
            elif name == "down_proj":  # the dense block's output: y + (dense out - pruned out)
                want = y_old + (h_out_dense[i : i + batch_size].double() - out.double())
            else:  # o_proj: the dense residual after attention, h_d + o_d, reached from h_p
                want = dense_y[i : i + batch_size].double() + (h_in_dense[i : i + batch_size].double() - h_in[i : i + batch_size].double())
            if b0 is not None:
                want = want - b0.double()
            m = fit[i : i + batch_size].to(device)
            eq.add(x[m], want[m])
            for j in range(len(out)):
                r = i + j
                if is_held[r]:
                    hm = held_mask[held_pos[r]].to(device)
                    err_before += _sqerr(out[j], h_out_dense[r], hm)
                    ref += float(h_out_dense[r].double().pow(2).sum(-1)[hm].sum())
    finally:
        hook.remove()
    hm_all = held_mask.to(device)
    h_held, ref_held = h_in[held.to(device)], h_out_dense[held.to(device)]
    tried, best = {}, (err_before, "unchanged", None, None)
    for ridge, w, delta in eq.solutions(w0, ridges, intercept):
        lin.weight.copy_(w.to(lin.weight.dtype))
        if delta is not None:
            lin.bias.copy_((b0.double() + delta).to(lin.bias.dtype))
        err = _sqerr(_run(layer, h_held, kwargs, batch_size), ref_held, hm_all)
        tried[f"{ridge:g}"] = err / max(ref, 1e-30)
        if err < best[0] * (1 - 1e-6):  # strictly better on held-out rows, not by rounding
            best = (err, ridge, w, delta)
    err_after, ridge, w, delta = best
    if w is None:
        lin.weight.copy_(w0)
        if b0 is not None:
            lin.bias.copy_(b0)
    else:
        lin.weight.copy_(w.to(lin.weight.dtype))
        if delta is not None:
            lin.bias.copy_((b0.double() + delta).to(lin.bias.dtype))
    return {"ridge": ridge, "heldout_before": err_before / max(ref, 1e-30), "heldout_after": err_after / max(ref, 1e-30),
            "heldout_by_ridge": tried, "columns": lin.in_features, "fit_tokens": eq.n}


@torch.no_grad()
def sequential_lstsq(blocks, model, plan: PrunePlan, ids: torch.Tensor, args: dict, batch_size: int = 8, progress=None,
                     block_device=None) -> dict:
    """lstsq on the pruned network's own inputs, block by block (sequential error feedback), with
    the ridge of every consumer chosen on held-out calibration rows ("unchanged" when none helps).
    `blocks` is block_pairs(...) or apply.pruning_in_place(...); `model` gives the embedding and
    rotary tables (the pruned and dense models share them).

    Memory: four copies of the calibration hidden states (dense and pruned, in and out, plus the
    dense consumers' outputs) and one consumer's normal equations; pruned blocks change in place.
    block_device: the refit runs there, a dense block and its pruned one at a time (offload.py)."""
    if ids is None or len(ids) == 0 or ids.shape[1] < 2:
        raise EdgepruneError("lstsq recovery needs the calibration token ids (at least one row of 2 tokens)")
    rows, seqlen = ids.shape
    ridges = _ridge_grid(args.get("lstsq_ridge"))
    intercept = args.get("lstsq_intercept", True)
    target = args.get("lstsq_target", "block")
    split = heldout_split(rows, seqlen)
    h_d = embed(model, ids, batch_size)
    position = to_device(rotary(model, seqlen, h_d[:1]), block_device)
    h_d = to_device(h_d, block_device)
    h_p = h_d.clone()  # the pruned model shares the dense embedding
    post_norm = {name: _post_norm(model, name) for name in ("o_proj", "down_proj")}
    opt = _RefitOptions(split, ridges, intercept, target, post_norm, batch_size, select=args.get("lstsq_select", "plan"),
                        tune=args.get("lstsq_tune", 0),
                        post_ffn=_post_ffn_norm(model))
    n_layers = plan.base["num_layers"]
    out = []
    for li, dl, pl, lp in blocks:
        with visiting(dl, block_device), visiting(pl, block_device, keep=True):
            h_d, h_p, rep = _lstsq_block(li, dl, pl, lp, h_d, h_p, position, plan, opt)
        if rep is not None:
            out.append(rep)
        if progress:
            progress("lstsq recovery", li + 1, n_layers)
    n_consumers = sum(len(b["consumers"]) for b in out)
    n_refit = sum(c["ridge"] != "unchanged" for b in out for c in b["consumers"].values())
    return _lstsq_summary(out, n_consumers, n_refit, split, ridges, target)


def _lstsq_block(li, dl, pl, lp, h_d, h_p, position, plan, opt: _RefitOptions):
    """(next dense inputs, next pruned inputs, the block's report or None) for block `li`."""
    kw_d = block_kwargs(dl, position)
    if lp is None:  # a dropped layer: the dense stream goes through it, the pruned one skips it
        return _run(dl, h_d, kw_d, opt.batch_size), h_p, None
    kw_p = block_kwargs(pl, position)
    todo, rep = [], None
    if len(lp.kv_keep) < plan.base["kv_heads"]:  # o_proj first: its output feeds the FFN
        todo.append(("o_proj", pl.self_attn.o_proj, dl.self_attn.o_proj, lp.attn_out_bias))
    if len(lp.ffn_keep) < dl.mlp.down_proj.in_features:
        todo.append(("down_proj", pl.mlp.down_proj, dl.mlp.down_proj, lp.ffn_bias))
    if todo:
        h_out_d, rep = _refit_block(li, dl, pl, lp, todo, h_d, h_p, kw_d, kw_p, opt)
        if opt.tune and "down_proj" in rep["consumers"]:
            _, held, held_mask = opt.split
            post = getattr(pl, opt.post_ffn) if opt.post_ffn else None
            rep["tune"] = tune_ffn(pl, h_p, h_out_d, kw_p, opt.split[0], held, held_mask, opt.tune, opt.batch_size, post)
    else:
        h_out_d = _run(dl, h_d, kw_d, opt.batch_size)
    return h_out_d, _run(pl, h_p, kw_p, opt.batch_size), rep  # the next block's inputs, after this one's refit


def _refit_block(li, dl, pl, lp, todo, h_d, h_p, kw_d, kw_p, opt: _RefitOptions):
    """(dense block output, report): every pruned consumer of block `li` refit in turn."""
    # the dense block once, keeping its consumers' outputs (the "layer" targets, and o_proj's "block" one)
    ys = {name: [] for name, *_ in todo}
    hooks = [dlin.register_forward_hook(lambda m, a, o, n=name: ys[n].append(o)) for name, _, dlin, _ in todo]
    try:
        h_out_d = _run(dl, h_d, kw_d, opt.batch_size)
    finally:
        for h in hooks:
            h.remove()
    ys = {n: torch.cat(v) for n, v in ys.items()}
    report = {"layer": li, "consumers": {}}
    for name, lin, _, has_bias in todo:
        if opt.intercept and not has_bias:
            raise EdgepruneError(f"layer {li} {name}: lstsq fits a bias but the plan has no bias flag there "
                                 "(make the plan with the same --recover)")
        # Target: by default the dense *block* output, i.e. the consumer also cancels the error
        # already in the residual stream (earlier blocks, removed layers, this block's attention) --
        # what the next block sees and what the ridge is chosen on. Measured on SmolLM2-135M, CFSP
        # 50 % FFN, 16x512 WikiText-2 tokens: perplexity 61.6 with this target, 99.1 with the
        # dense consumer's own output as target ("layer"), 98.5 without recovery. Where a norm
        # follows the consumer (Gemma 3's post-norms) the block output is not linear in the
        # weights, so there (and with lstsq_target="layer") the dense consumer output on the
        # dense inputs is the target.
        tgt = "layer" if opt.target == "layer" or opt.post_norm[name] else "block"
        chosen = None
        if name == "down_proj" and opt.select == "obs":  # which channels fill the plan's width: chosen here (reselect.py)
            chosen = reselect_ffn(pl, dl, lp, h_p, h_out_d, ys[name], kw_p, opt.split[0], tgt, opt.intercept, opt.batch_size)
            lin = pl.mlp.down_proj
        info = _refit_consumer(pl, name, lin, h_p, h_d, h_out_d, ys[name], tgt, kw_p, opt)
        info["target"] = tgt
        if chosen is not None:
            info["reselected"] = chosen
        report["consumers"][name] = info
    chain = list(report["consumers"].values())
    report["heldout_before"], report["heldout_after"] = chain[0]["heldout_before"], chain[-1]["heldout_after"]
    return h_out_d, report


def _lstsq_summary(blocks, n_consumers, n_refit, split, ridges, target) -> dict:
    fit, held, held_mask = split
    fit_tokens, held_tokens = int(fit.sum()), int(held_mask.sum())
    grid = ", ".join(f"{r:g}" for r in ridges)
    widths = sorted({c["columns"] for b in blocks for c in b["consumers"].values()})
    cols = f"{widths[0]}" if len(widths) == 1 else f"{widths[0]}..{widths[-1]}" if widths else "0"
    before = sum(b["heldout_before"] for b in blocks) / max(len(blocks), 1)
    after = sum(b["heldout_after"] for b in blocks) / max(len(blocks), 1)
    tuned = [b["tune"] for b in blocks if "tune" in b]
    n_tuned = sum(t["kept"] for t in tuned)
    cannot = n_refit == 0 and n_tuned == 0
    tune_note = f"; FFN tuning kept in {n_tuned} of {len(tuned)} blocks" if tuned else ""
    if not blocks:
        summary = "lstsq cannot help here: the plan removes no FFN channel and no KV group, nothing to refit"
    elif cannot:
        summary = (f"lstsq cannot help here: no ridge in {{{grid}}} lowered the held-out error of any block "
                   f"({fit_tokens} fit tokens for {cols} columns, {held_tokens} held-out tokens)"
                   + (" and no block's FFN tuning did" if tuned else "") + "; the weights are unchanged")
    else:
        summary = (f"lstsq refit {n_refit} of {n_consumers} consumers on the pruned network's inputs "
                   f"(ridge chosen on {held_tokens} held-out tokens, {fit_tokens} fit tokens); mean relative held-out "
                   f"block error {before:.4g} -> {after:.4g}" + (f"; {n_consumers - n_refit} left unchanged" if n_refit < n_consumers else "")
                   + tune_note)
    return {"consumers": n_consumers, "refit": n_refit, "unchanged": n_consumers - n_refit, "cannot_help": cannot,
            "summary": summary, "inputs": "pruned", "target": target, "ridge_grid": ridges, "fit_tokens": fit_tokens,
            "heldout_tokens": held_tokens, "heldout_rows": [int(r) for r in held],
            "heldout_before": before, "heldout_after": after, "tuned": n_tuned, "blocks": blocks}


# ------------------------------------------------------------------------------------------ LoRA
def lora_ranks(importance: list[float], rank: int, direction: str = "importance") -> list[int]:
    """Per-block ranks whose mean is about `rank`, proportional to importance (or its inverse)."""
    d = torch.tensor(importance, dtype=torch.float64).clamp_min(1e-6)
    if direction == "importance":
        w = d / d.mean()
    elif direction == "inverse":
        w = (1 / d) / (1 / d).mean()
    else:
        w = torch.ones_like(d)
    return [int(min(max(1, math.floor(rank * float(x) + 0.5)), 4 * rank)) for x in w]


@torch.no_grad()
def lm_loss(model, ids: torch.Tensor, batch_size: int = 4) -> float:
    total, count = 0.0, 0
    for i in range(0, len(ids), batch_size):
        b = ids[i : i + batch_size]
        logits = model(b, use_cache=False).logits[:, :-1].float()
        total += float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1), reduction="sum"))
        count += b[:, 1:].numel()
    return total / count


def lora_recover(pruned, plan: PrunePlan, stats: CalibrationStats, ids: torch.Tensor, args: dict, progress=None) -> dict:
    """Train per-block-rank LoRA adapters on next-token loss over `ids`, then merge them (in place)."""
    if ids is None or len(ids) == 0:
        raise EdgepruneError("LoRA recovery needs the calibration token ids")
    start = time.perf_counter()
    device = next(pruned.parameters()).device
    ids = ids.to(device)
    if ids.shape[1] > args["lora_seqlen"]:  # train on shorter rows: same tokens, cheaper steps
        per = ids.shape[1] // args["lora_seqlen"]
        ids = ids[:, : per * args["lora_seqlen"]].reshape(-1, args["lora_seqlen"])
    ranks = lora_ranks([stats.blocks[lp.index].angular for lp in plan.layers], args["lora_rank"], args["lora_direction"])
    eval_ids = ids[: min(len(ids), 8)]
    loss_before = lm_loss(pruned, eval_ids)
    flags = {p: p.requires_grad for p in pruned.parameters()}
    for p in pruned.parameters():
        p.requires_grad_(False)
    adapters = attach_lora(pruned, ranks, args["lora_alpha"], args["lora_seed"])
    params = [p for ad in adapters for p in (ad.lora_A, ad.lora_B)]
    opt = torch.optim.AdamW(params, lr=args["lora_lr"], weight_decay=0.0)
    steps, bs = args["lora_steps"], min(args["lora_batch"], len(ids))
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min((t + 1) / warmup, max(0.0, (steps - t) / max(1, steps - warmup))))
    g = torch.Generator().manual_seed(args["lora_seed"])
    order = torch.randperm(len(ids), generator=g)
    cursor, losses = 0, []
    try:
        for step in range(steps):
            if cursor + bs > len(order):
                order, cursor = torch.randperm(len(ids), generator=g), 0
            batch = ids[order[cursor : cursor + bs].to(device)]
            cursor += bs
            loss = pruned(batch, labels=batch, use_cache=False).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if progress:
                progress("LoRA recovery", step + 1, steps)
    finally:
        merge_lora(pruned)
        for p, flag in flags.items():
            p.requires_grad_(flag)
        pruned.zero_grad(set_to_none=True)
    loss_after = lm_loss(pruned, eval_ids)
    return {"ranks": ranks, "trainable_params": sum(p.numel() for p in params), "steps": steps, "batch": bs,
            "tokens_per_step": int(bs * ids.shape[1]), "loss_first_steps": sum(losses[:5]) / len(losses[:5]),
            "loss_last_steps": sum(losses[-5:]) / len(losses[-5:]), "calibration_loss_before": loss_before,
            "calibration_loss_after": loss_after, "seconds": time.perf_counter() - start}


# --------------------------------------------------------------------------------- the entry point
def recover(pruned, dense, plan: PrunePlan, stats: CalibrationStats | None, ids: torch.Tensor | None = None, progress=None,
            blocks=None, block_device=None) -> dict:
    """Run the recovery recorded in `plan.method` on `pruned` (made from `dense` by apply_plan).

    In place (dense None): `pruned` is the dense model and `blocks` is apply.pruning_in_place(pruned,
    plan), which prunes it block by block while the closed-form step runs; lora may follow, kd cannot
    (it needs the dense model as teacher). block_device: sequential lstsq runs each block there
    (offload.py); the other closed forms only read calibration statistics."""
    steps = _steps(plan.method["recover"])
    if dense is None and (blocks is None or "kd" in steps or not any(s in CLOSED_FORM for s in steps)):
        raise EdgepruneError("recovery in place needs pruning_in_place blocks and a closed-form step (bias, lstsq or mask), and no kd")
    args = plan.method["recover_args"]
    report = {}
    for s in steps:
        t = time.perf_counter()
        sequential = s == "lstsq" and args.get("lstsq_inputs", "pruned") == "pruned"
        if stats is None and not sequential:
            raise EdgepruneError(f"recovery '{s}' needs calibration statistics")
        if s == "lora":
            report[s] = lora_recover(pruned, plan, stats, ids, args, progress)
        elif s == "kd":
            if ids is None or len(ids) < 2:
                raise EdgepruneError("distillation recovery needs at least 2 calibration rows (--nsamples)")
            n_held = max(1, len(ids) // KD_HELDOUT_FRACTION)
            # plans written before kd_hidden / kd_lora_rank existed lack them: their defaults then
            report[s] = distill(pruned, dense, ids[:-n_held], ids[-n_held:], seconds=args["kd_seconds"], lr=args["kd_lr"],
                                batch_size=args["kd_batch"], hidden=args.get("kd_hidden", KD_DEFAULTS["kd_hidden"]),
                                layer_map=[lp.index for lp in plan.layers], lora_rank=args.get("kd_lora_rank", KD_DEFAULTS["kd_lora_rank"]),
                                progress=progress)
        elif sequential:
            report[s] = sequential_lstsq(blocks or block_pairs(pruned, dense, plan), pruned, plan, ids, args, progress=progress,
                                         block_device=block_device)
        else:
            if s == "lstsq" and stats.blocks[0].ffn.gram is None and ids is not None:
                if dense is None:
                    raise EdgepruneError("the one-pass lstsq variant in place needs Gram matrices from the calibration pass")
                stats = calibrate(dense, ids, gram=True)  # the one-pass variant needs the dense Gram: one pass of its own
            report[s] = closed_form(blocks or block_pairs(pruned, dense, plan), plan, stats, s, args)
            if s == "lstsq":
                report[s]["inputs"] = "dense"
        report[s]["seconds"] = time.perf_counter() - t
    return report
