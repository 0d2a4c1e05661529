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
import gc
import math
import tempfile
import time
from pathlib import Path

from edgeprune import dtypes, latency, mix, search, shipped
from edgeprune.artifacts import export_artifact
from edgeprune.bench import bench_artifact, bench_interleaved, paired_ratio
from edgeprune.budget import achieved
from edgeprune.calibrate import calibrate
from edgeprune.families import family_of
from edgeprune.data import calibration_ids
from edgeprune.distill import KD_DEFAULTS
from edgeprune.errors import EdgepruneError
from edgeprune.exporters.common import atomic_file
from edgeprune.exporters.llamacpp_quantize import quantize_gguf
from edgeprune.fit_report import write_outputs
from edgeprune.imatrix import collect_imatrix, write_imatrix_gguf
from edgeprune.models import load_model, reload
from edgeprune.pipeline import base_of, prune_and_save
from edgeprune.plan import LayerPlan, PrunePlan
from edgeprune.profiles import load_profile, parse_bytes
from edgeprune.prune import gguf_safe_args, with_recovery
from edgeprune.recover import CLOSED_FORM, check_recover_args, needs
from edgeprune.report import memory_now, run_header

# fit's promise (issue #12): the default run, distillation included, ends within 10 minutes on the
# reference 2-core CPU. Distillation is the one step whose length is a choice, so with
# --recover-time auto it gets what is left of this budget, counted from run_fit's start.
FIT_BUDGET_S = 600.0
# What fit still does once distillation ends: the rest of the finalists (imatrix, export and runtime
# scoring of the pruned one, the dense one's scoring), the verified export of what ships, the
# quality report and the host benchmark. In the reference runs (SmolLM2-135M, raspberrypi5 and
# raspberrypi5 at 80 tok/s, benchmarks/results/shipped_quality/*/report.json) that tail took about
# 110-150 s (quality report 63-91 s, benchmark 12-22 s, the rest exports and scoring).
FIT_RESERVE_S = 150.0
# That tail is exports, llama.cpp quantizations and runtime scoring, the same work as scoring one dense
# mix measured earlier on the same model and host (12 mixes in 91-110 s in those runs): a bigger model
# or a slower host reserves 18 of those (1.5x the 12) instead of the constant.
FIT_RESERVE_MIXES = 18
# Under this, distillation is a handful of steps (SmolLM2-135M: ~4 s per step of 4 x 128 tokens) plus
# its two held-out measurements: too little to be worth the time it would take from the budget.
KD_MIN_S = 30.0

# Baselines every report shows beside what ships: the dense model in these GGUF types exactly as
# llama.cpp users make them (no importance matrix, llama.cpp's own mix).
DENSE_BASELINES = ("q8_0", "q4_0")


def parse_quality_floor(text: str | None) -> tuple[str, float] | None:
    """--max-quality-loss: '1.15x' (perplexity on the bundled excerpt at most 1.15x the dense torch
    model's) or 'kl:0.3' (mean KL to the dense model on held-out text, nats/token)."""
    if text is None:
        return None
    t = str(text).strip().lower()
    try:
        if t.endswith("x"):
            v = float(t[:-1])
            if math.isfinite(v) and v >= 1.0:
                return ("ppl_ratio", v)
        elif t.startswith("kl:"):
            v = float(t[3:])
            if math.isfinite(v) and v > 0:
                return ("kl", v)
    except ValueError:
        pass
    raise EdgepruneError(f"--max-quality-loss takes a perplexity ratio like 1.15x (>= 1) or a KL like kl:0.3 (> 0), got '{text}'")


def check_recover_time(recoveries: list[str], recover_seconds) -> float | None:
    """fit's --recover-time: None or "auto" (the budget decides, see kd_time_box) or forced seconds."""
    if recover_seconds is None or recover_seconds == "auto":
        return None
    if "kd" not in recoveries:
        raise EdgepruneError(f"--recover-time is the time box of kd: add kd to --recover (e.g. lstsq,bias,kd), "
                             f"got '{','.join(recoveries) or 'none'}'")
    check_recover_args(["kd"], {"kd_seconds": recover_seconds})  # the same range as prune's
    return float(recover_seconds)


def fit_reserve_s(seconds_per_mix: float, rebuild_s: float = 0.0) -> float:
    """Seconds fit keeps for what follows distillation: FIT_RESERVE_S, or FIT_RESERVE_MIXES times
    the seconds one dense mix took to score (the same kind of work, measured on this model and host); plus `rebuild_s`: the
    closed-form recovery that the distillation trial re-runs first, and that is rebuilt again when
    distillation is not kept (twice its measured trial time)."""
    return max(FIT_RESERVE_S, FIT_RESERVE_MIXES * seconds_per_mix) + rebuild_s


def kd_time_box(elapsed_s: float, reserve_s: float, forced_s: float | None = None, budget_s: float = FIT_BUDGET_S,
                minimum_s: float = KD_MIN_S) -> dict:
    """How long fit distills: {"mode", "seconds" (None: skipped), "why", ...} for the report.

    forced (--recover-time 3min): that time, whatever the budget. auto: what is left of `budget_s`
    after `elapsed_s` since fit started and `reserve_s` for the work that follows; skipped when
    that is under `minimum_s`."""
    if forced_s is not None:
        return {"mode": "forced", "seconds": float(forced_s),
                "why": f"--recover-time {forced_s:g}s: distillation gets that time whatever fit's budget"}
    left = budget_s - elapsed_s - reserve_s
    info = {"mode": "auto", "budget_s": budget_s, "elapsed_s": elapsed_s, "reserve_s": reserve_s, "left_s": left}
    spent = (f"{elapsed_s:.0f} s spent, {reserve_s:.0f} s kept for export, verification, the quality report and the benchmark")
    if left < minimum_s:
        return {**info, "seconds": None,
                "why": f"distillation skipped: {max(left, 0.0):.0f} s left of fit's {budget_s / 60:g}-minute budget ({spent}); "
                       "pass --recover-time 3min to distill anyway"}
    return {**info, "seconds": left,
            "why": f"--recover-time auto: {left:.0f} s, what is left of fit's {budget_s / 60:g}-minute budget ({spent})"}


# Full-weight distillation keeps, per trained fp32 parameter, its gradient and AdamW's two moments
# (12 bytes) on top of the weights; the logits of teacher and student at vocabulary width come on top.
KD_BYTES_PER_TRAINED_PARAM = 12
KD_MEMORY_MARGIN = 0.8  # of the memory available when distillation would start


def kd_memory_check(plan: PrunePlan, vocab: int, tokens_per_step: int, available_bytes: int) -> dict:
    """Whether full-weight distillation of `plan`'s model fits the memory left (issue #15: on a 1B
    model its AdamW state alone is ~8 GB): {"ok", "needed_bytes", "available_bytes", "why"}."""
    trained = plan.achieved["params_pruned"] - plan.achieved["params_embedding"]
    logits = 4 * 4 * vocab * tokens_per_step  # teacher and student logits and their log-softmaxes, fp32
    needed = KD_BYTES_PER_TRAINED_PARAM * trained + logits
    ok = needed <= KD_MEMORY_MARGIN * available_bytes
    why = "" if ok else (f"distillation skipped: training {trained / 1e6:.0f}M decoder weights needs about {needed / 2**30:.1f} GiB "
                         f"(gradients, AdamW state, logits) and {available_bytes / 2**30:.1f} GiB is available")
    return {"ok": ok, "needed_bytes": int(needed), "available_bytes": int(available_bytes), "why": why}


def identity_plan(lm, base: dict, desc: dict) -> PrunePlan:
    """The dense model as a plan (fit's answer when the dense model already meets the targets)."""
    cfg = lm.model.config
    layers = [LayerPlan(i, list(range(cfg.intermediate_size)), list(range(cfg.num_key_value_heads)))
              for i in range(cfg.num_hidden_layers)]
    plan = PrunePlan(base=base, method={}, calibration=desc, layers=layers)
    plan.achieved = achieved(lm.model, plan)
    return plan


def apply_overrides(targets, min_tok_s=None, max_memory=None, max_ttft=None):
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
            host_profile="ci-cpu", bench_rounds=3, bench_repeats=2, recover="lstsq,bias,kd", progress=None, log=print,
            max_quality_loss=None, prompts=True, recover_seconds=None, heads=False) -> tuple[dict, int]:
    """`recover_seconds`: kd's time box in seconds, or None / "auto" for what is left of FIT_BUDGET_S.
    `heads`: the search also tries structures that remove KV groups with the FFN channels (--heads)."""
    t_start = time.perf_counter()
    timings = {}
    step = (lambda label: (lambda i, n: progress(label, i, n))) if progress else (lambda label: None)
    profile = load_profile(profile_name)
    host = load_profile(host_profile) if host_profile else None  # a bad --host-profile fails now, not after the search
    targets = apply_overrides(profile.targets, min_tok_s, max_memory, max_ttft)
    floor = parse_quality_floor(max_quality_loss)
    fmt = profile.export.format
    dtype_order = [dtypes.normalize(d, fmt) for d in ([dtype] if dtype else profile.export.dtypes)]
    bad = [f for f in formats if f not in dtypes.FORMATS]
    if bad:
        raise EdgepruneError(f"--formats takes gguf and/or onnx, got {', '.join(bad)}")
    recoveries = [r.strip() for r in (recover or "").split(",") if r.strip() not in ("", "none")]
    kd_forced = check_recover_time(recoveries, recover_seconds)
    out = Path(out)
    report = run_header("fit", dict(model=model_spec, profile=profile_name, out=out, min_tok_s=min_tok_s, max_memory=max_memory,
                                    max_ttft=max_ttft, dtype=dtype, formats=list(formats), nsamples=nsamples, seqlen=seqlen, seed=seed,
                                    max_quality_loss=max_quality_loss, heads=heads))
    report["memory"] = memory = {}  # by phase, filled as the fit goes
    report["profile"] = {"name": profile.name, "source": profile.source, "targets": dataclasses.asdict(targets),
                         "memory_budget": profile.memory.budget, "export": dataclasses.asdict(profile.export),
                         "latency": profile.latency.to_dict()}

    t = time.perf_counter()
    lm = load_model(model_spec, progress=log)
    timings["load_s"] = time.perf_counter() - t
    memory["load"] = memory_now()
    base = base_of(lm)

    t = time.perf_counter()
    ids, desc, _ = calibration_ids(lm.model, lm.tokenizer, "self", nsamples + heldout, seqlen, seed, fingerprint=lm.fingerprint,
                                   progress=step("calibration text"))
    calib, held = ids[:nsamples], ids[nsamples:]
    desc = {**desc, "nsamples": nsamples, "tokens": int(calib.numel()), "heldout_samples": heldout}
    # Recovery of the chosen model needs the Gram matrices of the same pass.
    use_imatrix = fmt == "gguf"
    stats = calibrate(lm.model, calib, gram=any(needs(r)["gram"] for r in recoveries), description=desc, progress=step("calibration pass"),
                      imatrix=use_imatrix)
    dense_lp = search.dense_logprobs(lm.model, held)
    dense_imatrix = stats.imatrix
    timings["calibration_s"] = time.perf_counter() - t
    memory["calibration"] = memory_now()

    t = time.perf_counter()
    menu = search.mixes(dtype_order, fmt)
    shapes = structure_shapes(lm.model, formats)
    report["shapes"] = shapes
    if shapes["shapes"] == "uniform":
        log(f"structures: {shapes['why']}")
    family = family_of(lm.model)
    if "bias" in recoveries and "gguf" in formats and not family.gguf_reads({"attn_output", "ffn_down"}):
        recoveries = [r for r in recoveries if r != "bias"]
        log(f"recovery bias skipped: llama.cpp's {family.uniform_arch} graph reads no o/down-projection biases")
    if heads and base["kv_heads"] < 2:
        log(f"--heads: the model has {base['kv_heads']} KV group per layer, none can go; searching FFN channels and layers")
        heads = False
    candidates = search.enumerate_candidates(lm.model, stats, base, profile, menu, targets, profile.export.width_multiple, seed=seed,
                                             imatrix=use_imatrix, shapes=shapes["shapes"], heads=heads)
    timings["enumerate_s"] = time.perf_counter() - t
    memory["enumerate"] = memory_now()
    report["dense"] = {c.mix: c.to_dict() for c in candidates if c.plan is None}
    for c in candidates:
        if c.plan is None:
            log(f"dense {c.mix}: {c.check.describe()}")

    with tempfile.TemporaryDirectory(prefix="edgeprune-fit-") as tmpdir:
        tmp = Path(tmpdir)
        t = time.perf_counter()
        keys = search.to_evaluate(candidates)
        kls = search.structure_kls(lm, keys, dense_lp, held, candidates, progress=step("quality of candidates"))
        for c in candidates:
            c.kl_structure = kls.get(c.key)
        timings["quality_s"] = time.perf_counter() - t
        memory["quality"] = memory_now()

        # Every runtime score of this fit goes through `scores`: the dense mixes and the finalists on the
        # held-out text, the quality table on both texts; a file scored once is not run again.
        t = time.perf_counter()
        (tmp / "reference").mkdir()
        text_windows = shipped.excerpt_windows(lm.tokenizer)
        refs = {"held": [x.numpy() for x in dense_lp], "text": shipped.dense_reference(lm.model, text_windows, tmp / "reference")}
        dense_text_ppl = shipped.reference_ppl(refs["text"], text_windows)
        scores = shipped.Scores({"held": held.numpy(), "text": text_windows}, refs)
        dense_exports, quant, mixes_info = _dense_mixes(lm, fmt, menu, candidates, dense_imatrix, scores, tmp, log, step("dense quantizations"))
        for c in candidates:
            c.kl_quant = quant.get((c.dtype, c.head))
        timings["quant_kl_s"] = time.perf_counter() - t
        memory["quant_kl"] = memory_now()
        report["candidates"] = [c.to_dict() for c in candidates if c.kl_structure is not None or c.check.ok]
        report["search"] = {"evaluated_structures": len(keys), "candidates": len(candidates), "mixes": [search.mix_label(*m) for m in menu],
                            "kv_groups": "searched with the FFN channels (--heads)" if heads else "kept (FFN channels and layers only)",
                            "feasible": sum(c.check.ok for c in candidates), "quantization": mixes_info,
                            "quality_proxy": "KL(dense||candidate) structure (torch) + quantization (runtime), nats/token on held-out self-generated text"}

        finalists = [c for c in (search.best(candidates, dtype_order, dense=False), search.best(candidates, dtype_order, dense=True)) if c]
        if not finalists:
            top, reach = search.closest_miss(candidates)
            report["result"] = {"ok": False, "closest": top.to_dict(), "unreachable": reach}
            _finish(out, report, timings, t_start, candidates, None, targets, profile)
            msg = "; ".join(reach) or top.check.describe()
            raise EdgepruneError(f"no candidate meets the targets of profile {profile.name}: {msg}. "
                                 f"Closest: {top.label} ({top.check.describe()}); report in {out}/report.json", exit_code=3)

        # The proxy ranks; the artifacts decide: each finalist is built, exported as it would ship and
        # scored through the runtime on the held-out text (the best pruned and the best dense mix).
        t = time.perf_counter()
        # What needs the dense model itself is done now; it is then let go while the finalists are
        # built, each from a fresh read of its files pruned in place (a 1B fit held the dense model
        # and a pruned copy at once, issue #15): the full-precision exports are written first.
        full_precision = {}
        for c in finalists:
            if c.plan is None and (c.dtype, c.head) not in dense_exports:
                full_precision[(c.dtype, c.head)] = path = tmp / f"dense.{c.mix}.{fmt}"
                export_artifact(lm.model, lm.tokenizer, fmt, dtypes.for_format(c.dtype, fmt), path, verify=False)
        if fmt == "gguf" and not (tmp / "dense.f32.gguf").exists():  # the quality table's baselines are made from it
            export_artifact(lm.model, lm.tokenizer, "gguf", "f32", tmp / "dense.f32.gguf", verify=False)
        lm.model = None
        gc.collect()
        trials = []
        for c in finalists:
            t_finalist = time.perf_counter()
            pruned, plan, imat = (None, None, dense_imatrix)
            if c.plan is not None:
                def kd_box(rebuild_s: float) -> dict:  # asked just before distilling: the trials before it count
                    return kd_time_box(time.perf_counter() - t_start, fit_reserve_s(mixes_info["seconds_per_mix"], rebuild_s), kd_forced)

                pruned, plan = _prune_with_best_recovery(lm, stats, c, base, desc, recoveries, calib, dense_lp, held, out, report, log,
                                                         kd_box=kd_box, progress=progress)
                imat = collect_imatrix(pruned, calib) if use_imatrix else None
                path = tmp / f"candidate.{c.mix}.{fmt}"
                export_artifact(pruned, lm.tokenizer, fmt, dtypes.for_format(c.dtype, fmt), path, verify=False, imatrix=imat, head=c.head)
            else:
                path = dense_exports.get((c.dtype, c.head)) or full_precision[(c.dtype, c.head)]
            scored = scores.quality(fmt, path)  # a dense mix's held-out score is the search's, not run again
            q, kl = scored["text"], scored["held"]["kl_vs_dense"]
            trials.append({"candidate": c, "model": pruned, "plan": plan, "imatrix": imat, "path": path,
                           "held_out_kl": kl, "excerpt": q, "ppl_ratio": q["ppl"] / dense_text_ppl,
                           "seconds": time.perf_counter() - t_finalist})
            log(f"finalist {c.label}: held-out KL through {fmt} {kl:.4f}, excerpt perplexity {q['ppl']:.2f} "
                f"({q['ppl'] / dense_text_ppl:.3f}x dense torch)")
        allowed = [tr for tr in trials if _within_floor(tr, floor)]
        report["finalists"] = [{"label": tr["candidate"].label, "held_out_kl": tr["held_out_kl"], "excerpt": tr["excerpt"],
                                "ppl_ratio_vs_dense_torch": tr["ppl_ratio"], "within_floor": _within_floor(tr, floor),
                                "seconds": tr["seconds"]} for tr in trials]
        timings["finalists_s"] = time.perf_counter() - t
        memory["finalists"] = memory_now()
        if not allowed:
            report["result"] = {"ok": False, "unreachable": [f"quality floor {max_quality_loss}"], "closest": finalists[0].to_dict()}
            _finish(out, report, timings, t_start, candidates, None, targets, profile)
            best_tr = min(trials, key=lambda tr: tr["held_out_kl"])
            raise EdgepruneError(f"no candidate that meets the targets of profile {profile.name} is within --max-quality-loss "
                                 f"{max_quality_loss}: the best, {best_tr['candidate'].label}, has held-out KL {best_tr['held_out_kl']:.3f} and "
                                 f"{best_tr['ppl_ratio']:.3f}x the dense perplexity; report in {out}/report.json", exit_code=3)
        won = min(allowed, key=lambda tr: tr["held_out_kl"])
        chosen = won["candidate"]
        why = ("the best pruned candidate scored worse through the runtime than the dense model in "
               f"{chosen.mix}, which meets the targets: fit ships the dense model" if chosen.plan is None and len(trials) > 1 else
               "only a dense quantization meets the targets" if chosen.plan is None else
               "no dense quantization meets the targets" if len(trials) == 1 else
               "it beats the best dense quantization that meets the targets through the runtime")
        log(f"chosen: {chosen.label}: {chosen.check.describe()} ({why})")
        pruned, plan, ship_imatrix = won["model"], won["plan"], won["imatrix"]
        allowed = won = trials = None  # the losing finalist's model goes before the dense one is read back
        if chosen.plan is None:  # out/model holds the dense model then, as a plan of everything
            pruned, plan = _prune_with_best_recovery(lm, stats, chosen, base, desc, [], calib, dense_lp, held, out, report, log)

        artifacts = _ship(pruned, lm.tokenizer, chosen, fmt, formats, ship_imatrix, out, log)
        if ship_imatrix is not None:
            with atomic_file(out / "imatrix.gguf") as f:
                write_imatrix_gguf(f, ship_imatrix, int(calib.numel()), desc.get("source", "self"), int(calib.shape[0]), int(calib.shape[1]))
            artifacts["imatrix"] = {"path": str(out / "imatrix.gguf"), "tokens": int(calib.numel()),
                                    "use": f"llama-quantize --imatrix {out / 'imatrix.gguf'} (llama.cpp's own tool)"}
        # what is left runs the artifacts through their runtimes: the torch model is not needed (at 1B it
        # was 5 GB beside llama.cpp's models in the quality table, issue #15)
        geometry = search.geometry_of(pruned, chosen.plan)
        pruned = None
        gc.collect()

        t = time.perf_counter()
        report["quality"] = _quality_table(base["tied_embeddings"], fmt, artifacts, dense_exports, chosen, scores, dense_text_ppl, tmp, prompts, log)
        report["quality"]["protocol"]["runtime_runs"] = scores.runs
        timings["quality_report_s"] = time.perf_counter() - t
        memory["quality_report"] = memory_now()

        t = time.perf_counter()
        _bench(artifacts, dense_exports.get((chosen.dtype, chosen.head)), fmt, chosen, plan, host, threads, bench_rounds, bench_repeats, log)
        timings["bench_s"] = time.perf_counter() - t
        memory["bench"] = memory_now()

    report["result"] = {"ok": True, "chosen": chosen.to_dict(), "why": why, "checkpoint": str(out / "model"),
                        "artifacts": {k: v for k, v in artifacts.items() if k != "imatrix"}, "imatrix": artifacts.get("imatrix"),
                        "plan": {"widths": plan.widths(), "dropped_layers": plan.dropped_layers, "achieved": plan.achieved},
                        "speed_bound": latency.speed_bound(geometry, chosen.dtype,
                                                           "llama.cpp" if fmt == "gguf" else "onnxruntime", chosen.head)}
    log("what bounds decode: " + report["result"]["speed_bound"]["says"])
    _finish(out, report, timings, t_start, candidates, chosen, targets, profile)
    return report, 0


def _within_floor(trial: dict, floor) -> bool:
    if floor is None:
        return True
    kind, v = floor
    return trial["ppl_ratio"] <= v if kind == "ppl_ratio" else trial["held_out_kl"] <= v


def _dense_mixes(lm, fmt, menu, candidates, imatrix, scores, tmp: Path, log, progress):
    """The dense model exported in the mixes that can make a finalist (search.score_mixes: one F32
    GGUF, quantized by llama.cpp per mix with the importance matrix), and each one's quantization KL
    through the runtime: ({mix: path}, {mix: KL}, what the report says about it)."""
    exports, seconds = {}, []
    f32 = tmp / "dense.f32.gguf"
    upper = len({(c.dtype, c.head) for c in candidates if c.check.ok})  # the progress total: at most every feasible mix

    def score(m) -> float:
        d, head = m
        fd = dtypes.for_format(d, fmt)
        if not dtypes.get(fd, fmt).quantized:
            return 0.0
        t = time.perf_counter()
        path = tmp / f"dense.{search.mix_label(d, head)}.{fmt}"
        if fmt == "gguf":
            if not f32.exists():
                export_artifact(lm.model, lm.tokenizer, "gguf", "f32", f32, verify=False)
            quantize_gguf(f32, path, fd, imatrix=imatrix, overrides=mix.output_override(head), tied=bool(lm.model.config.tie_word_embeddings))
        else:
            export_artifact(lm.model, lm.tokenizer, fmt, fd, path, verify=False)
        kl = scores.quality(fmt, path, ("held",))["held"]["kl_vs_dense"]
        exports[m] = path
        seconds.append(time.perf_counter() - t)
        log(f"quantization KL of the dense model as {fmt} {search.mix_label(fd, head)}: {kl:.4f}")
        if progress:
            progress(len(exports), upper)
        return kl

    quant, skipped = search.score_mixes(candidates, score, fmt, menu)
    for label, why in skipped.items():
        log(f"dense model as {fmt} {label}: not scored, {why}")
    info = {"scored": [search.mix_label(*m) for m in exports], "not_scored": skipped,
            "seconds_per_mix": sum(seconds) / len(seconds) if seconds else 0.0}
    return exports, quant, info


def structure_shapes(model, formats) -> dict:
    """Which structures fit may search: only those every export target can load. A GGUF of a family
    without a per-layer llama.cpp architecture (Qwen3, Gemma 3) needs one shape in every layer."""
    family = family_of(model)
    if "gguf" in formats and not family.per_layer_gguf:
        return {"shapes": "uniform", "why": f"llama.cpp's {family.uniform_arch} graph builds every layer from layer 0's "
                                           "shape, so every layer keeps the same FFN width (CFSP's scores still choose "
                                           "which channels; the coarse allocation is uniform)"}
    return {"shapes": "per-layer", "why": "the export targets hold per-layer widths"
            + (f" (GGUF as llama.cpp's {family.per_layer_arch})" if "gguf" in formats else "")}


def _ship(model, tokenizer, chosen, fmt, formats, imatrix, out: Path, log) -> dict:
    """Export what ships, verified against torch before each file appears."""
    artifacts = {}
    for f in formats:
        fd = dtypes.for_format(chosen.dtype, f)
        label = search.mix_label(fd, chosen.head if f == "gguf" else None)
        name = f"model.{label}.gguf" if f == "gguf" else f"model-onnx-{fd}"
        t = time.perf_counter()
        log(f"exporting {f} {label} (verified against torch)")
        exp = export_artifact(model, tokenizer, f, fd, out / name, verify=True, imatrix=imatrix if f == "gguf" else None,
                              head=chosen.head if f == "gguf" else None)
        artifacts[f] = {"path": str(out / name), "dtype": fd, "mix": label, "export": exp, "export_s": time.perf_counter() - t}
    return artifacts


def _quality_table(tied: bool, fmt, artifacts, dense_exports, chosen, scores, dense_text_ppl, tmp, prompts, log) -> dict:
    """What ships beside the dense baselines, all through their runtimes on the same held-out text (the
    GGUF baselines are quantized from the dense F32 GGUF written before the finalists)."""
    prompt_set = shipped.load_prompts() if prompts else None
    rows = {}
    if "gguf" in artifacts:
        rows[f"shipped: {chosen.label}"] = ("gguf", artifacts["gguf"]["path"])
    if "onnx" in artifacts:
        rows[f"shipped (ONNX {artifacts['onnx']['dtype']})"] = ("onnx", artifacts["onnx"]["path"])
    if fmt == "gguf":
        f32 = tmp / "dense.f32.gguf"
        for d in DENSE_BASELINES:  # as llama.cpp users make them: no imatrix, llama.cpp's own mix
            path = tmp / f"baseline.{d}.gguf"
            quantize_gguf(f32, path, d, tied=tied)
            rows[f"dense {d} (llama.cpp default)"] = ("gguf", path)
        if (chosen.dtype, chosen.head) in dense_exports and chosen.plan is not None:
            rows[f"dense {search.mix_label(chosen.dtype, chosen.head)} + imatrix (same mix, unpruned)"] = ("gguf", dense_exports[(chosen.dtype, chosen.head)])
    table = {}
    for label, (f, path) in rows.items():
        log(f"scoring {label} through {'llama.cpp' if f == 'gguf' else 'onnxruntime'}")
        q = scores.artifact(f, path, prompt_set)
        q["excerpt"]["ppl_ratio_vs_dense_torch"] = q["excerpt"]["ppl"] / dense_text_ppl
        table[label] = q
    dense_answers = None
    if prompt_set is not None:
        dense_answers = table.get("dense q8_0 (llama.cpp default)", {}).get("answers")
    held, text = scores.windows["held"], scores.windows["text"]
    return {"protocol": {"held_out_self": f"{len(held)} x {held.shape[1]} self-generated tokens (not used for calibration)",
                         "excerpt": f"{len(text)} x {text.shape[1]} tokens of the bundled WikiText-2 validation excerpt",
                         "reference": "dense torch fp32 model (top-1 agreement and KL)"},
            "dense_torch_excerpt_ppl": dense_text_ppl, "artifacts": table,
            "prompts": [p["prompt"] for p in prompt_set] if prompt_set else None, "dense_answers": dense_answers}


def _bench(artifacts, dense_path, fmt, chosen, plan, host, threads, rounds, repeats, log) -> None:
    # the host prediction is for the thread count its constants were measured with: bench with it
    bench_threads = threads or (host.hardware.threads if host is not None else None)
    for f, art in artifacts.items():
        if f == "imatrix":
            continue
        log(f"benchmarking {art['path']} on this host")
        # pruned and dense alternately: a fair ratio on a drifting machine. A dense model that ships is
        # that dense mix itself: pairing it with itself would double the benchmark (~100 s at 1B) to say x1.00
        if dense_path is not None and f == fmt and chosen.plan is not None:
            art["bench"], art["bench_dense"] = bench_interleaved([art["path"], dense_path], bench_threads, rounds, repeats)
            art["measured_decode_speedup"] = paired_ratio(art["bench"], art["bench_dense"])
        else:
            art["bench"] = bench_artifact(art["path"], threads=bench_threads, repeats=rounds * repeats)
        if host is not None and host.latency.backend == dtypes.FORMAT_BACKEND[f]:
            try:
                pred = latency.predict(plan.geometry(), dtypes.for_format(chosen.dtype, f), host.latency,
                                       prompt_tokens=art["bench"]["prompt_tokens"],
                                       context=art["bench"]["prompt_tokens"] + art["bench"]["gen_tokens"],
                                       head_dtype=chosen.head if f == "gguf" else None, imatrix=f == "gguf")
            except EdgepruneError as exc:  # e.g. a host profile calibrated for another dtype: the fit still stands
                log(f"no host prediction from profile {host.name}: {exc}")
                continue
            art["host_prediction"] = {"profile": host.name, "decode_tok_s": pred.decode_tok_s, "ttft_s": pred.ttft_s,
                                      "prefill_tok_s": pred.prefill_tok_s}


def _finish(out: Path, report: dict, timings: dict, t_start: float, candidates, chosen, targets, profile) -> None:
    timings["total_s"] = time.perf_counter() - t_start
    report["timings"] = timings
    write_outputs(out, report, candidates, chosen, targets, profile)


def _read_back(lm) -> None:
    """The dense model in `lm.model` again: read back from its files when fit has let it go."""
    if lm.model is None:
        lm.model = reload(lm)


def _prune_with_best_recovery(lm, stats, chosen, base, desc, recoveries, calib, dense_lp, held, out, report, log, kd_box=None,
                              progress=None):
    """Prune the chosen plan, trying each closed-form recovery in `recoveries` (["lstsq", "bias"]): keep
    the one with the lowest held-out KL, or none. Closed-form recovery can overfit a small calibration
    set, so held-out text decides, not the calibration fit (lstsq also picks its ridge per block on
    held-out calibration rows and leaves a block unchanged when no ridge helps there).
    With "kd" in `recoveries`, distillation from the dense model then runs on top of the kept one,
    time-boxed by `kd_box(rebuild_s)` (kd_time_box's answer; the default: KD_DEFAULTS' time box),
    and is kept only when it lowers the held-out KL too.

    Each trial is built from the dense model read again from its files (models.reload) and pruned in
    place, so a trial costs its own size and one block, not the dense model beside it; kd, which
    distills from the dense model, prunes a copy of it. `lm.model` is None on return: fit holds the
    dense model only while it needs it."""
    def build(name: str, extra: dict | None = None, progress=None):
        _read_back(lm)
        plan = chosen.plan if name == "none" else with_recovery(chosen.plan, name, gguf_safe_args(lm.model, name, extra))
        built = prune_and_save(lm, stats, out / "model", plan=plan, ids=calib, report={"from": "edgeprune fit"}, progress=progress,
                               inplace=True)
        lm.model = None  # pruned in place, or (kd) copied: either way the dense model is let go
        return built

    if chosen.plan is None:
        _read_back(lm)
        pruned, plan, _ = prune_and_save(lm, stats, out / "model", plan=identity_plan(lm, base, desc),
                                         report={"from": "edgeprune fit"}, inplace=True)
        lm.model = None
        earlier = report.get("recovery")  # what the pruned finalist tried (distillation included) stays on record
        report["recovery"] = {"kept": "none", "tried": {}, **({"pruned_finalist": earlier} if earlier else {})}
        return pruned, plan
    tried, trial_s = {"none": chosen.kl_structure}, {}
    last = trial = None  # (name, model, plan) of the newest trial: its checkpoint is the one on disk
    # cheapest first: the newest trial's checkpoint is the one on disk, and the dearest (lstsq) is the
    # one that usually wins, so it is seldom built twice
    for name in sorted((r for r in recoveries if r != "kd"), key=lambda r: CLOSED_FORM.index(r) if r in CLOSED_FORM else len(CLOSED_FORM)):
        last = trial = None  # free the previous trial before building the next
        t = time.perf_counter()
        trial, plan, rep = build(name)
        trial_s[name] = time.perf_counter() - t
        tried[name] = search.kl_to_dense(dense_lp, trial, held)
        summary = (rep.get("recovery") or {}).get(name, {}).get("summary")
        log(f"recovery {name}: held-out KL {chosen.kl_structure:.4f} -> {tried[name]:.4f}" + (f" ({summary})" if summary else ""))
        last = (name, trial, plan)
    best = min(tried, key=tried.get)
    kd_note = None
    if "kd" in recoveries:
        # the kd trial re-runs the best closed form before distilling, and a rejected kd rebuilds it once more
        box = kd_box(2 * trial_s.get(best, 0.0)) if kd_box else {"mode": "default", "seconds": KD_DEFAULTS["kd_seconds"],
                                                              "why": "the default time box of kd"}
        if box["seconds"] is not None:
            import psutil

            mem = kd_memory_check(chosen.plan, base["vocab"], KD_DEFAULTS["kd_batch"] * calib.shape[1],
                                  psutil.virtual_memory().available)
            box = {**box, "memory": mem} if mem["ok"] else {**box, "seconds": None, "why": mem["why"], "memory": mem}
        kd_note = box["why"]
        if box["seconds"] is None:
            report["distillation"] = {"skipped": True, "time_box": box}
            log(box["why"])
        else:
            last = trial = None
            name = "kd" if best == "none" else f"{best}+kd"
            log(f"recovery {name}: distilling from the dense model for {box['seconds']:.0f} s ({box['why']})")
            trial, plan, rep = build(name, {"kd_seconds": box["seconds"]}, progress=progress)
            tried[name] = search.kl_to_dense(dense_lp, trial, held)
            kd = rep.get("recovery", {}).get("kd") or {}
            report["distillation"] = {**kd, "time_box": box}
            log(f"recovery {name}: {kd.get('steps', 0)} steps in {kd.get('seconds', 0.0):.0f} s, training loss "
                f"{kd.get('loss_first_steps', float('nan')):.4f} -> {kd.get('loss_last_steps', float('nan')):.4f}, "
                f"held-out KL {chosen.kl_structure:.4f} -> {tried[name]:.4f}" + ("" if kd.get("kept", True) else f" ({kd['note']})"))
            last = (name, trial, plan)
            best = min(tried, key=tried.get)
    report["recovery"] = {"kept": best, "tried": tried, "trial_seconds": trial_s, **({"distillation": kd_note} if kd_note else {})}
    if last is not None and last[0] == best:
        _, pruned, plan = last  # already saved under out/model
    else:
        last = trial = None  # free the rejected trial before pruning again
        pruned, plan, _ = build(best)
    log(f"kept recovery: {best}")
    return pruned, plan
