"""`edgeprune`: verbs like git's. Results go to stdout (or JSON with --json), progress to stderr."""

from __future__ import annotations

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
DeviceOpt = typer.Option("cpu", "--device", help="torch device (cpu, cuda, mps)")
DtypeOpt = typer.Option("float32", "--dtype", help="torch compute dtype (float32 is fastest on CPUs without bf16)")
JsonOpt = typer.Option(False, "--json", help="print a JSON record instead of a table")


def _load(spec: Optional[str], device: str, dtype: str):
    from edgeprune.models import load_model

    t = time.perf_counter()
    lm = load_model(spec, device=device, dtype=dtype, progress=ui.info)
    ui.info(f"loaded {lm.spec} ({sum(p.numel() for p in lm.model.parameters()) / 1e6:.1f}M parameters) in {time.perf_counter() - t:.1f}s")
    return lm


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


@app.command()
def prune(
    model: str = typer.Argument(..., help=MODEL_HELP),
    out: Path = typer.Option(..., "--out", help="directory for the pruned checkpoint, plan.json, report.json, widths.png"),
    sparsity: float = typer.Option(0.3, "--sparsity", help="fraction of FFN parameters to remove (of linear-layer parameters with --target linear)"),
    method: Method = typer.Option(Method.cfsp, "--method", help="cfsp: importance-driven per-layer widths; uniform: the same width everywhere"),
    score: str = typer.Option("cfsp", "--score", help="channel score: cfsp, activation, wanda-sp, magnitude, random, flap"),
    drop_layers: int = typer.Option(0, "--drop-layers", help="remove the K least important blocks first (COMP / ShortGPT Block Influence)"),
    target: str = typer.Option("ffn", "--target", help="what --sparsity is a fraction of: ffn or linear"),
    align: int = typer.Option(32, "--align", help="widths are multiples of this (32: Q4_0/Q8_0, 256: K-quants)"),
    temperature: float = typer.Option(20.0, "--temperature", help="CFSP allocation sharpness tau"),
    min_keep: float = typer.Option(0.05, "--min-keep", help="no block keeps less than this fraction of its channels"),
    calib: str = typer.Option("self", "--calib", help="'self' (text sampled from the model), a .txt/.jsonl file, or dataset:NAME[:CONFIG][@SPLIT]"),
    nsamples: int = typer.Option(32, "--nsamples", help="calibration sequences"),
    seqlen: int = typer.Option(128, "--seqlen", help="calibration sequence length"),
    seed: int = typer.Option(0, "--seed"),
    plan_file: Optional[Path] = typer.Option(None, "--plan", help="re-apply this plan.json exactly instead of computing one"),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    json_out: bool = JsonOpt,
):
    """Calibrate once, allocate per-layer FFN widths, prune, and write a reloadable checkpoint."""
    from edgeprune.pipeline import calibration_pass, prune_and_save
    from edgeprune.plan import PrunePlan
    from edgeprune.prune import validate_sparsity
    from edgeprune.report import run_header

    plan = PrunePlan.load(plan_file) if plan_file else None
    if plan is None:
        validate_sparsity(sparsity)
    args = dict(model=model, out=out, sparsity=sparsity, method=method.value, score=score, drop_layers=drop_layers,
                target=target, align=align, temperature=temperature, min_keep=min_keep, calib=calib,
                nsamples=nsamples, seqlen=seqlen, seed=seed, plan=plan_file)
    report = run_header("prune", args)
    t0 = time.perf_counter()
    lm = _load(model, device, dtype)
    report["timings"] = {"load_s": time.perf_counter() - t0}
    stats = None
    with ui.progress(quiet=json_out) as bar:
        if plan is None:
            _, stats, timings = calibration_pass(lm, calib, nsamples, seqlen, seed, progress=bar)
            report["timings"].update(timings)
            report["block_importance"] = {"angular": stats.angular, "block_influence": stats.block_influence}
        pruned, plan, report = prune_and_save(
            lm, stats, out, plan=plan, report=report, sparsity=sparsity, target=target, allocation=method.value,
            score=score, drop_layers=drop_layers, align=align, temperature=temperature, min_keep=min_keep, seed=seed)
    if json_out:
        ui.print_json(report)
        return
    ach = plan.achieved
    ui.out.print(f"wrote {out}/ (checkpoint, plan.json, report.json, widths.png)")
    ui.out.print(f"FFN sparsity {ach['ffn_sparsity']:.1%}, linear {ach['linear_sparsity']:.1%}, whole model {ach['model_sparsity']:.1%} "
                 f"({ach['params_pruned'] / 1e6:.1f}M of {ach['params_dense'] / 1e6:.1f}M parameters; embedding {ach['params_embedding'] / 1e6:.1f}M is never pruned)")
    ui.out.print(f"widths: {' '.join(str(w) for w in ach['ffn_widths'])}" + (f"; dropped layers {plan.dropped_layers}" if plan.dropped_layers else ""))


# ------------------------------------------------------------------------------ not landed yet
def _not_landed(verb: str) -> None:
    raise EdgepruneError(f"'edgeprune {verb}' has not landed in this version yet", exit_code=2)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def fit():
    """Search sparsity, dropped layers and dtype for the best model that meets a device profile's targets."""
    _not_landed("fit")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def export():
    """Export a pruned checkpoint to GGUF (llama.cpp) or ONNX (onnxruntime), verified against torch."""
    _not_landed("export")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench():
    """Measure prefill/decode tokens/s, time to first token and peak RSS of an exported artifact."""
    _not_landed("bench")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def check():
    """CI latency gate: exit 0 when an artifact meets the gate, 1 when not, 2 on bad input."""
    _not_landed("check")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def calibrate():
    """Fit this host's latency constants from synthetic models and write a profile."""
    _not_landed("calibrate")


@profiles_app.command("list")
def profiles_list():
    """List the shipped device profiles."""
    _not_landed("profiles list")


@profiles_app.command("show")
def profiles_show(name: str):
    """Show one profile (name or path to a .toml)."""
    _not_landed("profiles show")


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app(standalone_mode=False)
    except EdgepruneError as exc:
        ui.err.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        ui.err.print("[red]interrupted[/red]: no partial outputs were left under final names")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:
        # Usage errors (typer ships its own click): they know how to show themselves.
        if hasattr(exc, "show") and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            sys.exit(exc.exit_code)
        if type(exc).__name__ == "Abort":
            sys.exit(130)
        if os.environ.get("EDGEPRUNE_DEBUG"):
            raise
        ui.err.print(f"[red]internal error:[/red] {type(exc).__name__}: {exc} (set EDGEPRUNE_DEBUG=1 for the traceback)", soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
