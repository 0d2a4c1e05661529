"""Knowledge-distillation recovery: the dense model teaches the pruned one, on the CPU, time-boxed.

    loss = mean over tokens of KL(p_dense || p_pruned),  p = softmax(logits)

The teacher's log-probabilities are computed for each batch under no_grad (the dense model stays
frozen); the student trains every weight of its decoder layers (attention, FFN and norms) with
AdamW in fp32. The tied embedding / output projection stays frozen: it is shared with the input
and is what the exported GGUF quantizes separately, and it holds a fifth of SmolLM2's parameters.
Training runs until the time budget is spent (or `max_steps`), cycling over the token rows.

Kept only when it helps: before and after, KL(dense || pruned) is measured on held-out rows that
were never trained on; when it did not fall, the weights are put back and the report says so.
"""

from __future__ import annotations

import copy
import time

import torch

from edgeprune.errors import EdgepruneError

KD_DEFAULTS = {"kd_seconds": 180.0, "kd_lr": 5e-5, "kd_batch": 4}


@torch.no_grad()
def heldout_kl(student, teacher, ids: torch.Tensor, batch_size: int = 4) -> float:
    total, count = 0.0, 0
    for i in range(0, len(ids), batch_size):
        b = ids[i : i + batch_size]
        lp = torch.log_softmax(teacher(b, use_cache=False).logits.float(), -1)
        lq = torch.log_softmax(student(b, use_cache=False).logits.float(), -1)
        total += float((lp.exp() * (lp - lq)).sum())
        count += b.numel()
    return total / count


def _trainable(model) -> list[torch.nn.Parameter]:
    """Every parameter of the decoder layers and the final norm; not the (tied) embedding."""
    params = [p for layer in model.model.layers for p in layer.parameters()] + list(model.model.norm.parameters())
    return params


def distill(student, teacher, ids: torch.Tensor, heldout: torch.Tensor, seconds: float = KD_DEFAULTS["kd_seconds"],
            lr: float = KD_DEFAULTS["kd_lr"], batch_size: int = KD_DEFAULTS["kd_batch"], max_steps: int | None = None,
            seed: int = 0, progress=None) -> dict:
    """Train `student` (in place) towards `teacher` on `ids` for `seconds`; keep the result only
    when the held-out KL fell. `progress(label, done_seconds, total_seconds)` reports time spent."""
    if ids is None or len(ids) == 0 or heldout is None or len(heldout) == 0:
        raise EdgepruneError("distillation needs training rows and held-out rows of token ids")
    if not seconds > 0:
        raise EdgepruneError(f"--recover-time must be positive, got {seconds}")
    start = time.perf_counter()
    before = heldout_kl(student, teacher, heldout)
    saved = copy.deepcopy(student.state_dict())
    frozen = {p: p.requires_grad for p in student.parameters()}
    for p in student.parameters():
        p.requires_grad_(False)
    params = _trainable(student)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    order, cursor, steps, losses = torch.randperm(len(ids), generator=g), 0, 0, []
    bs = min(batch_size, len(ids))
    teacher.eval()
    try:
        while time.perf_counter() - start < seconds and (max_steps is None or steps < max_steps):
            if cursor + bs > len(order):
                order, cursor = torch.randperm(len(ids), generator=g), 0
            batch = ids[order[cursor : cursor + bs]]
            cursor += bs
            with torch.no_grad():
                lp = torch.log_softmax(teacher(batch, use_cache=False).logits.float(), -1)
            lq = torch.log_softmax(student(batch, use_cache=False).logits.float(), -1)
            loss = (lp.exp() * (lp - lq)).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            steps += 1
            losses.append(float(loss.detach()))
            if progress:
                progress("distillation", min(int(time.perf_counter() - start), int(seconds)), int(seconds))
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        student.zero_grad(set_to_none=True)
        del opt
    after = heldout_kl(student, teacher, heldout)
    kept = after < before
    if not kept:
        student.load_state_dict(saved)
    return {"steps": steps, "tokens": int(steps * bs * ids.shape[1]), "seconds": time.perf_counter() - start,
            "lr": lr, "batch": bs, "trainable_params": sum(p.numel() for p in params),
            "loss_first_steps": sum(losses[:5]) / max(1, len(losses[:5])), "loss_last_steps": sum(losses[-5:]) / max(1, len(losses[-5:])),
            "heldout_kl_before": before, "heldout_kl_after": after, "kept": kept,
            "note": None if kept else "held-out KL did not fall: the weights before distillation were restored"}
