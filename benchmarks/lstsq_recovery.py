"""Least-squares recovery on SmolLM2-135M: none vs the one-pass refit on the dense inputs (the old
lstsq, `lstsq_inputs=dense`) vs the sequential refit on the pruned network's own inputs with the
ridge chosen per block on held-out calibration rows (the default).

CFSP FFN pruning at each sparsity, 16 x 512 WikiText-2 valid calibration tokens, torch perplexity on
the first 8 x 512 WikiText-2 test windows, 1 thread. Prints a table and writes
benchmarks/results/lstsq_recovery.json.

    python benchmarks/lstsq_recovery.py --sparsities 0.2,0.3,0.5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from edgeprune.calibrate import calibrate
from edgeprune.data import calibration_ids
from edgeprune.evaluate import load_text, perplexity, token_windows
from edgeprune.models import load_model
from edgeprune.pipeline import base_of
from edgeprune.prune import make_plan, pruned_copy, with_recovery
from edgeprune.recover import recover

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("EDGEPRUNE_SHARED_DATA", HERE.parent.parent / "shared" / "data"))
VARIANTS = {"none": None, "lstsq (dense inputs, one pass)": {"lstsq_inputs": "dense"}, "lstsq (sequential, held-out ridge)": {}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sparsities", default="0.2,0.3,0.5")
    ap.add_argument("--windows", type=int, default=8)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    lm = load_model("smollm2-135m")
    windows = token_windows(lm.tokenizer, load_text(DATA / "wikitext2-test.raw"), 512, args.windows)
    ids, desc, _ = calibration_ids(lm.model, lm.tokenizer, str(DATA / "wikitext2-valid.raw"), 16, 512, 0, fingerprint=lm.fingerprint)
    stats = calibrate(lm.model, ids, gram=True, description=desc)  # the one-pass variant reads the dense Gram
    record = {"protocol": f"CFSP FFN pruning, 16x512 WikiText-2 valid calibration, torch ppl on WikiText-2 test first {args.windows}x512",
              "dense_ppl": perplexity(lm.model, windows)["perplexity"], "rows": []}
    print(f"dense ppl {record['dense_ppl']:.2f}", flush=True)
    for p in (float(x) for x in args.sparsities.split(",")):
        plan = make_plan(lm.model, stats, base_of(lm), p, method="cfsp", recover="none")
        for name, recover_args in VARIANTS.items():
            trial = plan if recover_args is None else with_recovery(plan, "lstsq", recover_args)
            model = pruned_copy(lm.model, trial)
            t = time.perf_counter()
            report = recover(model, lm.model, trial, stats, ids) if recover_args is not None else {}
            seconds = time.perf_counter() - t
            row = {"sparsity": p, "recovery": name, "ppl": perplexity(model, windows)["perplexity"], "recover_s": seconds,
                   "summary": report.get("lstsq", {}).get("summary")}
            record["rows"].append(row)
            print(f"{p:.0%} {name:38s} ppl {row['ppl']:8.2f}  ({seconds:.0f} s)", flush=True)
            del model
    record["total_s"] = time.perf_counter() - start
    path = HERE / "results" / "lstsq_recovery.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
