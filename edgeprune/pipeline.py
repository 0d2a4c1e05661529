"""The prune pipeline the CLI, `fit` and the benchmarks share: calibrate once, plan, apply, recover, save."""

from __future__ import annotations

import time
from pathlib import Path

from edgeprune import arch
from edgeprune.calibrate import CalibrationStats, calibrate
from edgeprune.checkpoint import save_pruned
from edgeprune.data import calibration_ids
from edgeprune.apply import apply_plan, pruning_in_place
from edgeprune.exporters.common import atomic_dir
from edgeprune.plan import PrunePlan, base_description
from edgeprune.prune import make_plan, pruned_copy
from edgeprune.report import plot_widths, write_json


def base_of(lm) -> dict:
    return base_description(lm.model, lm.spec, lm.fingerprint)


def calibration_pass(lm, source="self", nsamples=32, seqlen=128, seed=0, gram=False, progress=None, block_device=None):
    """Calibration tokens and one block-by-block pass (each block on `block_device` when given, offload.py);
    returns (ids, stats, timings)."""
    ids, desc, gen_s = calibration_ids(lm.model, lm.tokenizer, source, nsamples, seqlen, seed, fingerprint=lm.fingerprint,
                                       progress=(lambda i, n: progress("calibration text", i, n)) if progress else None)
    stats = calibrate(lm.model, ids, gram=gram, description=desc, block_device=block_device,
                      progress=(lambda i, n: progress("calibration pass", i, n)) if progress else None)
    return ids, stats, {"calibration_text_s": gen_s, "calibration_pass_s": stats.seconds}


def _recalibrate_for(lm, plan: PrunePlan, progress=None, block_device=None):
    """A fresh calibration pass with the data the plan was made from (re-applying a plan that records a recovery)."""
    from edgeprune.errors import EdgepruneError
    from edgeprune.recover import needs

    cal = plan.calibration or {}
    missing = [k for k in ("source", "nsamples", "seqlen", "seed") if k not in cal]
    if missing:
        raise EdgepruneError(f"the plan records recovery '{plan.method['recover']}' but not its calibration data ({', '.join(missing)})")
    return calibration_pass(lm, cal["source"], cal["nsamples"], cal["seqlen"], cal["seed"],
                            gram=needs(plan.method["recover"])["gram"], progress=progress, block_device=block_device)


def prune_and_save(lm, stats: CalibrationStats | None, out: Path, plan: PrunePlan | None = None, report: dict | None = None,
                   ids=None, progress=None, inplace: bool = False, block_device=None, **plan_args):
    """Make (or re-apply) a plan, prune the dense model, run the plan's recovery, and write
    checkpoint + plan + report + PNG atomically. `plan_args` go to prune.make_plan.

    `inplace`: the dense model itself becomes the pruned one (the CLI's prune: it is not needed
    afterwards), block by block when a closed-form recovery runs, so peak memory is the model plus
    one block; kd keeps a pruned copy, since it distills from the dense model. `block_device`: the
    block-by-block passes run each block there, one at a time (offload.py, `prune --offload`).

    Recovery needs calibration statistics (with Gram matrices for lstsq/mask) and, for LoRA, the
    calibration ids; when they are not given (re-applying a plan) one fresh pass over the plan's
    own calibration data provides them."""
    from edgeprune.recover import CLOSED_FORM, needs, recover

    timings = {}
    t = time.perf_counter()
    if plan is None:
        sens = (lambda i, n: progress("sensitivity", i, n)) if progress else None
        plan = make_plan(lm.model, stats, base_of(lm), ids=ids, progress=sens, **plan_args)
    else:
        plan.check_base(base_of(lm))
    timings["plan_s"] = time.perf_counter() - t
    need = needs(plan.method["recover"])
    if need["stats"] and (stats is None or (need["gram"] and stats.blocks[0].ffn.gram is None) or (need["ids"] and ids is None)):
        ids, stats, cal_t = _recalibrate_for(lm, plan, progress, block_device)
        timings.update({f"recovery_{k}": v for k, v in cal_t.items()})
    steps = [x for x in plan.method["recover"].split("+") if x != "none"]
    in_place = inplace and "kd" not in steps and (not steps or steps[0] in CLOSED_FORM)
    t = time.perf_counter()
    recovery = {}
    if in_place and steps:  # pruned block by block inside the dense model: one block of extra memory
        recovery = recover(lm.model, None, plan, stats, ids, progress=progress, blocks=pruning_in_place(lm.model, plan),
                           block_device=block_device)
        pruned = lm.model
        timings["recover_s"] = time.perf_counter() - t
    else:
        if in_place:
            apply_plan(lm.model, plan)
            pruned = lm.model
        else:  # kd distills from the dense model: keep it
            pruned = pruned_copy(lm.model, plan)
        timings["apply_s"] = time.perf_counter() - t
        if need["stats"]:
            t = time.perf_counter()
            recovery = recover(pruned, lm.model, plan, stats, ids, progress=progress, block_device=block_device)
            timings["recover_s"] = time.perf_counter() - t
    t = time.perf_counter()
    with atomic_dir(Path(out)) as tmp:
        save_pruned(pruned, lm.tokenizer, plan, tmp)
        plot_widths(plan, stats, tmp / "widths.png")
        timings["save_s"] = time.perf_counter() - t
        report = dict(report or {})
        report.setdefault("timings", {}).update(timings)
        report["plan"] = {"method": plan.method, "achieved": plan.achieved, "dropped_layers": plan.dropped_layers}
        if recovery:
            report["recovery"] = recovery
        report["layer_shapes"] = [s.to_dict() for s in arch.layer_shapes(pruned)]
        write_json(tmp / "report.json", report)
    return pruned, plan, report
