"""Pruning quality on SmolLM2-135M side by side with the CFSP authors' procedure.

Protocol (issue #12): fp32 SmolLM2-135M, 32 x 512 WikiText-2 *valid* calibration tokens (seed 0),
torch perplexity on the first 16 x 512 WikiText-2 *test* windows (the project's protocol,
edgeprune.evaluate). At each FFN sparsity the authors' procedure runs first; every edgeprune row
then keeps exactly the FFN channels it kept (its widths are multiples of 128), so the rows compare
at equal kept FFN parameters.

The authors' procedure (wyxscir/CFSP, `prune_cfsp` with its start.sh settings, re-implemented here
from its description in edgeprune's research notes, not copied): block importance = the *sum* of
per-token angular distances over all calibration tokens; s_l = sigmoid((I_l - mean I) / 1e4),
shrunk when the largest keep ratio would reach 1 (their 1.05 margin); keep ratio
s_l / mean(s) * (1 - p); width int((n * ratio + 64) / 128) * 128; channels ranked by their
"three_w_one_wa" score, in which the weight terms cancel and the ranking is the activation norm
||X_j||; no compensation. (The one deliberate difference: the cosine is clamped to [-1, 1], where
their code would stop on NaN.) With 16k calibration tokens the importance differences are a few
hundred, so after the 1e4 the allocation is nearly uniform.

Rows: allocation (uniform, cfsp, sensitivity) x score x recovery (none, bias, lstsq and its variants below), wall time of
plan + prune + recovery and peak RSS sampled during the row; then distillation from the dense model
(edgeprune.distill) on top of the best retraining-free row, measured after 1, 3 and 10 minutes of
training (one run, checkpoints). Prints a table, writes benchmarks/results/prune_quality.json and
a PNG.

    python benchmarks/prune_quality.py                        # the default grid (~90 min here)
    python benchmarks/prune_quality.py --grid full            # every allocation x score x recovery
    python benchmarks/prune_quality.py --sparsities 0.5 --grid target --kd-minutes 1,3 --out b.json
    python benchmarks/prune_quality.py --merge a.json b.json --out benchmarks/results/prune_quality.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from edgeprune import arch, budget
from edgeprune.calibrate import calibrate
from edgeprune.data import calibration_ids
from edgeprune.distill import distill
from edgeprune.evaluate import load_text, perplexity, token_windows
from edgeprune.methods import _top
from edgeprune.models import load_model
from edgeprune.pipeline import base_of
from edgeprune.plan import LayerPlan, PrunePlan
from edgeprune.prune import make_plan, pruned_copy, with_recovery
from edgeprune.recover import recover

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("EDGEPRUNE_SHARED_DATA", HERE.parent.parent / "shared" / "data"))
ALLOCATIONS = ("uniform", "cfsp", "sensitivity")
SCORES = ("cfsp", "activation", "wanda-sp", "magnitude", "condition")
RECOVERIES = ("none", "bias", "lstsq-refit", "lstsq", "lstsq-obs")
# lstsq: prune's default, the sequential refit and then each block's FFN tuned towards the dense block
# output (edgeprune/blocktune.py); lstsq-refit: the refit alone (lstsq_tune=0); lstsq-obs: the default
# with the FFN channels re-chosen block by block by sequential OBS (edgeprune/reselect.py)
RECOVERY_ARGS = {"lstsq-refit": ("lstsq", {"lstsq_tune": 0}), "lstsq-obs": ("lstsq", {"lstsq_select": "obs"})}
# the default grid: every allocation with the default score and recoveries, every score with CFSP's allocation
DEFAULT_GRID = [("uniform", "cfsp", "none")] + [(a, "cfsp", r) for a in ("cfsp", "sensitivity") for r in ("none", "lstsq")] + \
               [("cfsp", s, "none") for s in ("activation", "wanda-sp", "condition")] + [("cfsp", "condition", "lstsq"), ("cfsp", "cfsp", "lstsq-refit"), ("cfsp", "cfsp", "lstsq-obs")]
SMOKE_GRID = [("cfsp", "cfsp", "none"), ("sensitivity", "cfsp", "lstsq"), ("cfsp", "condition", "none")]
TARGET_GRID = [("uniform", "cfsp", "none"), ("cfsp", "cfsp", "none"), ("cfsp", "cfsp", "lstsq-refit"), ("cfsp", "cfsp", "lstsq"),
               ("cfsp", "cfsp", "lstsq-obs")]  # the rows the targets are read from


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 50 ms)."""

    def __enter__(self):
        import psutil

        self._proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)
        self.mib = self.peak / 2**20


def authors_widths(stats, n: int, p: float) -> list[int]:
    """The CFSP reference code's per-block widths (module docstring)."""
    imp = np.array([b.angular * stats.tokens for b in stats.blocks], dtype=np.float64)  # a sum, not a mean
    s = 1 / (1 + np.exp(-(imp - imp.mean()) / 1e4))
    avg = s.mean()
    if s.max() / avg * (1 - p) >= 1:
        scale = (avg * (1 / (1 - p) - 1)) / (s.max() - avg) / 1.05
        s = avg + (s - avg) * scale
        avg = s.mean()
    ratios = s / avg * (1 - p)
    return [int((n * r + 64) / 128) * 128 for r in ratios]


def authors_plan(model, stats, base, p: float) -> PrunePlan:
    layers = arch.layers(model)
    n, n_kv = model.config.intermediate_size, model.config.num_key_value_heads
    plans = [LayerPlan(index=i, ffn_keep=_top(stats.blocks[i].ffn.norm, w), kv_keep=list(range(n_kv)))
             for i, w in enumerate(authors_widths(stats, n, p))]
    plan = PrunePlan(base=base, method={"method": "cfsp-authors", "allocation": "authors", "score": "activation", "sparsity": p,
                                        "recover": "none", "recover_args": {}},
                     calibration=dict(stats.description), layers=plans, dropped_layers=[])
    plan.achieved = budget.achieved(model, plan)
    assert len(layers) == len(plans)
    return plan


def evaluate(model, windows) -> float:
    return perplexity(model, windows)["perplexity"]


def run_row(lm, stats, ids, windows, sparsity, allocation, score, recovery):
    with PeakRSS() as rss:
        t = time.perf_counter()
        method = "uniform" if allocation == "uniform" else "cfsp"
        plan = make_plan(lm.model, stats, base_of(lm), sparsity, method=method, score=score,
                         allocation=None if allocation == "uniform" else allocation, recover="none", align=32, ids=ids)
        plan_s = time.perf_counter() - t
        step, step_args = RECOVERY_ARGS.get(recovery, (recovery, None))
        trial = plan if recovery == "none" else with_recovery(plan, step, step_args)
        model = pruned_copy(lm.model, trial)
        summary = None
        if recovery != "none":
            rep = recover(model, lm.model, trial, stats, ids)
            summary = (rep.get(step) or {}).get("summary")
        wall = time.perf_counter() - t
    row = {"sparsity": sparsity, "allocation": allocation, "score": score, "recovery": recovery, "ppl": evaluate(model, windows),
           "ffn_sparsity": plan.achieved["ffn_sparsity"], "kept_ffn_channels": sum(len(lp.ffn_keep) for lp in plan.layers),
           "widths": [len(lp.ffn_keep) for lp in plan.layers], "plan_s": plan_s, "wall_s": wall, "peak_rss_mib": rss.mib,
           "recovery_summary": summary}
    if "sensitivity" in plan.method:
        row["sensitivity_s"] = plan.method["sensitivity"]["seconds"]
    return row, model, trial


def distill_row(lm, model, plan, ids, windows, minutes: list[float], base_row):
    """Distil `model` from the dense one, measuring the test perplexity at each checkpoint."""
    held = ids[-2:]  # distillation's own held-out rows (decide keep/restore); the test windows stay unseen
    train = ids[:-2]
    points = []

    def on_checkpoint(elapsed, steps, student):
        points.append({"minutes": elapsed / 60, "steps": steps, "ppl": evaluate(student, windows)})
        print(f"    kd after {elapsed / 60:.1f} min ({steps} steps): ppl {points[-1]['ppl']:.2f}", flush=True)

    with PeakRSS() as rss:
        rep = distill(model, lm.model, train, held, seconds=max(minutes) * 60, checkpoints=[m * 60 for m in minutes],
                      on_checkpoint=on_checkpoint)
    return {**{k: base_row[k] for k in ("sparsity", "allocation", "score", "kept_ffn_channels")}, "recovery": f"{base_row['recovery']}+kd",
            "kd": {k: v for k, v in rep.items() if not isinstance(v, (list, dict))}, "checkpoints": points,
            "ppl_final": evaluate(model, windows), "peak_rss_mib": rss.mib}


def kd_minutes_at(spec: str, p: float) -> list[float]:
    """'0.3:1,3,10;0.5:1,3' -> the checkpoints at sparsity p ([] when p is not listed); '1,3' -> for every p."""
    if ":" not in spec:
        return [float(m) for m in spec.split(",") if m.strip()]
    for part in spec.split(";"):
        at, _, minutes = part.partition(":")
        if at.strip() and math.isclose(float(at), p):
            return [float(m) for m in minutes.split(",") if m.strip()]
    return []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sparsities", default="0.2,0.3,0.5")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--grid", choices=("default", "full", "target", "smoke"), default="default")
    ap.add_argument("--kd-minutes", default="0.2:1,3;0.3:1,3,10;0.5:1,3",
                    help="distillation checkpoints in minutes, per sparsity ('0.3:1,3,10;0.5:1,3') or for all ('1,3,10'); empty: none")
    ap.add_argument("--out", default=str(HERE / "results" / "prune_quality.json"))
    ap.add_argument("--merge", nargs="+", help="merge these JSON records (same protocol, other sparsities) into --out, plot, print")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge:
        return merge(args.merge, out)
    start = time.perf_counter()
    lm = load_model(args.model)
    windows = token_windows(lm.tokenizer, load_text(DATA / "wikitext2-test.raw"), 512, args.windows)
    ids, desc, _ = calibration_ids(lm.model, lm.tokenizer, str(DATA / "wikitext2-valid.raw"), args.nsamples, 512, 0,
                                   fingerprint=lm.fingerprint)
    with PeakRSS() as rss:
        stats = calibrate(lm.model, ids, gram=True, description=desc)
    record = {"model": args.model, "threads": torch.get_num_threads(),
              "protocol": f"{args.nsamples}x512 WikiText-2 valid calibration (seed 0); torch fp32 perplexity on the first "
                          f"{len(windows)}x512 WikiText-2 test windows; edgeprune rows keep the authors' FFN channel count",
              "calibration": {"seconds": stats.seconds, "peak_rss_mib": rss.mib, "tokens": stats.tokens},
              "dense_ppl": evaluate(lm.model, windows), "rows": [], "distillation": []}
    print(f"dense ppl {record['dense_ppl']:.2f}; calibration {stats.seconds:.0f} s", flush=True)
    grid = {"full": [(a, s, r) for a in ALLOCATIONS for s in SCORES for r in RECOVERIES], "default": DEFAULT_GRID,
            "target": TARGET_GRID, "smoke": SMOKE_GRID}[args.grid]
    n_total = lm.model.config.intermediate_size * lm.model.config.num_hidden_layers
    for p in (float(x) for x in args.sparsities.split(",")):
        with PeakRSS() as rss:
            t = time.perf_counter()
            ref = authors_plan(lm.model, stats, base_of(lm), p)
            model = pruned_copy(lm.model, ref)
            wall = time.perf_counter() - t
        kept = sum(len(lp.ffn_keep) for lp in ref.layers)
        ref_row = {"sparsity": p, "allocation": "authors", "score": "activation", "recovery": "none", "ppl": evaluate(model, windows),
                   "ffn_sparsity": 1 - kept / n_total, "kept_ffn_channels": kept, "widths": [len(lp.ffn_keep) for lp in ref.layers],
                   "wall_s": wall, "peak_rss_mib": rss.mib}
        record["rows"].append(ref_row)
        del model
        equal = 1 - kept / n_total  # edgeprune at the authors' kept FFN fraction
        print(f"{p:.0%} authors' CFSP: ppl {ref_row['ppl']:.2f} (FFN sparsity {equal:.4f}, widths {sorted(set(ref_row['widths']))})", flush=True)
        best = None
        for allocation, score, recovery in grid:
            row, model, plan = run_row(lm, stats, ids, windows, equal, allocation, score, recovery)
            row["vs_authors"] = row["ppl"] / ref_row["ppl"] - 1
            row["nominal_sparsity"] = p
            record["rows"].append(row)
            print(f"  {allocation:11s} {score:10s} {recovery:6s} ppl {row['ppl']:8.2f} ({row['vs_authors']:+.1%} vs authors) "
                  f"{row['wall_s']:6.0f} s {row['peak_rss_mib']:6.0f} MiB", flush=True)
            if best is None or row["ppl"] < best[0]["ppl"]:
                best = (row, model, plan)
            else:
                del model
            out.write_text(json.dumps(record, indent=1) + "\n")
        kd_minutes = kd_minutes_at(args.kd_minutes, p)
        if kd_minutes and best is not None:
            row, model, plan = best
            print(f"  kd on top of {row['allocation']}/{row['score']}/{row['recovery']} for {max(kd_minutes):g} min", flush=True)
            kd = distill_row(lm, model, plan, ids, windows, kd_minutes, row)
            for c in kd["checkpoints"]:
                c["vs_authors"] = c["ppl"] / ref_row["ppl"] - 1
            kd["nominal_sparsity"] = p
            record["distillation"].append(kd)
        best = model = None
        out.write_text(json.dumps(record, indent=1) + "\n")
    record["total_s"] = time.perf_counter() - start
    out.write_text(json.dumps(record, indent=1) + "\n")
    plot(record, out.with_suffix(".png"))
    print(summary_table(record))
    print(f"wrote {out} and {out.with_suffix('.png')} in {record['total_s'] / 60:.0f} min")
    return 0


def merge(paths, out: Path) -> int:
    """One record from runs of the same protocol at different sparsities (a long grid split in two)."""
    records = [json.loads(Path(p).read_text()) for p in paths]
    record = dict(records[0])
    record["rows"] = [r for rec in records for r in rec["rows"]]
    record["distillation"] = [k for rec in records for k in rec["distillation"]]
    record["runs"] = [{"path": str(p), "total_s": rec.get("total_s"), "sparsities": sorted({r["sparsity"] for r in rec["rows"] if r["allocation"] == "authors"})}
                      for p, rec in zip(paths, records)]
    out.write_text(json.dumps(record, indent=1) + "\n")
    plot(record, out.with_suffix(".png"))
    print(summary_table(record))
    return 0


def summary_table(record) -> str:
    lines = ["| FFN sparsity | authors' CFSP | cfsp, no recovery | the default: cfsp + lstsq | best retraining-free | best + kd 1 / 3 / 10 min |",
             "|---|---|---|---|---|---|"]
    for ref in (r for r in record["rows"] if r["allocation"] == "authors"):
        p = ref["sparsity"]
        rows = [r for r in record["rows"] if r.get("nominal_sparsity") == p]
        plain = next((r for r in rows if (r["allocation"], r["score"], r["recovery"]) == ("cfsp", "cfsp", "none")), None)
        default = next((r for r in rows if (r["allocation"], r["score"], r["recovery"]) == ("cfsp", "cfsp", "lstsq")), None)
        best = min(rows, key=lambda r: r["ppl"]) if rows else None
        kd = next((k for k in record["distillation"] if k["nominal_sparsity"] == p), None)
        cell = lambda r: f"{r['ppl']:.2f} ({r['ppl'] / ref['ppl'] - 1:+.0%})" if r else "-"
        kd_cell = " / ".join(f"{c['ppl']:.2f} ({c['vs_authors']:+.0%})" for c in kd["checkpoints"]) if kd else "-"
        lines.append(f"| {p:.0%} | {ref['ppl']:.2f} | {cell(plain)} | {cell(default)} | {cell(best)} {best['allocation']}/{best['score']}/{best['recovery']} "
                     f"| {kd_cell} |" if best else f"| {p:.0%} | {ref['ppl']:.2f} | - | - | - | - |")
    return "\n".join(lines)


def plot(record, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    refs = sorted((r["sparsity"], r["ppl"]) for r in record["rows"] if r["allocation"] == "authors")
    ax.plot(*zip(*refs), color="black", lw=2, marker="s", label="CFSP authors' procedure")
    combos = sorted({(r["allocation"], r["score"], r["recovery"]) for r in record["rows"] if r["allocation"] != "authors"})
    for combo in combos:
        pts = sorted((r["nominal_sparsity"], r["ppl"]) for r in record["rows"] if (r["allocation"], r["score"], r["recovery"]) == combo)
        ax.plot(*zip(*pts), marker="o", ms=3, lw=1, ls="-" if combo[2].startswith("lstsq") else ":", label="/".join(combo))
    for kd in record["distillation"]:
        for c in kd["checkpoints"]:
            ax.scatter([kd["nominal_sparsity"]], [c["ppl"]], marker="*", s=40 + 6 * c["minutes"], color="crimson", zorder=5)
    ax.scatter([], [], marker="*", color="crimson", label="+ distillation (1/3/10 min: bigger star = longer)")
    ax.axhline(record["dense_ppl"], color="grey", ls="--", lw=0.8, label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("FFN sparsity (nominal; every row keeps the authors' channel count)")
    ax.set_ylabel("WikiText-2 test perplexity (seq 512)")
    ax.set_title(f"SmolLM2-135M, {record['protocol'][:60]}...", fontsize=8)
    ax.legend(fontsize=5.5, ncol=2)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    sys.exit(main())
