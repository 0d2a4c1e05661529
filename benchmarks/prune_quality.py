"""Pruning quality on SmolLM2-135M: every scorer x {uniform, CFSP} allocation x sparsity, with and
without dropping 2 layers, calibrated on self-generated text and on WikiText-2 valid.

Prints a table, writes a JSON record and a plot. Also measures the speed target: wall time of
calibration -> pruned checkpoint (an `edgeprune prune` subprocess, peak RSS included) against one
plain dense forward pass (with lm_head) over the same calibration tokens, in the same run.

    python benchmarks/prune_quality.py --quick            # ~eval on 8 windows, 32x256 calibration
    python benchmarks/prune_quality.py                    # 128x512 calibration, full test split
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from edgeprune.calibrate import calibrate
from edgeprune.data import calibration_ids
from edgeprune.evaluate import load_text, perplexity, token_windows
from edgeprune.models import load_model
from edgeprune.pipeline import base_of
from edgeprune.prune import make_plan, pruned_copy

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SCORES = ("cfsp", "activation", "wanda-sp", "magnitude", "random")


def dense_forward_seconds(model, ids, batch_size=8):
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(ids), batch_size):
            model(ids[i : i + batch_size], use_cache=False)
    return time.perf_counter() - start


def timed_prune_subprocess(model_spec, calib, nsamples, seqlen, sparsity, out):
    """Wall time and peak RSS of `edgeprune prune` as a user runs it (calibration text already cached)."""
    cmd = [sys.executable, "-m", "edgeprune.cli", "prune", model_spec, "--calib", calib, "--nsamples", str(nsamples),
           "--seqlen", str(seqlen), "--sparsity", str(sparsity), "--out", str(out), "--json"]
    import psutil

    # Peak RSS by polling the child: ru_maxrss would include this (model-holding) parent's pages at fork.
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    child, peak = psutil.Process(proc.pid), 0.0
    while proc.poll() is None:
        try:
            peak = max(peak, child.memory_info().rss / 2**20)
        except psutil.Error:
            pass
        time.sleep(0.1)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"prune failed: {stderr[-400:]}")
    report = json.loads(stdout)
    return wall, peak, report["timings"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quick", action="store_true", help="8 eval windows, 32x256 calibration, fewer configs")
    ap.add_argument("--eval-windows", type=int, default=None, help="default: all windows (8 with --quick)")
    ap.add_argument("--sparsities", default="0.2,0.3,0.5")
    ap.add_argument("--out", default="benchmarks/results/prune_quality.json")
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    nsamples, seqlen = (32, 256) if args.quick else (128, 512)
    eval_windows = args.eval_windows or (8 if args.quick else None)
    sparsities = [float(s) for s in args.sparsities.split(",")]

    lm = load_model(args.model)
    windows = token_windows(lm.tokenizer, load_text(DATA / "wikitext2-test.raw"), 512, eval_windows)
    record = {"model": args.model, "calibration": f"{nsamples}x{seqlen}", "eval": {"windows": len(windows), "seqlen": 512}, "rows": []}
    dense = perplexity(lm.model, windows)
    record["dense_ppl"] = dense["perplexity"]
    record["eval"]["protocol"] = dense["protocol"]
    print(f"dense ppl {dense['perplexity']:.3f} on {len(windows)} x 512 WikiText-2 test windows")

    sources = {"wikitext2-valid": str(DATA / "wikitext2-valid.raw"), "self": "self"}
    for name, src in sources.items():
        t = time.perf_counter()
        ids, desc, gen_s = calibration_ids(lm.model, lm.tokenizer, src, nsamples, seqlen, 0, fingerprint=lm.fingerprint)
        stats = calibrate(lm.model, ids, description=desc)
        fwd = dense_forward_seconds(lm.model, ids)
        print(f"[{name}] calibration text {gen_s:.1f}s, calibration pass {stats.seconds:.1f}s, dense forward {fwd:.1f}s")
        with tempfile.TemporaryDirectory() as tmp:
            wall, peak, timings = timed_prune_subprocess(args.model, src, nsamples, seqlen, 0.3, Path(tmp) / "p")
        calib_to_ckpt = sum(timings[k] for k in ("calibration_pass_s", "plan_s", "apply_s", "save_s"))
        record.setdefault("speed", {})[name] = {
            "dense_forward_s": fwd, "calibration_pass_s": stats.seconds, "calibration_to_checkpoint_s": calib_to_ckpt,
            "ratio_to_dense_forward": calib_to_ckpt / fwd, "prune_subprocess_wall_s": wall, "prune_peak_rss_mib": peak,
            "calibration_text_s": gen_s, "timings": timings,
        }
        print(f"[{name}] calibration->checkpoint {calib_to_ckpt:.1f}s = {calib_to_ckpt / fwd:.2f} x dense forward; "
              f"prune subprocess {wall:.1f}s wall, peak RSS {peak:.0f} MiB")
        configs = []
        for p in sparsities:
            for score in SCORES if name == "wikitext2-valid" else ("cfsp", "activation"):
                for alloc in ("uniform", "cfsp"):
                    configs.append(dict(sparsity=p, score=score, allocation=alloc, drop_layers=0))
            configs.append(dict(sparsity=p, score="cfsp", allocation="cfsp", drop_layers=2))
            configs.append(dict(sparsity=p, score="cfsp", allocation="uniform", drop_layers=2))
        if name == "wikitext2-valid":
            configs += [dict(sparsity=0.3, score="cfsp", allocation="cfsp", drop_layers=0, temperature=t) for t in (5.0, 10.0, 40.0)]
        for cfg in configs:
            t0 = time.perf_counter()
            plan = make_plan(lm.model, stats, base_of(lm), method=cfg["allocation"], **{k: v for k, v in cfg.items() if k != "allocation"})
            pruned = pruned_copy(lm.model, plan)
            prune_s = time.perf_counter() - t0
            ppl = perplexity(pruned, windows)["perplexity"]
            row = {"calibration": name, **cfg, "temperature": cfg.get("temperature", plan.method["temperature"]),
                   "ppl": ppl, "ffn_sparsity": plan.achieved["ffn_sparsity"], "model_sparsity": plan.achieved["model_sparsity"],
                   "params": plan.achieved["params_pruned"], "plan_and_apply_s": prune_s}
            record["rows"].append(row)
            print(f"  {name:15s} p={cfg['sparsity']:.2f} {cfg['allocation']:7s} {cfg['score']:10s} drop={cfg['drop_layers']} "
                  f"tau={row['temperature']:<4g} ppl {ppl:8.3f}  (FFN {row['ffn_sparsity']:.3f}, model {row['model_sparsity']:.3f})")
            del pruned
            out.write_text(json.dumps(record, indent=1))
    plot(record, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def plot(record, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for ax, calib in zip(axes, ("wikitext2-valid", "self")):
        rows = [r for r in record["rows"] if r["calibration"] == calib and r["drop_layers"] == 0 and r["temperature"] == 20.0]
        for score in SCORES:
            for alloc, ls in (("cfsp", "-"), ("uniform", ":")):
                pts = sorted((r["sparsity"], r["ppl"]) for r in rows if r["score"] == score and r["allocation"] == alloc)
                if pts:
                    ax.plot(*zip(*pts), ls=ls, marker="o", label=f"{score} / {alloc}")
        drop = sorted((r["sparsity"], r["ppl"]) for r in record["rows"] if r["calibration"] == calib and r["drop_layers"] == 2 and r["allocation"] == "cfsp")
        if drop:
            ax.plot(*zip(*drop), color="black", marker="x", label="cfsp / cfsp + drop 2 layers")
        ax.axhline(record["dense_ppl"], color="grey", ls="--", lw=0.8, label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("FFN-equivalent sparsity")
        ax.set_ylabel("WikiText-2 test ppl (seq 512)")
        ax.set_title(f"calibration: {calib} ({record['calibration']})", fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
