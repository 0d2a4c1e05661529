"""Knowledge-distillation recovery: the dense model teaches the pruned one, on the CPU, time-boxed.

For a batch of token rows, p = softmax(dense logits) (the teacher, frozen, under no_grad) and
q = softmax(pruned logits) (the student):

    loss = mean over tokens of KL(p || q)                                     (kd_hidden = 0)
         + kd_hidden · mean over kept layers i of mean over tokens of (1 - cos(h_i, H_j(i)))

The second term is Minitron's hidden-state matching: h_i is the output hidden state of the
student's i-th layer and H_j(i) the teacher's output of the same original layer, j(i) =
plan.layers[i].index (`layer_map`; layers may have been dropped, so student layer i is not always
teacher layer i). Cosine is scale-free, so the term pulls each kept block's direction back to the
dense one without fighting the residual stream's growing norm; it is averaged over layers so that
one weight means the same whatever the depth.

What trains (AdamW, fp32):
  * `lora_rank` = 0: every weight of the decoder layers (attention, FFN and norms) and the final norm;
  * `lora_rank` = r > 0: adapters B·A of rank r on every linear layer of the decoder (q/k/v/o,
    gate/up/down), B starting at zero, the base weights and norms frozen; after training
    W += scale·B·A is merged, so the result is a plain model of the same shapes again.
The tied embedding / output projection always stays frozen: it is shared with the input and is
what the exported GGUF quantizes separately, and it holds a fifth of SmolLM2's parameters.
Training runs until the time budget is spent (or `max_steps`), cycling over the token rows.

Kept only when it helps: before and after, KL(dense || pruned) is measured on held-out rows that
were never trained on; when it did not fall, the weights are put back (with LoRA: the adapters are
dropped unmerged) and the report says so. The held-out KL alone decides, also with kd_hidden: it
is what the shipped model is judged by; the held-out hidden mismatch is reported beside it.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import time

import torch
from torch import nn

from edgeprune import arch
from edgeprune.errors import EdgepruneError

KD_DEFAULTS = {"kd_seconds": 180.0, "kd_lr": 5e-5, "kd_batch": 4, "kd_hidden": 0.0, "kd_lora_rank": 0}
# Adapters start at B = 0 and only move as fast as the step size lets them: the full weights'
# 5e-5 barely moves them in a few minutes, so kd_lora_rank without kd_lr takes IG-LoRA's step size.
KD_LORA_LR = 5e-4
KD_LORA_SCALE = 2.0  # IG-LoRA's default lora_alpha: the adapter's output is scaled by it
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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


def attach_lora(model, ranks: list[int], scale: float, seed: int) -> list[LoRALinear]:
    """Wrap every decoder linear layer of `model` in a LoRALinear (rank ranks[l] in layer l)."""
    g = torch.Generator().manual_seed(seed)
    adapters = []
    for layer, r in zip(arch.layers(model), ranks):
        for parent in (layer.self_attn, layer.mlp):
            for name in LORA_TARGETS:
                lin = getattr(parent, name, None)
                if isinstance(lin, nn.Linear) and lin.in_features and lin.out_features:
                    ad = LoRALinear(lin, min(r, lin.in_features, lin.out_features), scale, g)
                    setattr(parent, name, ad)
                    adapters.append(ad)
    return adapters


def merge_lora(model, keep: bool = True) -> None:
    """Replace every LoRALinear by its plain linear layer: merged (`keep`) or as it was before."""
    for layer in arch.layers(model):
        for parent in (layer.self_attn, layer.mlp):
            for name in LORA_TARGETS:
                mod = getattr(parent, name, None)
                if isinstance(mod, LoRALinear):
                    setattr(parent, name, mod.merged() if keep else mod.base)


# ------------------------------------------------------------------------------------ measuring
@contextlib.contextmanager
def _layer_outputs(model, which: list[int]):
    """Collect the output hidden state of the layers `which` of `model` during a forward, in that order."""
    got = {}

    def hook(i):
        return lambda mod, args, out: got.__setitem__(i, out[0] if isinstance(out, tuple) else out)

    layers = arch.layers(model)
    handles = [layers[i].register_forward_hook(hook(i)) for i in sorted(set(which))]
    try:
        yield lambda: [got[i] for i in which]
    finally:
        for h in handles:
            h.remove()


def hidden_mismatch(student_h: list[torch.Tensor], teacher_h: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of the mean over tokens of 1 - cos(student, teacher) hidden state."""
    return torch.stack([(1 - nn.functional.cosine_similarity(s.float(), t.float(), dim=-1)).mean()
                        for s, t in zip(student_h, teacher_h)]).mean()


def _kl(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per token from log-probabilities."""
    return (lp.exp() * (lp - lq)).sum(-1)


def _forward(model, batch: torch.Tensor, layers: list[int] | None):
    """(log-probabilities, output hidden states of `layers` or None) of `model` on `batch`."""
    if not layers:
        return torch.log_softmax(model(batch, use_cache=False).logits.float(), -1), None
    with _layer_outputs(model, layers) as hidden:
        lp = torch.log_softmax(model(batch, use_cache=False).logits.float(), -1)
        return lp, hidden()


@torch.no_grad()
def _heldout(student, teacher, ids: torch.Tensor, layer_map: list[int] | None = None, batch_size: int = 4):
    """(mean KL(teacher || student) per token, mean hidden mismatch per row or None) on `ids`."""
    total, count, hidden, rows = 0.0, 0, 0.0, 0
    student_layers = list(range(len(arch.layers(student)))) if layer_map else None
    for i in range(0, len(ids), batch_size):
        b = ids[i : i + batch_size]
        lp, ht = _forward(teacher, b, layer_map)
        lq, hs = _forward(student, b, student_layers)
        total += float(_kl(lp, lq).sum())
        count += b.numel()
        if layer_map:
            hidden += float(hidden_mismatch(hs, ht)) * len(b)
            rows += len(b)
    return total / count, (hidden / rows if layer_map else None)


def heldout_kl(student, teacher, ids: torch.Tensor, batch_size: int = 4) -> float:
    return _heldout(student, teacher, ids, batch_size=batch_size)[0]


def heldout_hidden_mismatch(student, teacher, ids: torch.Tensor, layer_map: list[int], batch_size: int = 4) -> float:
    """The hidden-state term of the loss (without its weight) on `ids`, averaged over rows."""
    return _heldout(student, teacher, ids, layer_map, batch_size)[1]


# ------------------------------------------------------------------------------------- training
def _trainable(model) -> list[torch.nn.Parameter]:
    """Every parameter of the decoder layers and the final norm; not the (tied) embedding."""
    params = [p for layer in model.model.layers for p in layer.parameters()] + list(model.model.norm.parameters())
    return params


def _layer_map(student, teacher, layer_map: list[int] | None) -> list[int]:
    """Teacher layer index of every student layer (identity when no layer was dropped)."""
    n_s, n_t = len(arch.layers(student)), len(arch.layers(teacher))
    if layer_map is None:
        if n_s != n_t:
            raise EdgepruneError(f"hidden-state matching needs the plan's layer indices (layer_map): the student has {n_s} "
                                 f"layers, the teacher {n_t}")
        return list(range(n_s))
    layer_map = [int(i) for i in layer_map]
    if len(layer_map) != n_s or any(not 0 <= i < n_t for i in layer_map):
        raise EdgepruneError(f"layer_map must give a teacher layer (0..{n_t - 1}) for each of the student's {n_s} layers, got {layer_map}")
    return layer_map


def _checkpoint_times(checkpoints, on_checkpoint) -> list[float]:
    times = sorted(float(t) for t in (checkpoints or ()))
    if times and on_checkpoint is None:
        raise EdgepruneError("distillation checkpoints need an on_checkpoint(elapsed_seconds, steps, student) callback")
    if any(not (math.isfinite(t) and t >= 0) for t in times):
        raise EdgepruneError(f"distillation checkpoints are training seconds >= 0, got {list(checkpoints)}")
    return times


def _progress_reporter(progress, seconds: float):
    """progress(label, done, total) with done/total in seconds; a callback that also takes a
    `detail` keyword gets "step N, loss X" (ui.progress keys its bars by label, so the label stays fixed)."""
    if progress is None:
        return lambda elapsed, steps, losses: None
    try:
        detail = "detail" in inspect.signature(progress).parameters
    except (TypeError, ValueError):  # a builtin or C callable: the plain three arguments
        detail = False

    def report(elapsed, steps, losses):
        args = ("distillation", min(int(elapsed), int(seconds)), int(seconds))
        if detail:
            running = sum(losses[-5:]) / max(1, len(losses[-5:]))
            progress(*args, detail=f"step {steps}, loss {running:.4f}")
        else:
            progress(*args)

    return report


def distill(student, teacher, ids: torch.Tensor, heldout: torch.Tensor, seconds: float = KD_DEFAULTS["kd_seconds"],
            lr: float | None = None, batch_size: int = KD_DEFAULTS["kd_batch"], max_steps: int | None = None,
            seed: int = 0, progress=None, hidden: float = KD_DEFAULTS["kd_hidden"], layer_map: list[int] | None = None,
            lora_rank: int = KD_DEFAULTS["kd_lora_rank"], checkpoints: list[float] | None = None, on_checkpoint=None) -> dict:
    """Train `student` (in place) towards `teacher` on `ids` for `seconds`; keep the result only
    when the held-out KL fell.

    `lr` defaults to KD_DEFAULTS["kd_lr"] (full weights) or KD_LORA_LR (`lora_rank` > 0).
    `hidden` > 0 adds the hidden-state term (see the module docstring); `layer_map[i]` is the
    teacher layer of student layer i (plan.layers[i].index), needed when layers were dropped.
    `progress(label, done_seconds, total_seconds)` reports time spent.
    `on_checkpoint(elapsed_seconds, steps, student)` is called (under no_grad) after the first step
    that ends at or past each of `checkpoints` (training seconds). The time box and the checkpoints
    run on one clock from the first training step (the held-out measurement before it and the
    callback's own time excluded), so a
    checkpoint at 60 s sees what `seconds=60` would have ended with (before the keep-or-restore
    decision; with `lora_rank` the student still carries its unmerged adapters then)."""
    if ids is None or len(ids) == 0 or heldout is None or len(heldout) == 0:
        raise EdgepruneError("distillation needs training rows and held-out rows of token ids")
    if not seconds > 0:
        raise EdgepruneError(f"--recover-time must be positive, got {seconds}")
    pending = _checkpoint_times(checkpoints, on_checkpoint)
    lr = lr if lr is not None else (KD_LORA_LR if lora_rank else KD_DEFAULTS["kd_lr"])
    start, paused = time.perf_counter(), 0.0

    def elapsed() -> float:  # training seconds: wall time less the time spent in on_checkpoint
        return time.perf_counter() - start - paused

    teacher_layers = _layer_map(student, teacher, layer_map) if hidden > 0 else None
    student_layers = list(range(len(arch.layers(student)))) if hidden > 0 else None
    before, hidden_before = _heldout(student, teacher, heldout, teacher_layers)
    frozen = {p: p.requires_grad for p in student.parameters()}
    for p in student.parameters():
        p.requires_grad_(False)
    if lora_rank:  # the base weights do not change: dropping the adapters restores them, no copy needed
        saved = None
        adapters = attach_lora(student, [lora_rank] * len(arch.layers(student)), KD_LORA_SCALE, seed)
        params = [p for ad in adapters for p in (ad.lora_A, ad.lora_B)]
    else:
        saved = copy.deepcopy(student.state_dict())
        params = _trainable(student)
        for p in params:
            p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    order, cursor, steps, losses, hidden_losses, fired = torch.randperm(len(ids), generator=g), 0, 0, [], [], []
    bs = min(batch_size, len(ids))
    report_progress = _progress_reporter(progress, seconds)
    teacher.eval()
    kept, after, hidden_after = False, None, None
    wall_start, start = start, time.perf_counter()  # the time box counts training, not the held-out measurement before it
    try:
        while elapsed() < seconds and (max_steps is None or steps < max_steps):
            if cursor + bs > len(order):
                order, cursor = torch.randperm(len(ids), generator=g), 0
            batch = ids[order[cursor : cursor + bs]]
            cursor += bs
            with torch.no_grad():
                lp, ht = _forward(teacher, batch, teacher_layers)
            lq, hs = _forward(student, batch, student_layers)
            loss = _kl(lp, lq).mean()
            if hidden > 0:
                h_loss = hidden_mismatch(hs, ht)
                hidden_losses.append(float(h_loss.detach()))
                loss = loss + hidden * h_loss
            del lp, lq, hs, ht
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            steps += 1
            losses.append(float(loss.detach()))
            while pending and elapsed() >= pending[0]:
                at, now, t_cb = pending.pop(0), elapsed(), time.perf_counter()
                with torch.no_grad():
                    on_checkpoint(now, steps, student)
                paused += time.perf_counter() - t_cb
                fired.append({"at": at, "elapsed": now, "steps": steps})
            report_progress(elapsed(), steps, losses)
        opt = None
        student.zero_grad(set_to_none=True)
        after, hidden_after = _heldout(student, teacher, heldout, teacher_layers)
        kept = after < before
    finally:  # also on an interrupt: the student leaves as a plain model, trained only when that helped
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        student.zero_grad(set_to_none=True)
        del opt
        if lora_rank:
            merge_lora(student, keep=kept)
        elif not kept:
            student.load_state_dict(saved)
    rep = {"steps": steps, "tokens": int(steps * bs * ids.shape[1]), "seconds": time.perf_counter() - wall_start,
           "training_seconds": elapsed(), "lr": lr, "batch": bs, "trainable": f"LoRA rank {lora_rank}" if lora_rank else "full",
           "trainable_params": sum(p.numel() for p in params),
           "loss_first_steps": sum(losses[:5]) / max(1, len(losses[:5])), "loss_last_steps": sum(losses[-5:]) / max(1, len(losses[-5:])),
           "heldout_kl_before": before, "heldout_kl_after": after, "kept": kept,
           "note": None if kept else "held-out KL did not fall: the weights before distillation were restored"}
    if hidden > 0:
        rep.update({"hidden_weight": hidden, "layer_map": teacher_layers, "heldout_hidden_before": hidden_before,
                    "heldout_hidden_after": hidden_after,
                    "hidden_loss_last_steps": sum(hidden_losses[-5:]) / max(1, len(hidden_losses[-5:]))})
    if checkpoints:
        rep["checkpoints"] = fired
        rep["checkpoint_seconds"] = paused
    return rep
