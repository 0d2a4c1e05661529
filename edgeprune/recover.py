"""Recovery after structural removal: what the remaining weights do about what was cut.

All closed-form recoveries work on the *consuming* matrix of a pruned unit -- down_proj for FFN
channels, o_proj for attention (the query-head channels of removed KV groups) -- from the dense
model's calibration statistics at that matrix's input X (tokens x n, see calibrate.py): sums,
means, and for lstsq/mask the Gram G = X^T X (float64). K = kept input channels, P = pruned ones,
W = the dense consuming matrix (d x n), T = calibration tokens, mu = mean of X.

  bias   (FLAP)  b += W[:, P] @ mu[P]: each pruned channel is replaced by its calibration mean.
                 The layer's output error drops by T·||W_P mu_P||² (never rises).
  lstsq  (FASP)  refit the kept columns so the layer output on the calibration tokens is kept:
                     W_K <- W G[:, K] (G[K, K] + λI)^-1,     λ = ridge · mean(diag G[K, K])
                 With `lstsq_intercept` (default) a bias is fitted jointly (X augmented with a
                 column of ones; its sums are known exactly and it is not penalised), which
                 contains `bias` as a special case: never worse on calibration data.
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

Closed-form steps use only the dense statistics (one calibration pass for everything, as FLAP
and FASP do); they run before lora when combined (e.g. "bias+lora").
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from edgeprune import arch
from edgeprune.calibrate import CalibrationStats, ChannelStats
from edgeprune.errors import EdgepruneError
from edgeprune.distill import KD_DEFAULTS, distill
from edgeprune.plan import PrunePlan

DEFAULTS = {
    "bias": {},
    "lstsq": {"lstsq_ridge": 1e-2, "lstsq_intercept": True},
    "mask": {"mask_ridge": 1e-2, "mask_clip": [0.5, 2.0], "mask_intercept": False},
    "lora": {"lora_steps": 200, "lora_rank": 8, "lora_lr": 5e-4, "lora_batch": 2, "lora_seqlen": 128, "lora_direction": "importance",
             "lora_alpha": 2.0, "lora_seed": 0},
    "kd": dict(KD_DEFAULTS),
}
KD_HELDOUT_FRACTION = 8  # kd keeps 1/8 of the calibration rows (at least 1) apart to decide whether it helped
LORA_DIRECTIONS = ("importance", "inverse", "uniform")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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
    if "kd_lr" in out and not out["kd_lr"] > 0:
        raise EdgepruneError(f"kd_lr must be positive, got {out['kd_lr']}")
    if "kd_batch" in out and not (isinstance(out["kd_batch"], int) and out["kd_batch"] >= 1):
        raise EdgepruneError(f"kd_batch must be a positive integer, got {out['kd_batch']}")
    for k in ("lstsq_ridge", "mask_ridge"):
        if k in out and not out[k] >= 0:
            raise EdgepruneError(f"{k} must be >= 0, got {out[k]}")
    return dict(sorted(out.items()))


def bias_flags(recover: str | None, args: dict | None) -> tuple[bool, bool]:
    """(down_proj bias, o_proj bias) that pruned layers need for this recovery."""
    steps, args = _steps(recover), args or {}
    need = "bias" in steps or ("lstsq" in steps and args.get("lstsq_intercept", True)) or ("mask" in steps and args.get("mask_intercept", False))
    return need, need


def needs(recover: str | None) -> dict:
    steps = _steps(recover)
    return {"stats": bool(steps), "gram": any(s in ("lstsq", "mask") for s in steps), "ids": "lora" in steps or "kd" in steps}


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


def _consumers(pruned, dense, plan: PrunePlan, stats: CalibrationStats):
    """(pruned linear, dense weight, channel stats, kept input channels, name) for every pruned consumer."""
    hd = plan.base["head_dim"]
    q_per_group = plan.queries_per_group
    dense_layers = arch.layers(dense)
    for pos, (layer, lp) in enumerate(zip(arch.layers(pruned), plan.layers)):
        dl, block = dense_layers[lp.index], stats.blocks[lp.index]
        if len(lp.ffn_keep) < dl.mlp.down_proj.in_features:
            yield (layer.mlp.down_proj, dl.mlp.down_proj.weight.detach(), block.ffn,
                   torch.tensor(lp.ffn_keep, dtype=torch.long), f"layer {lp.index} down_proj", lp.ffn_bias)
        if len(lp.kv_keep) < plan.base["kv_heads"]:
            yield (layer.self_attn.o_proj, dl.self_attn.o_proj.weight.detach(), block.attn,
                   _attn_channels(lp.kv_keep, q_per_group, hd), f"layer {lp.index} o_proj", lp.attn_out_bias)


@torch.no_grad()
def _write(lin: nn.Linear, weight: torch.Tensor, bias_delta: torch.Tensor | None, name: str) -> None:
    lin.weight.copy_(weight.to(lin.weight.dtype))
    if bias_delta is not None:
        if lin.bias is None:
            raise EdgepruneError(f"{name}: recovery computed a bias but the plan has no bias flag there (make the plan with the same --recover)")
        lin.bias.add_(bias_delta.to(lin.bias.dtype))


def closed_form(pruned, dense, plan: PrunePlan, stats: CalibrationStats, kind: str, args: dict) -> dict:
    """Apply one of bias / lstsq / mask to every pruned consumer of `pruned` in place."""
    done, scales = 0, []
    for lin, w, st, keep, name, has_bias in _consumers(pruned, dense, plan, stats):
        if kind == "bias":
            new, delta = bias_solution(w, st, keep)
        elif kind == "lstsq":
            new, delta = lstsq_solution(w, st, keep, args["lstsq_ridge"], args["lstsq_intercept"])
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


# ------------------------------------------------------------------------------------------ LoRA
class LoRALinear(nn.Module):
    """y = base(x) + scale · (x A^T) B^T, base frozen; B starts at zero so training starts at the pruned model."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.scale = scale
        dev, dt = base.weight.device, base.weight.dtype
        a = torch.randn(rank, base.in_features, generator=generator, dtype=torch.float32) / math.sqrt(base.in_features)
        self.lora_A = nn.Parameter(a.to(device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev, dtype=dt))

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.T) @ self.lora_B.T * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        lin = self.base
        lin.weight.add_((self.lora_B.float() @ self.lora_A.float() * self.scale).to(lin.weight.dtype))
        return lin


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


def _attach(pruned, ranks: list[int], scale: float, seed: int) -> list[LoRALinear]:
    g = torch.Generator().manual_seed(seed)
    adapters = []
    for layer, r in zip(arch.layers(pruned), ranks):
        for parent in (layer.self_attn, layer.mlp):
            for name in LORA_TARGETS:
                lin = getattr(parent, name, None)
                if isinstance(lin, nn.Linear) and lin.in_features and lin.out_features:
                    ad = LoRALinear(lin, min(r, lin.in_features, lin.out_features), scale, g)
                    setattr(parent, name, ad)
                    adapters.append(ad)
    return adapters


def _merge(pruned) -> None:
    for layer in arch.layers(pruned):
        for parent in (layer.self_attn, layer.mlp):
            for name in LORA_TARGETS:
                mod = getattr(parent, name, None)
                if isinstance(mod, LoRALinear):
                    setattr(parent, name, mod.merged())


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
    adapters = _attach(pruned, ranks, args["lora_alpha"], args["lora_seed"])
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
        _merge(pruned)
        for p, flag in flags.items():
            p.requires_grad_(flag)
        pruned.zero_grad(set_to_none=True)
    loss_after = lm_loss(pruned, eval_ids)
    return {"ranks": ranks, "trainable_params": sum(p.numel() for p in params), "steps": steps, "batch": bs,
            "tokens_per_step": int(bs * ids.shape[1]), "loss_first_steps": sum(losses[:5]) / len(losses[:5]),
            "loss_last_steps": sum(losses[-5:]) / len(losses[-5:]), "calibration_loss_before": loss_before,
            "calibration_loss_after": loss_after, "seconds": time.perf_counter() - start}


# --------------------------------------------------------------------------------- the entry point
def recover(pruned, dense, plan: PrunePlan, stats: CalibrationStats | None, ids: torch.Tensor | None = None, progress=None) -> dict:
    """Run the recovery recorded in `plan.method` on `pruned` (made from `dense` by apply_plan)."""
    steps = _steps(plan.method["recover"])
    args = plan.method["recover_args"]
    report = {}
    for s in steps:
        t = time.perf_counter()
        if stats is None:
            raise EdgepruneError(f"recovery '{s}' needs calibration statistics")
        if s == "lora":
            report[s] = lora_recover(pruned, plan, stats, ids, args, progress)
        elif s == "kd":
            if ids is None or len(ids) < 2:
                raise EdgepruneError("distillation recovery needs at least 2 calibration rows (--nsamples)")
            n_held = max(1, len(ids) // KD_HELDOUT_FRACTION)
            report[s] = distill(pruned, dense, ids[:-n_held], ids[-n_held:], seconds=args["kd_seconds"], lr=args["kd_lr"],
                                batch_size=args["kd_batch"], progress=progress)
        else:
            report[s] = closed_form(pruned, dense, plan, stats, s, args)
        report[s]["seconds"] = time.perf_counter() - t
    return report
