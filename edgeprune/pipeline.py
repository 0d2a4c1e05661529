"""The prune pipeline the CLI, `fit` and the benchmarks share: calibrate once, plan, apply, save."""

from __future__ import annotations

import time
from pathlib import Path

from edgeprune import arch
from edgeprune.calibrate import CalibrationStats, calibrate
from edgeprune.checkpoint import save_pruned
from edgeprune.data import calibration_ids
from edgeprune.exporters.common import atomic_dir
from edgeprune.plan import PrunePlan, base_description
from edgeprune.prune import make_plan, pruned_copy
from edgeprune.report import plot_widths, write_json


def base_of(lm) -> dict:
    return base_description(lm.model, lm.spec, lm.fingerprint)


def calibration_pass(lm, source="self", nsamples=32, seqlen=128, seed=0, gram=False, progress=None):
    """Calibration tokens and one block-by-block pass; returns (ids, stats, timings)."""
    ids, desc, gen_s = calibration_ids(lm.model, lm.tokenizer, source, nsamples, seqlen, seed, fingerprint=lm.fingerprint,
                                       progress=(lambda i, n: progress("calibration text", i, n)) if progress else None)
    stats = calibrate(lm.model, ids, gram=gram, description=desc,
                      progress=(lambda i, n: progress("calibration pass", i, n)) if progress else None)
    return ids, stats, {"calibration_text_s": gen_s, "calibration_pass_s": stats.seconds}


def prune_and_save(lm, stats: CalibrationStats | None, out: Path, plan: PrunePlan | None = None, report: dict | None = None, **plan_args):
    """Make (or re-apply) a plan, prune a copy of the dense model, write checkpoint + plan + report + PNG atomically."""
    timings = {}
    t = time.perf_counter()
    if plan is None:
        plan = make_plan(lm.model, stats, base_of(lm), **plan_args)
    else:
        plan.check_base(base_of(lm))
    timings["plan_s"] = time.perf_counter() - t
    t = time.perf_counter()
    pruned = pruned_copy(lm.model, plan)
    timings["apply_s"] = time.perf_counter() - t
    t = time.perf_counter()
    with atomic_dir(Path(out)) as tmp:
        save_pruned(pruned, lm.tokenizer, plan, tmp)
        plot_widths(plan, stats, tmp / "widths.png")
        timings["save_s"] = time.perf_counter() - t
        report = dict(report or {})
        report.setdefault("timings", {}).update(timings)
        report["plan"] = {"method": plan.method, "achieved": plan.achieved, "dropped_layers": plan.dropped_layers}
        report["layer_shapes"] = [s.to_dict() for s in arch.layer_shapes(pruned)]
        write_json(tmp / "report.json", report)
    return pruned, plan, report
