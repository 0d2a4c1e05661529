"""KV groups in fit's search (issue #12): is removing KV groups with the FFN channels, under one
parameter budget (`prune --heads`, `fit --heads`), better than removing FFN channels alone?

fit's own proxy and setting: SmolLM2-135M fp32, calibration and held-out text self-generated (32 +
8 rows of 128 tokens, seed 0), structure KL(dense || pruned) on the held-out rows through masks on
the dense model (what fit scores), and the decode speed the raspberrypi5 profile predicts for the
structure in the mix fit shipped there (IQ4_NL, output Q5_0, importance matrix). A structure that
removes KV groups is better only if its KL is lower than FFN-only structures of the same predicted
speed. Prints a table, writes a JSON record and a plot.

    python benchmarks/kv_groups.py [--model smollm2-135m] [--out benchmarks/results/kv_groups.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SPARSITIES = (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4)
DROPS = (0, 2)


def measure(model_spec: str, profile_name: str, dtype: str, head: str) -> dict:
    from edgeprune import latency, search
    from edgeprune.apply import masked
    from edgeprune.calibrate import calibrate
    from edgeprune.data import calibration_ids
    from edgeprune.models import load_model
    from edgeprune.pipeline import base_of
    from edgeprune.profiles import load_profile
    from edgeprune.prune import make_plan

    lm = load_model(model_spec)
    ids, _, _ = calibration_ids(lm.model, lm.tokenizer, "self", 40, 128, 0, fingerprint=lm.fingerprint)
    calib, held = ids[:32], ids[32:]
    stats = calibrate(lm.model, calib)
    dense_lp = search.dense_logprobs(lm.model, held)
    base, profile = base_of(lm), load_profile(profile_name)
    rows = []
    for drop in DROPS:
        for p in SPARSITIES:
            for heads in (False, True):
                t = time.perf_counter()
                plan = make_plan(lm.model, stats, base, p, heads=heads, drop_layers=drop, recover="none", shapes="per-layer")
                removed = plan.kv_groups_removed()
                with masked(lm.model, plan) as pruned:
                    kl = search.kl_to_dense(dense_lp, pruned, held)
                pred = latency.predict_for_profile(plan.geometry(), profile, dtype, head_dtype=head, imatrix=True)
                row = {"sparsity": p, "drop_layers": drop, "heads": heads, "kv_groups_removed": removed, "kl": kl,
                       "decode_tok_s": pred.decode_tok_s, "params": plan.achieved["params_pruned"], "seconds": time.perf_counter() - t}
                rows.append(row)
                print(f"drop {drop}  {p:4.0%} FFN-eq  {'+KV' if heads else 'FFN'}  KV groups removed {removed:3d}  "
                      f"KL {kl:.4f}  predicted {pred.decode_tok_s:6.1f} tok/s", flush=True)
    return {"rows": rows, "dense_kv_groups": base["kv_heads"] * base["num_layers"]}


def at_equal_speed(rows: list[dict]) -> list[dict]:
    """Each structure that removed KV groups against FFN-only structures (same dropped layers) at its
    predicted speed: their KL interpolated linearly in speed, None outside the FFN-only range."""
    out = []
    for drop in DROPS:
        ffn = sorted((r for r in rows if r["drop_layers"] == drop and not r["heads"]), key=lambda r: r["decode_tok_s"])
        xs, ys = [r["decode_tok_s"] for r in ffn], [r["kl"] for r in ffn]
        for r in rows:
            if r["drop_layers"] == drop and r["heads"] and r["kv_groups_removed"] > 0:
                inside = xs[0] <= r["decode_tok_s"] <= xs[-1]
                ffn_kl = float(np.interp(r["decode_tok_s"], xs, ys)) if inside else None
                out.append({**{k: r[k] for k in ("sparsity", "drop_layers", "kv_groups_removed", "decode_tok_s", "kl")},
                            "ffn_only_kl_at_that_speed": ffn_kl,
                            "kv_better": None if ffn_kl is None else r["kl"] < ffn_kl})
    return out


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for drop, color in zip(DROPS, ("tab:blue", "tab:orange")):
        for heads, marker, ls in ((False, "o", "-"), (True, "s", "--")):
            rs = sorted((r for r in record["rows"] if r["drop_layers"] == drop and r["heads"] == heads), key=lambda r: r["decode_tok_s"])
            ax.plot([r["decode_tok_s"] for r in rs], [r["kl"] for r in rs], ls, marker=marker, color=color,
                    label=f"{drop} layers dropped, {'FFN + KV groups' if heads else 'FFN only'}")
    ax.set_xlabel(f"predicted decode on {record['profile']} ({record['mix']}), tok/s")
    ax.set_ylabel("structure KL(dense || pruned), nats/token")
    ax.set_title(f"{record['model']}: KV groups in the budget or not")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--profile", default="raspberrypi5")
    ap.add_argument("--dtype", default="iq4_nl")
    ap.add_argument("--head", default="q5_0")
    ap.add_argument("--out", default=str(HERE / "results" / "kv_groups.json"))
    args = ap.parse_args(argv)
    t = time.perf_counter()
    record = {"benchmark": "kv_groups", "model": args.model, "profile": args.profile, "mix": f"{args.dtype}-output-{args.head}",
              "protocol": "structure KL on 8 x 128 held-out self-generated tokens (fit's proxy), CFSP allocation and scores, "
                          "no recovery; KV groups: prune --heads's joint budget (layer 0 keeps all)",
              **measure(args.model, args.profile, args.dtype, args.head)}
    record["equal_speed"] = at_equal_speed(record["rows"])
    record["seconds"] = time.perf_counter() - t
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    plot(record, out.with_suffix(".png"))
    print("\nstructures that remove KV groups, against FFN-only structures at the same predicted speed:")
    for r in record["equal_speed"]:
        ffn = "outside the FFN-only range" if r["ffn_only_kl_at_that_speed"] is None else f"FFN-only {r['ffn_only_kl_at_that_speed']:.4f}"
        print(f"  drop {r['drop_layers']}  {r['sparsity']:4.0%}  -{r['kv_groups_removed']} KV groups  {r['decode_tok_s']:5.1f} tok/s  "
              f"KL {r['kl']:.4f}  vs {ffn}")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
