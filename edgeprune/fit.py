"""`edgeprune fit --profile NAME`: search, prune, export, verify, benchmark, report.

1. load the profile (targets from it, overridable) and the model;
2. one calibration pass on self-generated text (+ held-out samples for the quality proxy);
3. enumerate (sparsity, dropped layers, dtype) candidates through the latency/memory model;
4. score the feasible ones (search.py) and pick the best quality;
5. prune it, export every requested format (each verified against torch inside the export),
   benchmark the exports on this host next to the dense model exported the same way;
6. write report.json, report.md, frontier.png (and the checkpoint's widths.png).
Exit code 3 (with the impossible target and the closest point) when nothing meets the targets.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from pathlib import Path

from edgeprune import latency, search
from edgeprune.errors import EdgepruneError
from edgeprune.plan import LayerPlan, PrunePlan
from edgeprune.report import run_header, write_json

ONNX_FROM_GGUF = {"f32": "fp32", "f16": "fp32", "q8_0": "int8", "q4_0": "int4", "q4_k_m": "int4"}
GGUF_FROM_ONNX = {"fp32": "f32", "f32": "f32", "int8": "q8_0", "int4": "q4_0"}


def export_artifact(model, tokenizer, fmt: str, dtype: str, out: Path, verify: bool = True) -> dict:
    if fmt == "gguf":
        from edgeprune.exporters.gguf import export_gguf

        return export_gguf(model, tokenizer, out, dtype=dtype, verify=verify)
    from edgeprune.exporters.onnx import export_onnx

    return export_onnx(model, tokenizer, out, dtype=dtype, verify=verify)


def runtime_logits_fn(fmt: str, path: Path, n_ctx: int):
    if fmt == "gguf":
        from edgeprune.exporters.gguf import llamacpp_logits_fn

        return llamacpp_logits_fn(path, n_ctx=n_ctx)
    from edgeprune.exporters.onnx import ort_logits_fn

    return ort_logits_fn(path)


def format_dtype(fmt: str, dtype: str) -> str:
    """The dtype name each exporter uses for the profile's dtype."""
    if fmt == "onnx":
        return ONNX_FROM_GGUF.get(dtype, dtype)
    return GGUF_FROM_ONNX.get(dtype, dtype)


def identity_plan(lm, base: dict, desc: dict) -> PrunePlan:
    """The dense model as a plan (fit's answer when the dense model already meets the targets)."""
    cfg = lm.model.config
    layers = [LayerPlan(i, list(range(cfg.intermediate_size)), list(range(cfg.num_key_value_heads)))
              for i in range(cfg.num_hidden_layers)]
    plan = PrunePlan(base=base, method={"allocation": "none", "score": "none", "sparsity": 0.0}, calibration=desc, layers=layers)
    from edgeprune.prune import achieved

    plan.achieved = achieved(lm.model, plan)
    return plan


def apply_overrides(targets, min_tok_s=None, max_memory=None, max_ttft=None):
    from edgeprune.profiles import parse_bytes

    changes = {}
    if min_tok_s is not None:
        if min_tok_s <= 0:
            raise EdgepruneError(f"--min-tokens-per-s must be positive, got {min_tok_s}")
        changes["decode_tok_s_min"] = float(min_tok_s)
    if max_ttft is not None:
        if max_ttft <= 0:
            raise EdgepruneError(f"--max-ttft-s must be positive, got {max_ttft}")
        changes["ttft_max_s"] = float(max_ttft)
    if max_memory is not None:
        try:
            changes["memory_max"] = parse_bytes(max_memory)
        except Exception as exc:  # the parser's own error type says what is wrong with the value
            raise EdgepruneError(f"--max-memory: {exc} (e.g. 300MB, 1.5GiB)") from None
    return dataclasses.replace(targets, **changes)


def run_fit(model_spec, profile_name, out: Path, min_tok_s=None, max_memory=None, max_ttft=None, dtype=None,
            formats=("gguf", "onnx"), nsamples=32, seqlen=128, heldout=8, seed=0, threads=None,
            host_profile="ci-cpu", bench_rounds=3, bench_repeats=2, recover="lstsq,bias", progress=None, log=print) -> tuple[dict, int]:
    from edgeprune.bench import bench_artifact, bench_interleaved, paired_ratio
    from edgeprune.calibrate import calibrate
    from edgeprune.data import calibration_ids
    from edgeprune.models import load_model
    from edgeprune.pipeline import base_of, prune_and_save
    from edgeprune.profiles import load_profile
    from edgeprune.recover import needs

    t_start = time.perf_counter()
    timings = {}
    profile = load_profile(profile_name)
    host = load_profile(host_profile) if host_profile else None  # a bad --host-profile fails now, not after the search
    targets = apply_overrides(profile.targets, min_tok_s, max_memory, max_ttft)
    dtypes = [dtype] if dtype else list(profile.export.dtypes)
    fmt = profile.export.format
    for d in dtypes:
        latency.normalize_dtype(d)
    bad = [f for f in formats if f not in ("gguf", "onnx")]
    if bad:
        raise EdgepruneError(f"--formats takes gguf and/or onnx, got {', '.join(bad)}")
    recoveries = [r.strip() for r in (recover or "").split(",") if r.strip() not in ("", "none")]
    out = Path(out)
    report = run_header("fit", dict(model=model_spec, profile=profile_name, out=out, min_tok_s=min_tok_s, max_memory=max_memory,
                                    max_ttft=max_ttft, dtype=dtype, formats=list(formats), nsamples=nsamples, seqlen=seqlen, seed=seed))
    report["profile"] = {"name": profile.name, "source": profile.source, "targets": dataclasses.asdict(targets),
                         "memory_budget": profile.memory.budget, "export": dataclasses.asdict(profile.export),
                         "latency": profile.latency.to_dict()}

    t = time.perf_counter()
    lm = load_model(model_spec, progress=log)
    timings["load_s"] = time.perf_counter() - t
    base = base_of(lm)

    t = time.perf_counter()
    ids, desc, gen_s = calibration_ids(lm.model, lm.tokenizer, "self", nsamples + heldout, seqlen, seed, fingerprint=lm.fingerprint,
                                       progress=(lambda i, n: progress("calibration text", i, n)) if progress else None)
    calib, held = ids[:nsamples], ids[nsamples:]
    desc = {**desc, "nsamples": nsamples, "tokens": int(calib.numel()), "heldout_samples": heldout}
    # Recovery of the chosen model (lstsq is the best retraining-free variant at 30% in
    # benchmarks/quality_table.py) needs the Gram matrices of the same pass.
    stats = calibrate(lm.model, calib, gram=any(needs(r)["gram"] for r in recoveries), description=desc, progress=(lambda i, n: progress("calibration pass", i, n)) if progress else None)
    dense_lp = search.dense_logprobs(lm.model, held)
    timings["calibration_s"] = time.perf_counter() - t

    t = time.perf_counter()
    candidates = search.enumerate_candidates(lm.model, stats, base, profile, dtypes, targets, profile.export.width_multiple, seed=seed)
    timings["enumerate_s"] = time.perf_counter() - t
    dense_checks = {c.dtype: c for c in candidates if c.plan is None}
    report["dense"] = {d: c.to_dict() for d, c in dense_checks.items()}
    for d, c in dense_checks.items():
        log(f"dense {d}: {c.check.describe()}")

    with tempfile.TemporaryDirectory(prefix="edgeprune-fit-") as tmpdir:
        tmp = Path(tmpdir)
        feasible_dtypes = sorted({c.dtype for c in candidates if c.check.ok}, key=dtypes.index)
        quant = {}
        dense_exports = {}
        t = time.perf_counter()
        for d in feasible_dtypes:
            fd = format_dtype(fmt, d)
            if fd in ("f32", "fp32"):
                quant[d] = 0.0
                continue
            path = tmp / (f"dense.{fd}.gguf" if fmt == "gguf" else f"dense-{fd}")
            export_artifact(lm.model, lm.tokenizer, fmt, fd, path, verify=False)
            quant[d] = search.quant_kl(dense_lp, runtime_logits_fn(fmt, path, seqlen), held)
            dense_exports[d] = path
            log(f"quantization KL of the dense model as {fmt} {fd}: {quant[d]:.4f}")
        timings["quant_kl_s"] = time.perf_counter() - t

        t = time.perf_counter()
        keys = search.to_evaluate(candidates)
        kls = search.structure_kls(lm, keys, dense_lp, held, candidates,
                                   progress=(lambda i, n: progress("quality of candidates", i, n)) if progress else None)
        for c in candidates:
            c.kl_structure = kls.get(c.key)
            c.kl_quant = quant.get(c.dtype)
        timings["quality_s"] = time.perf_counter() - t
        chosen = search.choose(candidates, dtypes)
        report["candidates"] = [c.to_dict() for c in candidates if c.kl_structure is not None or c.check.ok]
        report["search"] = {"evaluated_structures": len(keys), "candidates": len(candidates),
                            "feasible": sum(c.check.ok for c in candidates), "quality_proxy": "KL(dense||candidate) structure + quantization, nats/token on held-out self-generated text"}

        if chosen is None:
            best, reach = search.closest_miss(candidates)
            report["result"] = {"ok": False, "closest": best.to_dict(), "unreachable": reach}
            timings["total_s"] = time.perf_counter() - t_start
            report["timings"] = timings
            _write_outputs(out, report, candidates, None, targets, profile)
            msg = "; ".join(reach) or best.check.describe()
            raise EdgepruneError(f"no candidate meets the targets of profile {profile.name}: {msg}. "
                                 f"Closest: {best.label} ({best.check.describe()}); report in {out}/report.json", exit_code=3)

        log(f"chosen: {chosen.label}: {chosen.check.describe()}; quality KL {chosen.quality:.4f}")
        t = time.perf_counter()
        pruned, plan = _prune_with_best_recovery(lm, stats, chosen, base, desc, recoveries, calib, dense_lp, held, out, report, log)
        timings["prune_s"] = time.perf_counter() - t

        artifacts = {}
        for f in formats:
            fd = format_dtype(f, chosen.dtype)
            name = f"model.{fd}.gguf" if f == "gguf" else f"model-onnx-{fd}"
            t = time.perf_counter()
            log(f"exporting {f} {fd} (verified against torch)")
            exp = export_artifact(pruned, lm.tokenizer, f, fd, out / name, verify=True)
            artifacts[f] = {"path": str(out / name), "dtype": fd, "export": exp, "export_s": time.perf_counter() - t}

        t = time.perf_counter()
        # the host prediction is for the thread count its constants were measured with: bench with it
        bench_threads = threads or (host.hardware.threads if host is not None else None)
        for f, art in artifacts.items():
            log(f"benchmarking {art['path']} on this host")
            dense_path = dense_exports.get(chosen.dtype) if f == fmt else None
            if dense_path is not None:  # pruned and dense alternately: a fair ratio on a drifting machine
                art["bench"], art["bench_dense"] = bench_interleaved([art["path"], dense_path], bench_threads, bench_rounds, bench_repeats)
                art["measured_decode_speedup"] = paired_ratio(art["bench"], art["bench_dense"])
            else:
                art["bench"] = bench_artifact(art["path"], threads=bench_threads, repeats=bench_rounds * bench_repeats)
            if host is not None and host.latency.backend == ("llama.cpp" if f == "gguf" else "onnxruntime"):
                geom = search.geometry_of(pruned, None)
                try:
                    pred = latency.predict(geom, chosen.dtype, host.latency, prompt_tokens=art["bench"]["prompt_tokens"],
                                           context=art["bench"]["prompt_tokens"] + art["bench"]["gen_tokens"])
                except EdgepruneError as exc:  # e.g. a host profile calibrated for another dtype: the fit still stands
                    log(f"no host prediction from profile {host.name}: {exc}")
                    continue
                art["host_prediction"] = {"profile": host.name, "decode_tok_s": pred.decode_tok_s, "ttft_s": pred.ttft_s,
                                          "prefill_tok_s": pred.prefill_tok_s}
        timings["bench_s"] = time.perf_counter() - t

    timings["total_s"] = time.perf_counter() - t_start
    report["timings"] = timings
    report["result"] = {"ok": True, "chosen": chosen.to_dict(), "checkpoint": str(out / "model"), "artifacts": artifacts,
                        "plan": {"widths": plan.widths(), "dropped_layers": plan.dropped_layers, "achieved": plan.achieved}}
    _write_outputs(out, report, candidates, chosen, targets, profile)
    return report, 0


def _prune_with_best_recovery(lm, stats, chosen, base, desc, recoveries, calib, dense_lp, held, out, report, log):
    """Prune the chosen plan, trying each recovery in `recoveries` (["lstsq", "bias"]): keep the one with the
    lowest held-out KL, or none. Closed-form recovery can overfit a small calibration set (lstsq
    wants ~10x the FFN width in tokens), so held-out text decides, not the calibration fit."""
    from edgeprune.methods import with_recovery
    from edgeprune.pipeline import prune_and_save

    if chosen.plan is None:
        pruned, plan, _ = prune_and_save(lm, stats, out / "model", plan=identity_plan(lm, base, desc),
                                         report={"from": "edgeprune fit"}, inplace=True)
        report["recovery"] = {"kept": "none", "tried": {}}
        return pruned, plan
    tried = {"none": chosen.kl_structure}
    last = trial = None  # (name, model, plan) of the newest trial: its checkpoint is the one on disk
    for name in recoveries:
        last = trial = None  # free the previous trial before building the next
        plan = with_recovery(chosen.plan, name)
        trial, plan, _ = prune_and_save(lm, stats, out / "model", plan=plan, ids=calib, report={"from": "edgeprune fit"})
        tried[name] = search.kl_to_dense(dense_lp, trial, held)
        log(f"recovery {name}: held-out KL {chosen.kl_structure:.4f} -> {tried[name]:.4f}")
        last = (name, trial, plan)
    best = min(tried, key=tried.get)
    report["recovery"] = {"kept": best, "tried": tried}
    if last is not None and last[0] == best:
        _, pruned, plan = last  # already saved under out/model
    else:
        last = trial = None  # free the rejected trial before pruning again
        plan = chosen.plan if best == "none" else with_recovery(chosen.plan, best)
        pruned, plan, _ = prune_and_save(lm, stats, out / "model", plan=plan, ids=calib, report={"from": "edgeprune fit"},
                                         inplace=True)
    log(f"kept recovery: {best}")
    return pruned, plan


def _write_outputs(out: Path, report: dict, candidates, chosen, targets, profile) -> None:
    from edgeprune.exporters.common import atomic_file

    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "report.json") as tmp:
        write_json(tmp, report)
    with atomic_file(out / "report.md") as tmp:
        tmp.write_text(markdown(report))
    with atomic_file(out / "frontier.png") as tmp:
        plot_frontier(candidates, chosen, targets, profile, tmp)


def plot_frontier(candidates, chosen, targets, profile, path: Path) -> None:
    from edgeprune.report import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    scored = [c for c in candidates if not math.isinf(c.quality)]
    markers = {0: "o", 2: "s", 4: "^", 6: "D"}
    colors = {}
    for c in scored:
        color = colors.setdefault(c.dtype, f"C{len(colors)}")
        ax.scatter(c.prediction.decode_tok_s, max(c.quality, 1e-5), marker=markers.get(c.drop_layers, "o"), color=color,
                   edgecolors="black" if c.check.ok else "none", s=36, alpha=0.9 if c.check.ok else 0.45)
    for dt, color in colors.items():
        ax.scatter([], [], color=color, label=dt)
    for drop, m in markers.items():
        ax.scatter([], [], marker=m, color="grey", label=f"-{drop} layers")
    if targets.decode_tok_s_min:
        ax.axvline(targets.decode_tok_s_min, color="red", ls="--", lw=1, label=f"target {targets.decode_tok_s_min:g} tok/s")
    if not scored:  # nothing was scored: show where every candidate lands on the latency axis
        ax.scatter([c.prediction.decode_tok_s for c in candidates], [1.0] * len(candidates), marker="|", s=200, color="grey",
                   label="candidates (not scored)")
        ax.text(0.5, 0.6, "no candidate meets the targets", transform=ax.transAxes, ha="center", color="red")
    if chosen is not None:
        ax.scatter(chosen.prediction.decode_tok_s, max(chosen.quality, 1e-5), marker="*", s=320, color="gold",
                   edgecolors="black", zorder=5, label=f"chosen: {chosen.label}")
    if scored:
        ax.set_yscale("log")
    ax.set_xlabel(f"predicted decode tokens/s on {profile.name}")
    ax.set_ylabel("quality loss: KL(dense || candidate), nats/token")
    ax.set_title(f"edgeprune fit --profile {profile.name}: quality-latency frontier (black edge = meets all targets)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def markdown(report: dict) -> str:
    from edgeprune.bench import median

    lines = [f"# edgeprune fit --profile {report['profile']['name']}", ""]
    t = report["profile"]["targets"]
    lines.append(f"Targets: decode >= {t.get('decode_tok_s_min')} tok/s, TTFT <= {t.get('ttft_max_s')} s for a "
                 f"{t.get('prompt_tokens')}-token prompt, memory <= {t.get('memory_max')} B.")
    lines.append("")
    lines.append("| candidate | predicted decode tok/s | predicted TTFT s | memory MB | targets | KL structure | KL quant |")
    lines.append("|---|---|---|---|---|---|---|")
    for c in report.get("candidates", []):
        if c["quality_kl"] is None and not c["targets"]["ok"]:
            continue
        p = c["prediction"]
        lines.append(f"| {c['label']} | {p['decode_tok_s']:.1f} | {p['ttft_s']:.2f} | {p['memory']['total'] / 1e6:.0f} | "
                     f"{'ok' if c['targets']['ok'] else 'missed'} | {_f(c['kl_structure'])} | {_f(c['kl_quant'])} |")
    res = report.get("result", {})
    lines.append("")
    if res.get("ok"):
        ch = res["chosen"]
        lines.append(f"**Chosen:** {ch['label']} — quality KL {ch['quality_kl']:.4f}; widths {res['plan']['widths']}; "
                     f"dropped layers {res['plan']['dropped_layers']}.")
        for f, art in res["artifacts"].items():
            b = art["bench"]
            v = art["export"].get("verification", {})
            lines.append(f"- {f}: `{art['path']}` ({art['dtype']}), verified top-1 {v.get('top1_agreement', float('nan')):.4f}; "
                         f"on this host decode {median(b, 'decode_tok_s'):.1f} tok/s, prefill {median(b, 'prefill_tok_s'):.1f} tok/s, "
                         f"TTFT {median(b, 'ttft_s'):.3f} s, peak RSS {b.get('peak_rss_mb', float('nan')):.0f} MiB"
                         + (f"; dense {median(art['bench_dense'], 'decode_tok_s'):.1f} tok/s -> x{art['measured_decode_speedup']:.2f}" if "bench_dense" in art else "")
                         + (f"; profile {art['host_prediction']['profile']} predicts decode {art['host_prediction']['decode_tok_s']:.1f} tok/s, "
                            f"prefill {art['host_prediction']['prefill_tok_s']:.1f} tok/s, TTFT {art['host_prediction']['ttft_s']:.3f} s"
                            if "host_prediction" in art else ""))
    else:
        lines.append("**No candidate meets the targets.** " + "; ".join(res.get("unreachable", [])))
    lines.append("")
    lines.append(f"Timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in report.get("timings", {}).items()))
    return "\n".join(lines) + "\n"


def _f(x):
    return "—" if x is None else f"{x:.4f}"

