"""Realized CPU speed-up of pruned exports vs the ideal, in llama.cpp and onnxruntime, in one run.

Dense vs CFSP-pruned SmolLM2-135M (30% and 50% FFN sparsity), every format x dtype: export
(timed, verified), benchmark in a fresh process (median of repeats), and compare the decode
speed-up with the ideal one = ratio of weight bytes read per decoded token (edgeprune.latency).

    python benchmarks/export_speed.py --quick      # fewer dtypes, 2 repeats
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from edgeprune import latency
from edgeprune.bench import bench_artifact, median
from edgeprune.fit import export_artifact
from edgeprune.models import load_model
from edgeprune.pipeline import calibration_pass, base_of
from edgeprune.prune import make_plan, pruned_copy

GGUF_DTYPES = ("f32", "q8_0", "q4_0")
ONNX_DTYPES = ("fp32", "int8", "int4")
LATENCY_DTYPE = {"fp32": "f32"}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results/export_speed.json")
    args = ap.parse_args()
    repeats = 2 if args.quick else 5
    gguf_dtypes = ("q8_0", "q4_0") if args.quick else GGUF_DTYPES
    onnx_dtypes = ("int8",) if args.quick else ONNX_DTYPES

    lm = load_model(args.model)
    _, stats, _ = calibration_pass(lm, "self", 32, 128, 0)
    models = {"dense": lm.model}
    for p in (0.3, 0.5):
        models[f"cfsp-{int(p * 100)}"] = pruned_copy(lm.model, make_plan(lm.model, stats, base_of(lm), p))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            geom = latency.ModelGeometry.from_model(model)
            for fmt, dtypes in (("gguf", gguf_dtypes), ("onnx", onnx_dtypes)):
                backend = "llama.cpp" if fmt == "gguf" else "onnxruntime"
                for dtype in dtypes:
                    path = Path(tmp) / (f"{name}.{dtype}.gguf" if fmt == "gguf" else f"{name}-{dtype}")
                    t = time.perf_counter()
                    exp = export_artifact(model, lm.tokenizer, fmt, dtype, path, verify=True)
                    export_s = time.perf_counter() - t
                    b = bench_artifact(path, args.threads, repeats=repeats)
                    bytes_read = latency.byte_counts(geom, LATENCY_DTYPE.get(dtype, dtype), backend).read_per_token
                    v = exp.get("verification", {})
                    rows.append({"model": name, "format": fmt, "dtype": dtype, "export_s": export_s,
                                 "top1": v.get("top1_agreement"), "kl": v.get("mean_kl"),
                                 "decode_tok_s": median(b, "decode_tok_s"), "decode_spread": b["decode_tok_s"].get("spread"),
                                 "prefill_tok_s": median(b, "prefill_tok_s"), "ttft_s": median(b, "ttft_s"),
                                 "peak_rss_mb": b.get("peak_rss_mb"), "bytes_read_per_token": bytes_read})
                    r = rows[-1]
                    print(f"{name:8s} {fmt:4s} {dtype:5s} export {export_s:5.1f}s  decode {r['decode_tok_s']:6.1f} tok/s "
                          f"(spread {r['decode_spread']:.0%})  prefill {r['prefill_tok_s']:6.1f} tok/s  RSS {r['peak_rss_mb']:.0f} MiB  "
                          f"top1 {r['top1'] if r['top1'] is None else round(r['top1'], 4)}", flush=True)
                    path.unlink() if path.is_file() else None
    dense = {(r["format"], r["dtype"]): r for r in rows if r["model"] == "dense"}
    print("\nmodel     format dtype  realized  ideal  realized/ideal")
    for r in rows:
        if r["model"] == "dense":
            continue
        d = dense[(r["format"], r["dtype"])]
        r["speedup"] = r["decode_tok_s"] / d["decode_tok_s"]
        r["ideal_speedup"] = d["bytes_read_per_token"] / r["bytes_read_per_token"]
        r["realized_over_ideal"] = (r["speedup"] - 1) / (r["ideal_speedup"] - 1) if r["ideal_speedup"] > 1 else None
        print(f"{r['model']:9s} {r['format']:6s} {r['dtype']:5s}  x{r['speedup']:.3f}  x{r['ideal_speedup']:.3f}  "
              f"{r['speedup'] / r['ideal_speedup']:.3f}")
    print("\nonnxruntime / llama.cpp decode throughput at matching precision:")
    for m in models:
        for g, o in (("f32", "fp32"), ("q8_0", "int8"), ("q4_0", "int4")):
            a = next((r for r in rows if r["model"] == m and r["dtype"] == g), None)
            b = next((r for r in rows if r["model"] == m and r["dtype"] == o), None)
            if a and b:
                print(f"  {m:9s} {o}/{g}: {b['decode_tok_s'] / a['decode_tok_s']:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "repeats": repeats}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
