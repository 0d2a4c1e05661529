"""`edgeprune`: verbs like git's. Results go to stdout (or JSON with --json), progress to stderr."""

from __future__ import annotations

import functools
import os
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from edgeprune import ui
from edgeprune.errors import EdgepruneError

app = typer.Typer(
    name="edgeprune",
    help="Prune small LLMs structurally until they fit an edge device; export GGUF (llama.cpp) and ONNX (onnxruntime).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
profiles_app = typer.Typer(help="List and show device profiles.", no_args_is_help=True)
app.add_typer(profiles_app, name="profiles")

MODEL_HELP = "smollm2-135m (embedded default), a .gguf file, a model directory, or a Hugging Face id"
DeviceOpt = typer.Option("auto", "--device", help="torch device: auto (CUDA or MPS when torch finds one, else cpu), cpu, cuda, cuda:N, mps")
DtypeOpt = typer.Option("float32", "--dtype", help="torch compute dtype (float32 is fastest on CPUs without bf16)")
ThreadsOpt = typer.Option(None, "--threads", help="torch threads for calibration, scoring and recovery (default: torch's own, the physical cores)")
JsonOpt = typer.Option(False, "--json", help="print a JSON record instead of a table")
ForceOpt = typer.Option(False, "--force", help="replace an earlier edgeprune output at --out (never anything edgeprune did not write)")


def _torch_threads(threads: Optional[int]) -> None:
    """--threads for torch's intra-op pool (one pool for the whole run; llama.cpp gets its own count)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _load(spec: Optional[str], device: str, dtype: str):
    from edgeprune.models import load_model

    t = time.perf_counter()
    lm = load_model(spec, device=device, dtype=dtype, progress=ui.info)
    ui.info(f"loaded {lm.spec} ({sum(p.numel() for p in lm.model.parameters()) / 1e6:.1f}M parameters) in {time.perf_counter() - t:.1f}s")
    return lm


# ----------------------------------------------------------------------------------- validation
# Every user-supplied value is checked here, before a model is loaded or anything is measured:
# a bad value is exit 2 with one line, never a failure minutes later.
_DURATION_UNITS = {"": 1.0, "s": 1.0, "sec": 1.0, "secs": 1.0, "second": 1.0, "seconds": 1.0, "m": 60.0, "min": 60.0,
                   "mins": 60.0, "minute": 60.0, "minutes": 60.0, "h": 3600.0, "hour": 3600.0, "hours": 3600.0}


def _recover_seconds(text: Optional[str]) -> Optional[float]:
    """--recover-time '5m' / '5min' / '90s' / '300' -> seconds (None: the default). A plain number
    is seconds; m means minutes here (a training time box is never milliseconds)."""
    import math
    import re

    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    unit = _DURATION_UNITS.get(m.group(2)) if m else None
    seconds = float(m.group(1)) * unit if unit else None
    if seconds is None or not (math.isfinite(seconds) and seconds > 0):
        raise EdgepruneError(f"--recover-time takes a positive duration like 5m, 5min, 90s or 300 (seconds), got '{text}'")
    return seconds


def _int_at_least(flag: str, value: Optional[int], minimum: int) -> None:
    if value is not None and value < minimum:
        raise EdgepruneError(f"{flag} must be at least {minimum}, got {value}")


def _positive_finite(flag: str, value: Optional[float]) -> None:
    import math

    if value is not None and not (math.isfinite(value) and value > 0):
        raise EdgepruneError(f"{flag} must be a positive finite number, got {value}")


def _check_model(spec: Optional[str], device: str = "cpu", dtype: str = "float32", flag: str = "model") -> dict:
    """Device, compute dtype and the model argument; returns what its metadata says about its shape."""
    from edgeprune.models import check_device, check_model_spec, peek_geometry, torch_dtype_of

    check_device(device)
    torch_dtype_of(dtype)
    check_model_spec(spec, flag)
    return peek_geometry(spec)


def _check_offload(offload: bool, device: str, method: dict, allocation: Optional[str]) -> Optional[str]:
    """prune --offload: the accelerator each block runs on (None without --offload), or one line saying
    why not. Only block-by-block work streams: training and the sensitivity allocation run the whole model."""
    from edgeprune.models import check_device

    if not offload:
        return None
    dev = check_device(device)
    if dev == "cpu":
        raise EdgepruneError(f"--offload runs each block on an accelerator, one at a time, but --device {device} is the CPU here: "
                             "pass --device cuda (or mps), or leave --offload out")
    steps = [s for s in str(method.get("recover") or "none").split("+") if s != "none"]
    trained = [s for s in steps if s in ("lora", "kd")]
    if trained:
        raise EdgepruneError(f"--offload streams blocks for the calibration pass and closed-form recovery (bias, lstsq, mask); "
                             f"--recover {'+'.join(steps)} trains the whole model at once: leave --offload out or recover with lstsq")
    if (allocation or method.get("allocation")) == "sensitivity":
        raise EdgepruneError("--offload streams blocks one at a time; --allocation sensitivity measures the whole model: use cfsp or uniform")
    return dev


def _warn_context(geometry: dict, seqlen: int) -> None:
    ctx = geometry.get("context")
    if isinstance(ctx, int) and seqlen > ctx:
        ui.warn(f"--seqlen {seqlen} is beyond the model's context of {ctx} tokens: positions past it were never trained")


def _check_text(path: Path, flag: str = "--text") -> None:
    if path.is_dir():
        raise EdgepruneError(f"{flag} {path} is a directory: pass a UTF-8 text file")
    if not path.is_file():
        raise EdgepruneError(f"{flag} {path}: no such file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise EdgepruneError(f"{flag} {path}: {exc.strerror}") from None
    if b"\x00" in data:
        raise EdgepruneError(f"{flag} {path} is a binary file (it contains NUL bytes): pass UTF-8 text")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EdgepruneError(f"{flag} {path} is not UTF-8 text (invalid byte at offset {exc.start})") from None


def _check_artifact(path: Path, flag: str = "artifact") -> None:
    if path.is_file():
        if path.suffix != ".gguf":
            raise EdgepruneError(f"{flag} {path} is not a .gguf file or an ONNX export directory")
        return
    if path.is_dir():
        if not (path / "model.onnx").is_file():
            raise EdgepruneError(f"{flag} {path} is a directory without model.onnx: pass an edgeprune ONNX export")
        return
    raise EdgepruneError(f"{flag} {path}: no such file or directory")


def _check_bench_counts(threads: Optional[int], repeats: int, prompt_tokens: int = 1, gen_tokens: int = 1) -> None:
    _int_at_least("--threads", threads, 1)
    _int_at_least("--repeats", repeats, 1)
    _int_at_least("--prompt-tokens", prompt_tokens, 1)
    _int_at_least("--gen-tokens", gen_tokens, 1)


def _check_memory(value: str) -> None:
    """fit --max-memory: a size with its unit; a bare number or a size below 1 MB is refused,
    never read as bytes or rounded to nothing."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z]*)\s*", value)
    if m is None:
        raise EdgepruneError(f"--max-memory {value!r} is not a size: write e.g. 300MB or 1.5GiB")
    if not m.group(2):
        raise EdgepruneError(f"--max-memory {value} needs a unit: write e.g. {m.group(1)}MB or {m.group(1)}GiB")
    from edgeprune.profiles import parse_bytes

    try:
        n = parse_bytes(value)
    except Exception as exc:  # the profile parser's own error says what is wrong with the unit
        raise EdgepruneError(f"--max-memory: {exc} (e.g. 300MB, 1.5GiB)") from None
    if n < 1_000_000:
        raise EdgepruneError(f"--max-memory {value} is {n} bytes, too small for any model: write e.g. 300MB")


def _file_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ---------------------------------------------------------------------------------------- eval
@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help=MODEL_HELP),
    text: Path = typer.Option(..., "--text", help="UTF-8 text file, e.g. WikiText-2 raw test"),
    seqlen: int = typer.Option(512, "--seqlen", help="window length in tokens"),
    max_windows: Optional[int] = typer.Option(None, "--max-windows", help="score only the first N windows"),
    reference: Optional[str] = typer.Option(None, "--reference", help="also report top-1 agreement and KL against this model"),
    batch_size: int = typer.Option(4, "--batch-size"),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    json_out: bool = JsonOpt,
):
    """Perplexity over non-overlapping windows, tokens/s, and agreement with a reference model."""
    import psutil

    from edgeprune.evaluate import compare_logits, load_text, perplexity, token_windows, torch_logits_fn

    _check_text(text)
    _int_at_least("--seqlen", seqlen, 2)
    _int_at_least("--max-windows", max_windows, 1)
    _int_at_least("--batch-size", batch_size, 1)
    geometry = _check_model(model, device, dtype)
    if reference:
        _check_model(reference, device, dtype, flag="--reference")
    _warn_context(geometry, seqlen)
    raw = load_text(text)
    rss0 = psutil.Process().memory_info().rss
    lm = _load(model, device, dtype)
    load_rss = psutil.Process().memory_info().rss
    windows = token_windows(lm.tokenizer, raw, seqlen, max_windows)
    ui.info(f"{len(windows)} windows x {seqlen} tokens from {text}")
    with ui.progress(quiet=json_out) as bar:
        result = perplexity(lm.model, windows, batch_size, progress=lambda i, n: bar("perplexity", i, n))
    result.update({"model": lm.spec, "text": str(text), "load_rss_mib": load_rss / 2**20, "rss_before_load_mib": rss0 / 2**20})
    if reference:
        ref = _load(reference, device, dtype)
        result["reference"] = {"model": reference, **compare_logits(torch_logits_fn(ref.model), torch_logits_fn(lm.model), windows)}
    if json_out:
        ui.print_json(result)
        return
    ui.out.print(f"perplexity {result['perplexity']:.3f}  ({result['scored_tokens']} tokens, {result['tokens_per_s']:.0f} tokens/s, {result['seconds']:.1f}s)")
    ui.out.print(f"protocol: {result['protocol']}")
    if reference:
        r = result["reference"]
        ui.out.print(f"vs {reference}: top-1 agreement {r['top1_agreement']:.4f}, mean KL {r['mean_kl']:.5f}")


# --------------------------------------------------------------------------------------- prune
class Method(str, Enum):
    cfsp = "cfsp"
    uniform = "uniform"
    flap = "flap"
    fasp = "fasp"
    comp = "comp"


@app.command()
def prune(
    model: str = typer.Argument(..., help=MODEL_HELP),
    out: Path = typer.Option(..., "--out", help="directory for the pruned checkpoint, plan.json, report.json, widths.png"),
    sparsity: float = typer.Option(0.3, "--sparsity", help="fraction of FFN parameters to remove (of linear-layer parameters with --target linear, the default of flap)"),
    method: Method = typer.Option(Method.cfsp, "--method", help="cfsp: importance-driven per-layer widths; uniform: the same width everywhere; "
                                  "flap: fluctuation metric, one global ranking of FFN channels and KV groups; fasp: Wanda-style metric + "
                                  "least-squares restoration; comp: drop layers + condition metric + mask tuning"),
    score: Optional[str] = typer.Option(None, "--score", help="channel score: cfsp, activation, wanda-sp, magnitude, random, flap, condition (default: the method's own)"),
    allocation: Optional[str] = typer.Option(None, "--allocation", help="per-layer widths: cfsp (block importance; cfsp's default), uniform (fasp/comp default), or sensitivity (measured output KL per block, solved as a budgeted choice; cfsp, fasp, comp)"),
    heads: Optional[bool] = typer.Option(None, "--heads/--no-heads", help="also prune KV groups (a KV head with its query heads); flap does by default"),
    recover: Optional[str] = typer.Option(None, "--recover", help="none, bias (FLAP), lstsq (FASP), mask (COMP), lora (CFSP IG-LoRA), or X+lora / X+kd; default: lstsq for cfsp and uniform, the method's own otherwise"),
    lora_steps: Optional[int] = typer.Option(None, "--lora-steps", help="LoRA training steps (default 200)"),
    lora_rank: Optional[int] = typer.Option(None, "--lora-rank", help="mean LoRA rank; per block proportional to its importance (default 8)"),
    recover_time: Optional[str] = typer.Option(None, "--recover-time", help="time box of --recover kd (distillation from the dense model), e.g. 5m, 5min, 90s or 300 (seconds; default 180s)"),
    lstsq_select: Optional[str] = typer.Option(None, "--lstsq-select", help="lstsq: which FFN channels fill each block's width: plan (default: the --score ranking) or obs (re-chosen block by block by sequential OBS, ZipLM/SlimGPT)"),
    lstsq_tune: Optional[int] = typer.Option(None, "--lstsq-tune", help="lstsq: then tune each refit block's FFN for this many epochs towards the dense block output, kept where held-out rows improve (0: off)"),
    drop_layers: Optional[int] = typer.Option(None, "--drop-layers", help="remove the K least important blocks first (COMP / ShortGPT Block Influence; default 0, comp: layers/15)"),
    target: Optional[str] = typer.Option(None, "--target", help="what --sparsity is a fraction of: ffn (default) or linear (default of flap)"),
    align: int = typer.Option(32, "--align", help="widths are multiples of this (32: Q4_0/Q8_0, 256: K-quants)"),
    temperature: float = typer.Option(20.0, "--temperature", help="CFSP allocation sharpness tau"),
    min_keep: float = typer.Option(0.05, "--min-keep", help="no block keeps less than this fraction of its channels"),
    calib: str = typer.Option("self", "--calib", help="'self' (text sampled from the model), a .txt/.jsonl file, or dataset:NAME[:CONFIG][@SPLIT]"),
    nsamples: int = typer.Option(32, "--nsamples", help="calibration sequences"),
    seqlen: int = typer.Option(128, "--seqlen", help="calibration sequence length"),
    seed: int = typer.Option(0, "--seed"),
    plan_file: Optional[Path] = typer.Option(None, "--plan", help="re-apply this plan.json exactly instead of computing one (its recovery re-runs)"),
    shapes: str = typer.Option("auto", "--shapes", help="per-layer, uniform (one FFN width and head count in every layer), or auto: "
                               "per-layer where the model's GGUF architecture can hold it (Llama, Mistral, Qwen2), else uniform (Qwen3, Gemma 3)"),
    threads: Optional[int] = ThreadsOpt,
    device: str = DeviceOpt,
    offload: bool = typer.Option(False, "--offload", help="keep the model on the CPU (memory-mapped) and run the calibration pass and "
                                 "lstsq block by block on --device (cuda, mps), one block there at a time: for models larger than "
                                 "the accelerator's memory"),
    dtype: str = DtypeOpt,
    force: bool = ForceOpt,
    json_out: bool = JsonOpt,
):
    """Calibrate once, choose what to keep (per-layer FFN widths, KV groups, layers), prune, recover, and write a reloadable checkpoint."""
    from edgeprune.prune import check_shapes, needs_gram, resolve_options
    from edgeprune.pipeline import calibration_pass, prune_and_save
    from edgeprune.plan import PrunePlan
    from edgeprune.prune import validate_sparsity
    from edgeprune.report import run_header

    from edgeprune import outputs
    from edgeprune.apply import check_plan, model_geometry

    plan = PrunePlan.load(plan_file) if plan_file else None
    recover_args = {"lora_steps": lora_steps, "lora_rank": lora_rank, "kd_seconds": _recover_seconds(recover_time),
                    "lstsq_select": lstsq_select, "lstsq_tune": lstsq_tune}
    if plan is None:
        validate_sparsity(sparsity)
        opts = resolve_options(method.value, score, target, allocation, heads, recover, recover_args)
    check_shapes(shapes, method.value)
    _positive_finite("--temperature", temperature)
    if not 0.0 <= min_keep <= 1.0:
        raise EdgepruneError(f"--min-keep is a fraction of each block's channels, in [0, 1]; got {min_keep}")
    for flag, value, minimum in (("--align", align, 1), ("--nsamples", nsamples, 1), ("--seqlen", seqlen, 2), ("--threads", threads, 1),
                                 ("--lora-steps", lora_steps, 1), ("--lora-rank", lora_rank, 1), ("--drop-layers", drop_layers, 0)):
        _int_at_least(flag, value, minimum)
    if calib != "self" and not calib.startswith("dataset:") and not Path(calib).expanduser().is_file():
        raise EdgepruneError(f"--calib {calib}: no such file (pass 'self', a .txt/.jsonl file or dataset:NAME)")
    geometry = _check_model(model, device, dtype)
    block_device = _check_offload(offload, device, plan.method if plan is not None else opts, allocation)
    n_layers, ffn = geometry.get("num_layers"), geometry.get("ffn")
    if drop_layers and isinstance(n_layers, int) and drop_layers >= n_layers:
        raise EdgepruneError(f"--drop-layers must be between 0 and {n_layers - 1} (the model has {n_layers} layers), got {drop_layers}")
    if plan is None and isinstance(ffn, int) and ffn % align:
        raise EdgepruneError(f"--align {align} must divide the model's FFN width {ffn} (e.g. 32 for Q4_0/Q8_0, 256 for K-quants)")
    if plan is not None:  # the cheap checks against the model, before it is loaded
        from edgeprune.models import source_fingerprint

        fingerprint = source_fingerprint(model) if isinstance(plan.base, dict) else None
        if fingerprint and fingerprint != plan.base.get("fingerprint"):
            plan.check_base({**plan.base, "id": model, "fingerprint": fingerprint})
        check_plan(plan)
    _warn_context(geometry, seqlen)
    outputs.check_out(out, force, "dir", inputs=(model, plan_file))
    args = dict(model=model, out=out, sparsity=sparsity, method=method.value, score=score, allocation=allocation, heads=heads,
                recover=recover, lora_steps=lora_steps, lora_rank=lora_rank, drop_layers=drop_layers, target=target, align=align,
                temperature=temperature, min_keep=min_keep, calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed, plan=plan_file,
                shapes=shapes)
    _torch_threads(threads)
    report = run_header("prune", args)
    t0 = time.perf_counter()
    lm = _load(model, "cpu" if block_device else device, dtype)
    report["timings"] = {"load_s": time.perf_counter() - t0}
    if block_device:
        report["offload"] = {"block_device": block_device, "model_device": "cpu"}
    if plan is not None:  # against the loaded model, before any calibration or recovery
        from edgeprune.pipeline import base_of

        plan.check_base(base_of(lm))
        check_plan(plan, model_geometry(lm.model))
    elif drop_layers and drop_layers >= lm.model.config.num_hidden_layers:
        n_layers = lm.model.config.num_hidden_layers
        raise EdgepruneError(f"--drop-layers must be between 0 and {n_layers - 1} (the model has {n_layers} layers), got {drop_layers}")
    stats = ids = None
    with ui.progress(quiet=json_out) as bar:
        if plan is None:
            ids, stats, timings = calibration_pass(lm, calib, nsamples, seqlen, seed, progress=bar, block_device=block_device,
                                                   gram=needs_gram(method.value, opts["score"], opts["recover"]))
            report["timings"].update(timings)
            report["block_importance"] = {"angular": stats.angular, "block_influence": stats.block_influence}
        pruned, plan, report = prune_and_save(
            lm, stats, out, plan=plan, report=report, ids=ids, progress=bar, sparsity=sparsity, method=method.value, target=target,
            allocation=allocation, score=score, heads=heads, drop_layers=drop_layers, align=align, temperature=temperature,
            min_keep=min_keep, seed=seed, recover=recover, recover_args=recover_args, shapes=shapes, inplace=True,
            block_device=block_device)
    if json_out:
        ui.print_json(report)
        return
    ach, m = plan.achieved, plan.method
    ui.out.print(f"wrote {out}/ (checkpoint, plan.json, report.json, widths.png)")
    ui.out.print(f"FFN sparsity {ach['ffn_sparsity']:.1%}, linear {ach['linear_sparsity']:.1%}, whole model {ach['model_sparsity']:.1%} "
                 f"({ach['params_pruned'] / 1e6:.1f}M of {ach['params_dense'] / 1e6:.1f}M parameters; embedding {ach['params_embedding'] / 1e6:.1f}M is never pruned)")
    written = report.get("layer_shapes") or []  # what the checkpoint holds, not what a --plan file claims
    ui.out.print(f"widths: {' '.join(str(s['ffn']) for s in written)}" + (f"; dropped layers {plan.dropped_layers}" if plan.dropped_layers else ""))
    if m.get("heads"):
        ui.out.print(f"KV groups kept: {' '.join(str(s['n_kv_heads']) for s in written)}")
    if m.get("method"):
        line = (f"method {m['method']} (score {m.get('score')}, allocation {m.get('allocation')}, {m.get('shapes', 'per-layer')} shapes), "
                f"recovery {m.get('recover', 'none')}")
        lstsq = (report.get("recovery") or {}).get("lstsq") or {}
        if lstsq.get("summary"):
            line += f"; {lstsq['summary']}"
        lora = (report.get("recovery") or {}).get("lora")
        if lora:
            line += (f"; LoRA {lora['steps']} steps in {lora['seconds']:.0f}s, calibration loss "
                     f"{lora['calibration_loss_before']:.3f} -> {lora['calibration_loss_after']:.3f}")
        ui.out.print(line)


# -------------------------------------------------------------------------------------- export
@app.command()
def export(
    model: str = typer.Argument(..., help="a pruned checkpoint directory (or any model edgeprune loads)"),
    fmt: str = typer.Option(..., "--format", help="gguf (llama.cpp) or onnx (onnxruntime)"),
    dtype: str = typer.Option("f32", "--dtype", help="gguf: f32 f16 q8_0 q6_k q5_k_m q5_1 q5_0 q4_k_m q4_1 q4_0 iq4_nl q3_k_m (made by llama.cpp's quantizer); onnx: fp32 int8 int4"),
    out: Path = typer.Option(..., "--out", help="output .gguf file or ONNX directory (written only after verification)"),
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", help="gguf: an importance matrix (llama.cpp imatrix GGUF, e.g. fit's out/imatrix.gguf); 'calibrate' collects one from self-generated text"),
    output_type: Optional[str] = typer.Option(None, "--output-type", help="gguf: storage of the output projection (tied embedding), e.g. q5_0; default llama.cpp's rule"),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="compare with the torch model before writing (default on)"),
    force: bool = ForceOpt,
    json_out: bool = JsonOpt,
):
    """Export to GGUF (llama.cpp) or ONNX (onnxruntime), verified against the torch model."""
    from edgeprune import dtypes, outputs
    from edgeprune.artifacts import export_artifact

    if fmt not in dtypes.FORMATS:
        raise EdgepruneError(f"--format must be gguf or onnx, got {fmt}")
    dtype = dtypes.normalize(dtype, fmt)
    if (imatrix is not None or output_type is not None) and not (fmt == "gguf" and dtypes.get(dtype, fmt).quantized):
        raise EdgepruneError("--imatrix and --output-type apply to quantized GGUF dtypes (q8_0 ... q3_k_m)")
    if output_type is not None:
        from edgeprune.mix import storage_name

        output_type = storage_name(output_type)
    if imatrix is not None and str(imatrix) != "calibrate" and not imatrix.is_file():
        raise EdgepruneError(f"--imatrix {imatrix}: no such file (a llama.cpp imatrix GGUF, or 'calibrate')")
    _check_model(model)
    outputs.check_out(out, force, "file" if fmt == "gguf" else "dir", inputs=(model,))
    lm = _load(model, "cpu", "float32")
    t = time.perf_counter()
    imat = None
    if imatrix is not None:
        from edgeprune.imatrix import collect_imatrix, read_imatrix_gguf

        if str(imatrix) == "calibrate":
            from edgeprune.data import calibration_ids

            ids, _, _ = calibration_ids(lm.model, lm.tokenizer, "self", 32, 128, 0, fingerprint=lm.fingerprint)
            imat = collect_imatrix(lm.model, ids)
        else:
            imat = read_imatrix_gguf(imatrix).imatrix
    result = export_artifact(lm.model, lm.tokenizer, fmt, dtype, out, verify=verify, imatrix=imat, head=output_type)
    result.setdefault("seconds_total", time.perf_counter() - t)
    if json_out:
        ui.print_json(result)
        return
    v = result.get("verification") or {}
    ui.out.print(f"wrote {out} ({fmt} {dtype}, {_file_size(out) / 1e6:.1f} MB) in {result['seconds_total']:.1f}s")
    if v:
        ui.out.print("verified against torch: " + ", ".join(f"{k} {v[k]:.4g}" for k in ("top1_agreement", "mean_kl", "max_abs_logit_diff") if isinstance(v.get(k), (int, float))))


# --------------------------------------------------------------------------------------- bench
def _bench_line(result: dict) -> str:
    from edgeprune.bench import median

    return (f"decode {median(result, 'decode_tok_s'):.1f} tok/s (spread {result['decode_tok_s'].get('spread', 0):.0%}), "
            f"prefill {median(result, 'prefill_tok_s'):.1f} tok/s, TTFT {median(result, 'ttft_s') * 1000:.0f} ms, "
            f"peak RSS {result.get('peak_rss_mb', float('nan')):.0f} MiB")


@app.command()
def bench(
    artifact: Path = typer.Argument(..., help="a .gguf file or an ONNX export directory"),
    threads: Optional[int] = typer.Option(None, "--threads", help="default: physical cores"),
    prompt_tokens: int = typer.Option(128, "--prompt-tokens"),
    gen_tokens: int = typer.Option(64, "--gen-tokens"),
    repeats: int = typer.Option(3, "--repeats", help="median and spread over this many runs"),
    json_out: bool = JsonOpt,
):
    """Prefill/decode tokens/s, time to first token and peak RSS, in llama.cpp (GGUF) or onnxruntime (ONNX)."""
    from edgeprune.bench import bench_artifact

    _check_artifact(artifact)
    _check_bench_counts(threads, repeats, prompt_tokens, gen_tokens)
    result = bench_artifact(artifact, threads, prompt_tokens, gen_tokens, repeats)
    if json_out:
        ui.print_json(result)
        return
    ui.out.print(f"{artifact} [{result['format']}, {result.get('threads')} threads, {prompt_tokens}-token prompt, {gen_tokens} new tokens, median of {repeats}]")
    ui.out.print(_bench_line(result))


# --------------------------------------------------------------------------------------- check
@app.command()
def check(
    artifact: Path = typer.Argument(..., help="a .gguf file or an ONNX export directory"),
    profile: str = typer.Option("ci-cpu", "--profile", help="profile whose decode target is the default gate"),
    max_ms_per_token: Optional[float] = typer.Option(None, "--max-ms-per-token", help="fail if decode is slower than this"),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="a dense artifact benchmarked in the same job"),
    min_speedup: Optional[float] = typer.Option(None, "--min-speedup", help="fail if decode speed-up vs --baseline is below this"),
    threads: Optional[int] = typer.Option(None, "--threads"),
    repeats: int = typer.Option(3, "--repeats"),
    json_out: bool = JsonOpt,
):
    """CI latency gate: exit 0 when it holds, 1 when it does not, 2 on bad input."""
    from edgeprune.bench import bench_artifact, median
    from edgeprune.profiles import load_profile

    prof = load_profile(profile)
    if min_speedup is not None and baseline is None:
        raise EdgepruneError("--min-speedup needs --baseline DENSE_ARTIFACT (ratios are measured in the same job)")
    for name, value in (("--max-ms-per-token", max_ms_per_token), ("--min-speedup", min_speedup)):
        _positive_finite(name, value)
    _check_artifact(artifact)
    if baseline is not None:
        _check_artifact(baseline, "--baseline")
    _check_bench_counts(threads, repeats)
    if max_ms_per_token is None and min_speedup is None and prof.targets.decode_tok_s_min:
        max_ms_per_token = 1000.0 / prof.targets.decode_tok_s_min
    result = bench_artifact(artifact, threads, repeats=repeats)
    ms = 1000.0 / median(result, "decode_tok_s")
    gates = []
    if max_ms_per_token is not None:
        gates.append({"gate": "max_ms_per_token", "value": ms, "limit": max_ms_per_token, "ok": ms <= max_ms_per_token})
    record = {"artifact": str(artifact), "profile": prof.name, "bench": result, "gates": gates}
    if baseline is not None:
        base = bench_artifact(baseline, threads, repeats=repeats)
        speedup = median(result, "decode_tok_s") / median(base, "decode_tok_s")
        record["baseline"] = base
        record["decode_speedup"] = speedup
        if min_speedup is not None:
            gates.append({"gate": "min_speedup", "value": speedup, "limit": min_speedup, "ok": speedup >= min_speedup})
    record["ok"] = all(g["ok"] for g in gates)
    if json_out:
        ui.print_json(record)
    else:
        ui.out.print(_bench_line(result))
        for g in gates:
            ui.out.print(f"{'PASS' if g['ok'] else 'FAIL'} {g['gate']}: {g['value']:.3f} (limit {g['limit']:.3f})")
        if not gates:
            ui.out.print("no gate given (--max-ms-per-token, --baseline with --min-speedup, or a profile decode target): measured only")
    if not record["ok"]:
        raise typer.Exit(1)


# ----------------------------------------------------------------------------------------- fit
@app.command()
def fit(
    profile: str = typer.Option(..., "--profile", help="a shipped profile name (edgeprune profiles list) or a .toml path"),
    model: str = typer.Option("smollm2-135m", "--model", help=MODEL_HELP),
    out: Path = typer.Option(Path("out/fit"), "--out", help="output directory"),
    min_tokens_per_s: Optional[float] = typer.Option(None, "--min-tokens-per-s", help="override the profile's decode target"),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="override the memory target, e.g. 300MB"),
    max_ttft_s: Optional[float] = typer.Option(None, "--max-ttft-s", help="override the time-to-first-token target"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="export dtype (default: search the profile's allowed dtypes)"),
    formats: str = typer.Option("gguf,onnx", "--formats", help="artifacts to export, verify and benchmark"),
    nsamples: int = typer.Option(32, "--nsamples"),
    seqlen: int = typer.Option(128, "--seqlen"),
    seed: int = typer.Option(0, "--seed"),
    threads: Optional[int] = typer.Option(None, "--threads", help="threads for torch (calibration, search, recovery) and the host benchmark (default: torch's own; the benchmark uses the host profile's threads, which its prediction assumes)"),
    host_profile: str = typer.Option("ci-cpu", "--host-profile", help="profile whose constants predict this host's figures"),
    recover: str = typer.Option("lstsq,bias,kd", "--recover", help="recoveries to try on the chosen model (held-out KL keeps the best, or none): lstsq, bias, mask, lora, none; kd distills from the dense model on top of the best"),
    recover_time: str = typer.Option("auto", "--recover-time", help="time box of kd: auto (what is left of fit's 10-minute budget after the reserve for export, verification and the quality report; skipped under 30 s) or a duration like 3min, 90s, 300"),
    max_quality_loss: Optional[str] = typer.Option(None, "--max-quality-loss", help="quality floor on the shipped artifact: a perplexity ratio to the dense model (1.15x) or a held-out KL (kl:0.3); exit 3 when nothing meets it"),
    heads: bool = typer.Option(False, "--heads/--no-heads", help="also search structures that remove KV groups (a KV head with its query heads) together with FFN channels under the same parameter budget (off by default: see the README's measurement)"),
    force: bool = ForceOpt,
    json_out: bool = JsonOpt,
):
    """Search sparsity, dropped layers and dtype for the best model that meets a device profile's targets."""
    from edgeprune import dtypes, outputs
    from edgeprune.fit import check_recover_time, parse_quality_floor, run_fit
    from edgeprune.profiles import load_profile

    parse_quality_floor(max_quality_loss)
    load_profile(profile)
    load_profile(host_profile)
    _int_at_least("--nsamples", nsamples, 1)
    _int_at_least("--seqlen", seqlen, 2)
    _int_at_least("--threads", threads, 1)
    _torch_threads(threads)
    _positive_finite("--min-tokens-per-s", min_tokens_per_s)
    _positive_finite("--max-ttft-s", max_ttft_s)
    if max_memory is not None:
        _check_memory(max_memory)
    if dtype is not None:
        dtypes.normalize(dtype)
    names = [f.strip() for f in formats.split(",") if f.strip()]
    if not names or any(f not in dtypes.FORMATS for f in names) or len(set(names)) != len(names):
        raise EdgepruneError(f"--formats takes gguf and/or onnx, comma-separated and each once, got '{formats}'")
    fit_recoveries = ("none", "lstsq", "bias", "mask", "lora", "kd")
    steps = [r.strip() for r in recover.split(",")]
    if not all(steps) or any(r not in fit_recoveries for r in steps):
        raise EdgepruneError(f"--recover takes a comma-separated list of {', '.join(fit_recoveries)}, got '{recover}'")
    auto = recover_time.strip().lower() == "auto"
    recover_seconds = check_recover_time([r for r in steps if r != "none"], None if auto else _recover_seconds(recover_time))
    geometry = _check_model(model)
    _warn_context(geometry, seqlen)
    outputs.check_out(out, force, "dir", inputs=(model,))
    outputs.claim_dir(out, "fit")
    with ui.progress(quiet=json_out) as bar:
        report, code = run_fit(model, profile, out, min_tokens_per_s, max_memory, max_ttft_s, dtype,
                               tuple(f.strip() for f in formats.split(",") if f.strip()), nsamples, seqlen, seed=seed,
                               threads=threads, host_profile=host_profile, recover=recover, progress=bar, log=ui.info,
                               max_quality_loss=max_quality_loss, recover_seconds=recover_seconds, heads=heads)
    if json_out:
        ui.print_json(report)
        return
    res = report["result"]
    checks = "; ".join(f"{c['name']} {c['value']:.3g} ({'ok' if c['ok'] else 'missed'})" for c in res["chosen"]["targets"]["checks"])
    ui.out.print(f"chosen: {res['chosen']['label']} (quality KL {res['chosen']['quality_kl']:.4f}); predicted on {report['profile']['name']}: {checks}")
    for f, art in res["artifacts"].items():
        line = f"{f}: {art['path']} -> " + _bench_line(art["bench"])
        if "measured_decode_speedup" in art:
            line += f"; x{art['measured_decode_speedup']:.2f} decode vs dense"
        if "host_prediction" in art:
            hp = art["host_prediction"]
            line += f" (profile {hp['profile']} predicts {hp['decode_tok_s']:.1f} tok/s, TTFT {1000 * hp['ttft_s']:.0f} ms)"
        ui.out.print(line)
    ui.out.print(f"report: {out}/report.md, {out}/report.json, {out}/frontier.png, {out}/model/widths.png ({report['timings']['total_s']:.0f}s)")


# ------------------------------------------------------------------------- measure-host / profiles
@app.command("measure-host")
def measure_host_cmd(
    backend: str = typer.Option("llama.cpp", "--backend", help="llama.cpp or onnxruntime"),
    out: Path = typer.Option(Path("host.toml"), "--out", help="profile file to write"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="weight dtype to measure (default: q8_0 / int8)"),
    threads: Optional[int] = typer.Option(None, "--threads"),
    quick: bool = typer.Option(False, "--quick", help="fewer and smaller synthetic shapes"),
    timing: str = typer.Option("wall", "--timing", help="wall, or cpu (with --threads 1: stable on a busy/shared machine)"),
    rounds: int = typer.Option(2, "--rounds", help="round-robin timing passes over the shapes"),
    record: Optional[Path] = typer.Option(None, "--record", help="also write every measurement as JSON here"),
):
    """Fit this host's latency constants from synthetic random-weight models and write a profile."""
    from edgeprune.hostperf import measure_host

    if timing not in ("wall", "cpu"):
        raise EdgepruneError(f"--timing must be wall or cpu, got {timing}")
    _int_at_least("--rounds", rounds, 1)
    _int_at_least("--threads", threads, 1)
    with ui.progress() as bar:
        profile = measure_host(backend=backend, dtype=dtype, threads=threads, out=out, quick=quick, timing=timing,
                               rounds=rounds, record=record, progress=bar)
    ui.out.print(f"wrote {out}: bandwidth {profile.latency.bandwidth_gbps:.2f} GB/s, layer overhead "
                 f"{profile.latency.layer_overhead_ms:.3f} ms, token overhead {profile.latency.token_overhead_ms:.3f} ms")


# `calibrate` is the activation-statistics pass of pruning; the old name of measure-host stays for scripts.
@app.command("calibrate", help="Deprecated name of measure-host (same options).")
@functools.wraps(measure_host_cmd)
def calibrate_alias(*args, **kwargs):
    print("`edgeprune calibrate` is deprecated: use `edgeprune measure-host`", file=sys.stderr)
    return measure_host_cmd(*args, **kwargs)


@profiles_app.command("list")
def profiles_list(json_out: bool = JsonOpt):
    """List the shipped device profiles."""
    from edgeprune.profiles import list_profiles, load_profile

    names = list_profiles()
    if json_out:
        ui.print_json(names)
        return
    for name in names:
        p = load_profile(name)
        t = p.targets
        ui.out.print(f"{name:20s} {p.hardware.description[:60]:60s} decode>={t.decode_tok_s_min} tok/s  {p.export.format} {','.join(p.export.dtypes)}")


@profiles_app.command("show")
def profiles_show(name: str = typer.Argument(..., help="profile name or path to a .toml"), json_out: bool = JsonOpt):
    """Show one profile (name or path to a .toml)."""
    from edgeprune.profiles import describe_profile, load_profile, profile_to_dict

    p = load_profile(name)
    if json_out:
        ui.print_json(profile_to_dict(p))
        return
    ui.out.print(describe_profile(p))


def _usage_line(exc) -> str:
    """A click usage error (bad type, missing or unknown option) as one line."""
    ctx = getattr(exc, "ctx", None)
    hint = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
    return f"{exc.format_message()}{hint}"


def _kind(exc: BaseException) -> str:
    """typer ships its own click (typer._click), and plain click may be installed too: classify its
    exceptions by class name rather than by one module's classes."""
    names = {c.__name__ for c in type(exc).__mro__}
    for kind in ("Exit", "Abort", "ClickException"):
        if kind in names:
            return kind
    return ""


def run(argv: list[str] | None = None) -> int:
    """The CLI with the exit-code contract of edgeprune.errors; returns the code."""
    from edgeprune import outputs

    outputs.install_signal_handlers()
    code = 0
    try:
        rc = app(args=argv, standalone_mode=False)  # typer.Exit(n) comes back as n in this mode
        code = rc if isinstance(rc, int) else 0
    except EdgepruneError as exc:
        outputs.cleanup()
        ui.error(exc)
        code = exc.exit_code
    except (outputs.Interrupted, KeyboardInterrupt) as exc:
        code = _interrupted(exc)
    except Exception as exc:
        signalled = outputs.interrupted_by()  # e.g. an ImportError from a signal during an import
        code = _interrupted(signalled) if signalled else _failure(exc)
    finally:
        outputs.cleanup(failed=False)
    return code


def _interrupted(exc: BaseException) -> int:
    from edgeprune import outputs

    outputs.cleanup()
    name = f"{exc}" if isinstance(exc, outputs.Interrupted) else "SIGINT"
    ui.err.print(f"[red]interrupted[/red] ({name}): stopped; no partial or temporary files were left")
    return exc.exit_code if isinstance(exc, outputs.Interrupted) else 130


def _failure(exc: Exception) -> int:
    from edgeprune import outputs
    from edgeprune.errors import EXIT_BAD_INPUT, EXIT_BUG

    kind = _kind(exc)
    if kind == "Exit":
        return exc.exit_code
    outputs.cleanup()
    if kind == "Abort":  # click's answer to EOF at a prompt
        ui.error("aborted", "interrupted")
        return 130
    if kind == "ClickException":
        ui.error(_usage_line(exc))
        return EXIT_BAD_INPUT
    if os.environ.get("EDGEPRUNE_DEBUG"):
        raise exc
    if isinstance(exc, OSError):  # the disk, permissions, a path that vanished: the user's to fix, not a bug
        where = f": {exc.filename}" if exc.filename else ""
        ui.error(f"{exc.strerror or type(exc).__name__}{where}")
        return EXIT_BAD_INPUT
    ui.error(f"{type(exc).__name__}: {ui.one_line(exc, 160)} -- a bug in edgeprune; please report it with this command "
             "line (EDGEPRUNE_DEBUG=1 shows the traceback)", "internal error")
    return EXIT_BUG


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # library chatter must not precede our one line
    from edgeprune import outputs

    code = run()
    if outputs.interrupted_by():
        # Cleanup is done and the line is printed. An extension interrupted mid-call (a torch or
        # tokenizers thread) can abort the interpreter's finalisation, turning 130/143 into a
        # SIGABRT: leave without finalising.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
