"""How well does edgeprune's latency model predict this host? Measure it, then predict held-out shapes.

For each backend (llama.cpp via GGUF, onnxruntime via ONNX):
  1. `edgeprune.hostperf.run_host_measurement`: benchmark synthetic random-weight Llama models of
     several shapes and fit bandwidth, per-layer/per-token overheads, compute and prefill overheads;
  2. held-out SmolLM2-like geometries (dense, FFN-pruned, non-uniform FFN, layer-dropped,
     KV-group-pruned, mixed) are measured in the same round-robin session but never fitted; their
     predicted decode tok/s and prefill time are compared with the measurements.

Prints the fitted constants and a predicted / measured / error table per backend and writes a JSON
record (`--out`). Figures, not assertions: exit 0 whenever the runs complete.

    python benchmarks/latency_model.py --quick --threads 1 --timing cpu --out latency_model.json

On a shared machine use --threads 1: with other jobs on the cores, llama.cpp's spinning thread
barriers make multi-threaded timings several times slower and very noisy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from edgeprune.errors import EdgepruneError
from edgeprune.hostperf import backend_available, heldout_shapes, host_description, run_host_measurement
from edgeprune.profiles import write_profile


def run_backend(backend: str, args, say) -> dict:
    """Measure `backend` with the fitting and held-out shapes; print the fit and the held-out table."""
    ok, why = backend_available(backend)
    if not ok:
        say(f"skipping {backend}: {why}")
        print(f"\n== {backend}: skipped ({why})")
        return {"backend": backend, "skipped": why}
    t0 = time.perf_counter()
    cal = run_host_measurement(backend, args.dtype.get(backend), threads=args.threads, quick=args.quick, log=say,
                               prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens, repeats=args.repeats,
                               name=f"host-{backend.replace('.', '')}", timing=args.timing, rounds=args.rounds,
                               heldout=heldout_shapes(args.quick))
    if args.profile_dir:
        path = write_profile(cal.profile, Path(args.profile_dir) / f"host-{backend.replace('.', '')}.toml")
        say(f"wrote {path}")
    f = cal.fit
    print(f"\n== {backend} ({', '.join(cal.dtypes)}, {cal.threads} thread(s), {args.timing} time): fitted on "
          f"{len(cal.measurements)} fitting shapes, {len(cal.heldout)} held-out shapes measured in the same "
          f"session ({cal.seconds:.0f} s)")
    print(f"   bandwidth {f.bandwidth_gbps:.2f} GB/s | decode overhead {f.layer_overhead_ms:.4f} ms/layer + "
          f"{f.token_overhead_ms:.3f} ms/token | compute " + ", ".join(f"{k} {v:.1f} GOPS" for k, v in f.compute_gops.items())
          + f" | prefill overhead {1000 * f.prefill_layer_token_overhead_ms:.2f} us/layer/token + {f.prefill_overhead_ms:.2f} ms")
    print("   fit (in-sample) errors: decode " + " ".join(f"{100 * e:+.1f}%" for e in f.decode_rel_err)
          + " | prefill " + " ".join(f"{100 * e:+.1f}%" for e in f.prefill_rel_err))
    print(f"\n   held-out shapes, predicted vs measured ({backend}):")
    print("   " + cal.validation.table().replace("\n", "\n   "))
    return {"backend": backend, "seconds": time.perf_counter() - t0, **cal.to_dict()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", choices=["llama.cpp", "onnxruntime", "both"], default="both")
    ap.add_argument("--quick", action="store_true", help="6 fitting + 7 held-out shapes, 32 generated tokens")
    ap.add_argument("--threads", type=int, default=None, help="default: physical cores (use 1 on a shared machine)")
    ap.add_argument("--gguf-dtype", default="q8_0")
    ap.add_argument("--onnx-dtype", default=None, help="default: hostperf's ONNX default (int8)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None, help="runs per shape per round (default 3, 5 without --quick)")
    ap.add_argument("--rounds", type=int, default=2, help="round-robin passes over all shapes")
    ap.add_argument("--timing", choices=["wall", "cpu"], default="wall",
                    help="cpu = CPU time of the benchmarking thread (needs --threads 1): the uncontended time on a shared machine")
    ap.add_argument("--profile-dir", default=None, help="also write the fitted host profiles here")
    ap.add_argument("--out", default=None, help="JSON record")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    args.dtype = {"llama.cpp": args.gguf_dtype, "onnxruntime": args.onnx_dtype}
    say = (lambda m: None) if args.quiet else (lambda m: print(f"   . {m}", file=sys.stderr, flush=True))
    backends = ["llama.cpp", "onnxruntime"] if args.backend == "both" else [args.backend]
    record = {"host": host_description(), "args": {k: v for k, v in vars(args).items()}, "backends": {}}
    print(f"host: {record['host']['cpu']}, {record['host']['cores']} cores, {record['host']['ram'] / 1e9:.1f} GB RAM")
    for b in backends:
        try:
            record["backends"][b] = run_backend(b, args, say)
        except EdgepruneError as exc:
            print(f"{b}: {exc}")
            record["backends"][b] = {"backend": b, "error": str(exc)}
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2, default=str))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
