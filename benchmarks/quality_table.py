"""Side-by-side quality of the seed methods on SmolLM2-135M: method x sparsity x recovery.

Sparsity is a fraction of *all linear-layer parameters* (attention + FFN, target "linear"), so
FFN-only methods (cfsp, comp) take the whole budget from FFNs (and dropped layers) while flap and
the `heads` variants also remove KV groups. Every row uses the same calibration data (WikiText-2
validation, one dense pass that also collects the Gram matrices) and is scored on WikiText-2 test
at seq 512 (edgeprune's protocol) and seq 128 (FLAP's). Per row: perplexities, achieved
sparsities, prune time (plan + apply + recovery; the shared calibration pass is reported once) and
the peak RSS of the process while that row was pruned (sampled every 10 ms; the dense model and the
calibration statistics, Gram included, are resident throughout).

Rows
  cfsp            CFSP allocation + cfsp score, FFN only                        (edgeprune default)
  wanda-sp        uniform, Wanda score ||X||·|W|, FFN channels + KV groups     (FLAP's baseline)
  flap            global fluctuation ranking, FFN + KV groups
  fasp            uniform, Wanda score on the consuming matrix, FFN only (fasp-heads: + KV groups)
  comp            drop 2 layers (Block Influence) + condition metric (comp-act: activation norm)
  recoveries      none / bias / lstsq / mask (closed form) / lora (IG-LoRA, retraining)

    python benchmarks/quality_table.py --quick --threads 1   # 32x256 calibration, 4x512 + 16x128 eval tokens
    python benchmarks/quality_table.py                       # 128x512 calibration, the whole test split (hours on a CPU)

Writes benchmarks/results/quality_table.json and .png; prints the table and the answers to the
issue's questions (best retraining-free variant at 30 %, FLAP vs Wanda-sp) from the measured rows.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


class PeakRSS:
    """Peak resident set size of this process while the block runs (sampled)."""

    def __init__(self, interval=0.01):
        import psutil

        self.proc, self.interval = psutil.Process(), interval
        self.peak = self.start = 0

    def __enter__(self):
        self.start = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def selections(quick: bool):
    """(key, label, make_plan kwargs, recoveries at 20/50 %, recoveries at 30 %)."""
    lora = "lora"
    return [
        ("cfsp", "cfsp", dict(method="cfsp"), ["none"], ["none", "bias", "lstsq", "mask", lora] + ([] if quick else ["bias+lora"])),
        ("wanda-sp", "wanda-sp (uniform, +heads)", dict(method="fasp", heads=True), ["none"], ["none"]),
        ("flap", "flap", dict(method="flap"), ["none", "bias"], ["none", "bias", "lstsq", "mask"] + ([] if quick else ["bias+lora"])),
        ("fasp", "fasp", dict(method="fasp"), ["lstsq"], ["none", "bias", "lstsq", "mask"]),
        ("fasp-heads", "fasp (+heads)", dict(method="fasp", heads=True), ["lstsq"], ["lstsq"]),
        ("comp", "comp (condition)", dict(method="comp"), ["none", "mask"], ["none", "bias", "lstsq", "mask"]),
        ("comp-act", "comp (activation)", dict(method="comp", score="activation"), ["mask"], ["none", "mask"]),
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quick", action="store_true", help="32x256 calibration, 2048 eval tokens per protocol, 30 LoRA steps")
    ap.add_argument("--sparsities", default="0.2,0.3,0.5", help="fractions of all linear-layer parameters")
    ap.add_argument("--eval-tokens", type=int, default=None, help="tokens scored per protocol (default: all; 2048 with --quick)")
    ap.add_argument("--lora-steps", type=int, default=None, help="default 200 (30 with --quick)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 is faster on a CPU shared with other jobs)")
    ap.add_argument("--export-check", action="store_true", help="export the 30%% FLAP model to GGUF and ONNX, verified")
    ap.add_argument("--out", default="benchmarks/results/quality_table.json")
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG (and answers) from an existing --out JSON")
    args = ap.parse_args()
    if args.replot:
        out = Path(args.out)
        record = json.loads(out.read_text())
        record["eval"] = {int(k): v for k, v in record["eval"].items()}
        record["answers"] = answers(record)
        print("\n".join(record["answers"]["text"]))
        plot(record, out.with_suffix(".png"))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from edgeprune.calibrate import calibrate
    from edgeprune.data import calibration_ids
    from edgeprune.evaluate import load_text, perplexity, token_windows
    from edgeprune.prune import make_plan, with_recovery
    from edgeprune.models import load_model
    from edgeprune.pipeline import base_of
    from edgeprune.prune import pruned_copy
    from edgeprune.recover import recover

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    nsamples, seqlen = (32, 256) if args.quick else (128, 512)
    eval_tokens = args.eval_tokens or (2048 if args.quick else None)
    lora_steps = args.lora_steps or (30 if args.quick else 200)
    sparsities = [float(s) for s in args.sparsities.split(",")]

    lm = load_model(args.model)
    text = load_text(DATA / "wikitext2-test.raw")
    windows = {L: token_windows(lm.tokenizer, text, L, eval_tokens // L if eval_tokens else None) for L in (512, 128)}
    record = {"model": args.model, "quick": args.quick, "threads": torch.get_num_threads(), "calibration": f"wikitext2-valid {nsamples}x{seqlen}",
              "eval": {L: {"windows": len(w), "tokens": int(w.numel())} for L, w in windows.items()}, "lora_steps": lora_steps,
              "sparsity_of": "all linear-layer parameters (attention + FFN)", "rows": []}

    def evaluate(model):
        return {L: perplexity(model, w, batch_size=4 if L == 512 else 16)["perplexity"] for L, w in windows.items()}

    t = time.perf_counter()
    dense = evaluate(lm.model)
    record["dense"] = {"ppl512": dense[512], "ppl128": dense[128], "eval_s": time.perf_counter() - t}
    print(f"dense: ppl {dense[512]:.3f} (seq 512, {record['eval'][512]['tokens']} tokens), {dense[128]:.3f} (seq 128); "
          f"eval {record['dense']['eval_s']:.0f}s", flush=True)

    ids, desc, _ = calibration_ids(lm.model, lm.tokenizer, str(DATA / "wikitext2-valid.raw"), nsamples, seqlen, 0)
    with PeakRSS() as rss:
        stats = calibrate(lm.model, ids, gram=True, description=desc)
    record["calibration_pass"] = {"seconds": stats.seconds, "tokens": stats.tokens, "with_gram": True, "peak_rss_mib": rss.peak / 2**20,
                                  "rss_before_mib": rss.start / 2**20}
    print(f"calibration pass with Gram matrices: {stats.seconds:.0f}s over {stats.tokens} tokens, peak RSS {rss.peak / 2**20:.0f} MiB", flush=True)

    header = f"{'sparsity':>8} {'selection':28s} {'recover':10s} {'ppl@512':>9} {'ppl@128':>9} {'linear':>7} {'ffn':>6} {'kv':>5} {'prune_s':>8} {'rss_MiB':>8}"
    print(header, flush=True)
    base = base_of(lm)
    flap30 = None
    # 30 % first, then higher, then lower: COMP's greedy removal order (cached per layer) is computed
    # afresh at 30 % and 50 % (honest plan times) and reused below 30 % (marked plan_cached)
    order = sorted(sparsities, key=lambda p: (abs(p - 0.3) > 1e-9, p < 0.3, -p if p < 0.3 else p))
    deepest_comp = 0.0
    for p in order:
        for key, label, kwargs, recs, recs30 in selections(args.quick):
            cached = key == "comp" and p <= deepest_comp
            if key == "comp":
                deepest_comp = max(deepest_comp, p)
            with PeakRSS() as rss_plan:
                t0 = time.perf_counter()
                try:
                    sel = make_plan(lm.model, stats, base, p, target="linear", recover="none", **kwargs)
                except Exception as exc:  # e.g. a budget the method cannot meet: record it, go on
                    record["rows"].append({"sparsity": p, "selection": key, "error": str(exc)})
                    print(f"{p:8.2f} {label:28s} error: {exc}", flush=True)
                    continue
                plan_s = time.perf_counter() - t0
            for rec in (recs30 if abs(p - 0.3) < 1e-9 else recs):
                extra = {"lora_steps": lora_steps} if "lora" in rec else {}
                plan = with_recovery(sel, rec, extra)
                with PeakRSS() as rss:
                    t1 = time.perf_counter()
                    pruned = pruned_copy(lm.model, plan)
                    apply_s = time.perf_counter() - t1
                    rep = recover(pruned, lm.model, plan, stats, ids)
                    recover_s = time.perf_counter() - t1 - apply_s
                ppl = evaluate(pruned)
                ach = plan.achieved
                kv = sum(len(lp.kv_keep) for lp in plan.layers)
                row = {"sparsity": p, "selection": key, "label": label, "method": plan.method["method"], "score": plan.method["score"],
                       "heads": plan.method["heads"], "recover": plan.method["recover"], "ppl512": ppl[512], "ppl128": ppl[128],
                       "linear_sparsity": ach["linear_sparsity"], "ffn_sparsity": ach["ffn_sparsity"], "model_sparsity": ach["model_sparsity"],
                       "kv_groups_kept": kv, "layers_kept": ach["layers_kept"], "plan_s": plan_s, "apply_s": apply_s, "recover_s": recover_s,
                       "prune_s": plan_s + apply_s + recover_s, "plan_cached": cached, "peak_rss_mib": max(rss.peak, rss_plan.peak) / 2**20,
                       "rss_over_start_mib": (max(rss.peak, rss_plan.peak) - rss_plan.start) / 2**20,
                       "recovery": {k: {kk: vv for kk, vv in v.items() if kk != "ranks"} for k, v in rep.items()}}
                record["rows"].append(row)
                print(f"{p:8.2f} {label:28s} {row['recover']:10s} {ppl[512]:9.3f} {ppl[128]:9.3f} {ach['linear_sparsity']:7.3f} "
                      f"{ach['ffn_sparsity']:6.3f} {kv:5d} {row['prune_s']:8.1f}{'*' if cached else ' '}{row['peak_rss_mib']:7.0f}", flush=True)
                if key == "flap" and rec == "bias" and abs(p - 0.3) < 1e-9:
                    flap30 = pruned
                else:
                    del pruned
                out.write_text(json.dumps(record, indent=1))

    if any(r.get("plan_cached") for r in record["rows"]):
        print("* plan time reuses the COMP greedy order computed at a higher sparsity")
    record["answers"] = answers(record)
    for line in record["answers"]["text"]:
        print(line)
    if args.export_check and flap30 is not None:
        record["export_check"] = export_check(flap30, lm.tokenizer, out.parent)
        print("export check:", json.dumps(record["export_check"]))
    out.write_text(json.dumps(record, indent=1))
    plot(record, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def answers(record) -> dict:
    rows = [r for r in record["rows"] if "error" not in r]
    text, res = [], {}
    at30 = [r for r in rows if abs(r["sparsity"] - 0.3) < 1e-9]
    free = [r for r in at30 if "lora" not in r["recover"]]
    cfsp = next((r for r in at30 if r["selection"] == "cfsp" and r["recover"] == "none"), None)
    if free:
        best = min(free, key=lambda r: r["ppl512"])
        best128 = min(free, key=lambda r: r["ppl128"])
        res["best_retraining_free_30"] = {k: best[k] for k in ("selection", "recover", "ppl512", "ppl128")}
        text.append(f"best retraining-free at 30% of linear params: {best['label']} + {best['recover']}: ppl {best['ppl512']:.2f} @512"
                    f" (best @128: {best128['label']} + {best128['recover']}, {best128['ppl128']:.2f})"
                    + (f"; CFSP default {cfsp['ppl512']:.2f} @512, {cfsp['ppl128']:.2f} @128" if cfsp else ""))
    for p in sorted({r["sparsity"] for r in rows}):
        flap = next((r for r in rows if r["sparsity"] == p and r["selection"] == "flap" and r["recover"] == "bias"), None)
        wanda = next((r for r in rows if r["sparsity"] == p and r["selection"] == "wanda-sp"), None)
        if flap and wanda:
            res.setdefault("flap_vs_wanda_sp", {})[str(p)] = {"flap_ppl128": flap["ppl128"], "wanda_sp_ppl128": wanda["ppl128"],
                                                              "flap_ppl512": flap["ppl512"], "wanda_sp_ppl512": wanda["ppl512"]}
            text.append(f"{p:.0%}: FLAP {flap['ppl128']:.2f} vs Wanda-sp {wanda['ppl128']:.2f} @128 "
                        f"({flap['ppl512']:.2f} vs {wanda['ppl512']:.2f} @512): FLAP {'beats' if flap['ppl128'] < wanda['ppl128'] else 'does not beat'} Wanda-sp")
    lora = [r for r in at30 if "lora" in r["recover"]]
    for r in lora:
        lr = r["recovery"].get("lora", {})
        text.append(f"IG-LoRA on {r['label']} at 30%: ppl {r['ppl512']:.2f} @512 after {lr.get('steps')} steps in {lr.get('seconds', 0):.0f}s "
                    f"({lr.get('tokens_per_step')} tokens/step, calibration loss {lr.get('calibration_loss_before', 0):.3f} -> {lr.get('calibration_loss_after', 0):.3f})")
    res["text"] = text
    return res


def export_check(model, tokenizer, folder: Path) -> dict:
    import tempfile

    result = {}
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        try:
            from edgeprune.exporters.gguf import export_gguf

            r = export_gguf(model, tokenizer, Path(tmp) / "flap30.f32.gguf", dtype="f32", verify=True)
            result["gguf"] = {"ok": True, "verification": r.get("verification")}
        except Exception as exc:
            result["gguf"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        try:
            from edgeprune.exporters.onnx import export_onnx

            r = export_onnx(model, tokenizer, Path(tmp) / "flap30-onnx", dtype="fp32", verify=True)
            result["onnx"] = {"ok": True, "verification": r.get("verification")}
        except Exception as exc:
            result["onnx"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return result


def plot(record, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in record["rows"] if "error" not in r]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), dpi=110)
    lines = [("cfsp", "none"), ("wanda-sp", "none"), ("flap", "none"), ("flap", "bias"), ("fasp", "lstsq"), ("fasp-heads", "lstsq"),
             ("comp", "none"), ("comp", "mask"), ("comp-act", "mask")]
    for ax, L in zip(axes[:2], (512, 128)):
        for sel, rec in lines:
            pts = sorted((r["sparsity"], r[f"ppl{L}"]) for r in rows if r["selection"] == sel and r["recover"] == rec)
            if pts:
                ax.plot(*zip(*pts), marker="o", ls="-" if rec != "none" or sel in ("cfsp", "wanda-sp") else ":", label=f"{sel} + {rec}")
        ax.axhline(record["dense"][f"ppl{L}"], color="grey", ls="--", lw=0.8, label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("sparsity (fraction of linear-layer parameters)")
        ax.set_ylabel(f"WikiText-2 test ppl (seq {L})")
        ax.set_title(f"seq {L}, {record['eval'][L]['tokens']} tokens; calibration {record['calibration']}", fontsize=8)
        ax.legend(fontsize=6, loc="upper left", framealpha=0.6)
    ax = axes[2]
    at30 = [r for r in rows if abs(r["sparsity"] - 0.3) < 1e-9]
    labels = [f"{r['selection']}+{r['recover']}" for r in at30]
    ax.barh(range(len(at30)), [r["ppl512"] for r in at30], color=["#DD8452" if "lora" in r["recover"] else "#4C72B0" for r in at30])
    ax.set_yticks(range(len(at30)), labels, fontsize=6)
    ax.axvline(record["dense"]["ppl512"], color="grey", ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("ppl @512 at 30% (orange: LoRA retraining)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
