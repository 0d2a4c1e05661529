"""What `edgeprune fit` ships vs the dense baselines, measured through llama.cpp on WikiText-2 test.

For each profile: run fit (or read a finished fit's report with --reuse), then score the shipped
GGUF and the dense SmolLM2 exported as llama.cpp users make it (q8_0, q4_0: llama.cpp's quantizer,
no importance matrix) on the project's protocol: the first N non-overlapping 512-token windows of
WikiText-2 raw test (CRLF -> LF), llama.cpp logits (`logits_all=True`), perplexity, top-1 agreement
and KL against the dense torch fp32 model. Prints a table and writes
benchmarks/results/shipped_quality.json.

    python benchmarks/shipped_quality.py --profiles raspberrypi5,raspberrypi5@80,orangepi5 --windows 16
    python benchmarks/shipped_quality.py --model gemma3-270m --profiles raspberrypi5@36 --windows 8

With `--model` other than the default, results go to shipped_quality_<model>.json and the model's
own GGUF (Gemma 3's Q4_K_M) is scored as a third baseline.

`NAME@X` runs profile NAME with `--min-tokens-per-s X` (a tighter target on the same board). The
shipped profiles other than raspberrypi5 are sized for 1B-class models, so SmolLM2 meets them
dense: fit then ships the best-quality dense mix, which is what this benchmark shows for them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


from edgeprune import shipped
from edgeprune.evaluate import load_text, token_windows
from edgeprune.exporters.gguf import export_gguf
from edgeprune.exporters.llamacpp import llamacpp_logits_fn
from edgeprune.exporters.llamacpp_quantize import quantize_gguf
from edgeprune.fit import run_fit
from edgeprune.models import load_model

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("EDGEPRUNE_SHARED_DATA", HERE.parent.parent / "shared" / "data"))


def score(path, windows, refs) -> dict:
    fn = llamacpp_logits_fn(path, n_ctx=windows.shape[1])
    q = shipped.window_quality(fn, windows, refs)
    fn.llm.close()
    return q


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profiles", default="raspberrypi5,raspberrypi5@80,orangepi5")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "edgeprune-shipped-quality",
                    help="where the fits write their artifacts (hundreds of MB; only the reports are kept in results/)")
    ap.add_argument("--reuse", action="store_true", help="read finished fits under --out instead of running them")
    ap.add_argument("--model", default="smollm2-135m", help="model spec (smollm2-135m, gemma3-270m, a .gguf, ...)")
    args = ap.parse_args(argv)

    lm = load_model(args.model)
    tag = "" if args.model == "smollm2-135m" else "_" + Path(args.model).name.replace(".gguf", "")
    text = load_text(DATA / "wikitext2-test.raw")
    windows = token_windows(lm.tokenizer, text, 512, max_windows=args.windows).numpy()
    refs = shipped.dense_reference(lm.model, windows)
    record = {"protocol": f"WikiText-2 raw test, first {len(windows)} x 512 windows, llama.cpp logits; reference dense torch fp32",
              "dense_torch_ppl": shipped.reference_ppl(refs, windows), "profiles": {}}
    with tempfile.TemporaryDirectory() as tmp:
        f32 = Path(tmp) / "dense.f32.gguf"
        export_gguf(lm.model, lm.tokenizer, f32, "f32", verify=False)
        for d in ("q8_0", "q4_0"):
            path = Path(tmp) / f"dense.{d}.gguf"
            quantize_gguf(f32, path, d, tied=True)
            record[f"dense_{d}"] = score(path, windows, refs)
            print(f"dense {d} (llama.cpp default): ppl {record[f'dense_{d}']['ppl']:.2f}", flush=True)
    if str(lm.source).endswith(".gguf") and tag:
        record["source_gguf"] = {"path": str(lm.source), **score(lm.source, windows, refs)}
        print(f"the model's own GGUF: ppl {record['source_gguf']['ppl']:.2f}", flush=True)
    for name in args.profiles.split(","):
        profile, _, tok_s = name.partition("@")
        out = args.out / name.replace("@", "-at-")
        t = time.perf_counter()
        if args.reuse:
            report = json.loads((out / "report.json").read_text())
        else:
            report, _ = run_fit(args.model, profile, out, min_tok_s=float(tok_s) if tok_s else None,
                                log=lambda m: print(f"[{name}] {m}", flush=True))
        keep = HERE / "results" / "shipped_quality" / (tag.lstrip("_") + ("-" if tag else "") + name.replace("@", "-at-"))
        keep.mkdir(parents=True, exist_ok=True)
        for f in ("report.json", "report.md", "frontier.png"):
            shutil.copyfile(out / f, keep / f)
        res = report["result"]
        art = res["artifacts"]["gguf"]
        q = score(art["path"], windows, refs)
        ch = res["chosen"]
        record["profiles"][name] = {
            "chosen": ch["label"], "why": res.get("why"), "wikitext2_test": q,
            "predicted_decode_tok_s": ch["prediction"]["decode_tok_s"], "target_decode_tok_s": report["profile"]["targets"]["decode_tok_s_min"],
            "measured_host_decode_tok_s": art["bench"]["decode_tok_s"]["median"],
            "measured_decode_speedup_vs_dense_same_mix": art.get("measured_decode_speedup"),
            "fit_seconds": report["timings"]["total_s"] if args.reuse else time.perf_counter() - t,
            "factual_prompts": {k: (a.get("factual_hits"), a.get("factual_prompts")) for k, a in report.get("quality", {}).get("artifacts", {}).items()},
        }
    print(f"\n{'artifact':58s} {'ppl':>8s} {'x q8_0':>7s} {'top-1':>6s} {'pred tok/s':>10s}")
    base = record["dense_q8_0"]["ppl"]
    for d in ("q8_0", "q4_0"):
        r = record[f"dense_{d}"]
        print(f"{'dense ' + d + ' (llama.cpp default)':58s} {r['ppl']:8.2f} {r['ppl'] / base:7.3f} {r['top1_vs_dense']:6.3f}")
    for name, r in record["profiles"].items():
        q = r["wikitext2_test"]
        print(f"{name + ': ' + r['chosen']:58s} {q['ppl']:8.2f} {q['ppl'] / base:7.3f} {q['top1_vs_dense']:6.3f} {r['predicted_decode_tok_s']:10.1f}")
    if "source_gguf" in record:
        r = record["source_gguf"]
        print(f"{'the model own GGUF':58s} {r['ppl']:8.2f} {r['ppl'] / base:7.3f} {r['top1_vs_dense']:6.3f}")
    path = HERE / "results" / f"shipped_quality{tag}.json"
    path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
