"""How edgeprune's time and memory grow with model size: calibration, prune, export and fit (issue #15).

Random-weight models with the real shapes of SmolLM2-360M, Qwen2.5-0.5B and Llama-3.2-1B (also
SmolLM2-135M, Llama-3.2-3B, and `smoke`, a tiny Llama), built offline from their transformers
configs by edgeprune.scale_models and cached under edgeprune's cache (`scale/NAME`). Costs depend
on shapes, not on weight values. Each stage runs as its own process, so its peak RSS is its own:

  build      the random model, if it is not cached yet (`--stage-child build`)
  calibrate  load + one calibration pass, `calibration_pass(lm, CALIB, 32, 128)` (`--stage-child calibrate`)
  prune      edgeprune prune MODEL --sparsity 0.3 --calib CALIB --out W/pruned --json   (default recovery: lstsq)
  export     edgeprune export W/pruned --format gguf --dtype q4_0 --out W/x.gguf --json (verified against torch)
  fit        edgeprune fit --profile raspberrypi5 --model MODEL --formats gguf + loose targets --out W/fit --json

CALIB is the bundled WikiText-2 validation excerpt by default (`--calib self`: self-generated text);
fit always calibrates on self-generated text, its own default. fit's targets are loosened
(`--min-tokens-per-s 0.5 --max-ttft-s 600 --max-memory 64GB`) so that a model of every size meets
them and fit does its whole job (search, the best pruned and the best dense finalist, export,
quality report, host benchmark) instead of exiting 3; an exit 3 is recorded, not fatal. fit keeps
its own recovery default (`--recover-time auto`: distillation gets what is left of its 10-minute
budget, so its wall time is partly a time box); `smoke` gets `--recover-time 20s` so that the smoke
run stays short. The time fit below uses fit's wall time less its distillation time (both recorded).

Each child gets a fresh EDGEPRUNE_CACHE (no self-generated text is reused across stages). Peak RSS
= max(the child's ru_maxrss from wait4: its largest single process, benchmark subprocesses
included; the sum of RSS over the child's process tree, sampled every 0.2 s). Per stage the growth
is fitted over the models that ran: time per parameter-token (wall / (parameters x calibration
tokens), and the least-squares line wall = a + b x params x tokens) and bytes per parameter (the
least-squares line peak RSS = c + k x params); RSS / fp32 model size should fall with size (the
fixed interpreter, torch and llama.cpp overhead is amortized), not rise. The issue's targets,
checked at Llama-3.2-1B's size (measured, or extrapolated from the fit when it did not run): fit
within 12 GB peak RSS and 30 min, prune within 8 GB. Prints a table and a README paragraph, writes
benchmarks/results/scale.json and scale.png (wall time and peak RSS against parameters, one line per
stage, the targets drawn).

    python benchmarks/scale.py --models smoke                          # everything end to end, ~3 min
    python benchmarks/scale.py                                          # 360M, 0.5B, 1B: hours on 2 cores
    python benchmarks/scale.py --models llama-3.2-3b --stages prune,export --out b.json
    python benchmarks/scale.py --merge benchmarks/results/scale.json b.json --out benchmarks/results/scale.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STAGES = ("calibrate", "prune", "export", "fit")
DEFAULT_MODELS = "smollm2-360m,qwen2.5-0.5b,llama-3.2-1b"
FIT_TARGETS = ["--min-tokens-per-s", "0.5", "--max-ttft-s", "600", "--max-memory", "64GB"]
SMOKE_FIT_ARGS = ["--recover-time", "20s"]
GB = 1e9
# The targets: (stage, model whose size they are checked at, peak RSS bytes, wall seconds or None)
TARGETS = [("fit", "llama-3.2-1b", 12 * GB, 30 * 60), ("prune", "llama-3.2-1b", 8 * GB, None)]


def excerpt_path() -> Path:
    """edgeprune's bundled WikiText-2 validation excerpt, found without importing edgeprune."""
    spec = importlib.util.find_spec("edgeprune")
    root = Path(list(spec.submodule_search_locations)[0]) if spec and spec.submodule_search_locations else HERE.parent / "edgeprune"
    return root / "data" / "wikitext2_valid_excerpt.txt"


# ------------------------------------------------------------------------------------ children
def stage_child(argv: list[str]) -> int:
    """The stages without a CLI verb, run in a child process; the last stdout line is one JSON record."""
    ap = argparse.ArgumentParser(prog="scale.py --stage-child")
    ap.add_argument("kind", choices=("build", "calibrate"))
    ap.add_argument("target", help="build: a scale model name; calibrate: a model directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib", default="self")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--gram", action="store_true")
    a = ap.parse_args(argv)
    if a.kind == "build":
        from edgeprune import scale_models

        path = scale_models.cached_path(a.target, a.seed)
        before = scale_models.build_info(path)
        t = time.perf_counter()
        path = scale_models.cached_model(a.target, a.seed, progress=lambda m: print(m, file=sys.stderr, flush=True))
        info = scale_models.build_info(path)
        built = before is None or before.get("build_s") != info.get("build_s")
        print(json.dumps({"path": str(path), "built": built, "seconds": time.perf_counter() - t, "params": info["params"],
                          "source": info["source"], "shards": info["shards"], "scales": info["scales"]}))
        return 0
    import psutil
    import torch

    from edgeprune.models import load_model
    from edgeprune.pipeline import calibration_pass

    t = time.perf_counter()
    lm = load_model(a.target)
    load_s = time.perf_counter() - t
    rss_loaded = psutil.Process().memory_info().rss
    ids, stats, timings = calibration_pass(lm, a.calib, a.nsamples, a.seqlen, a.seed, gram=a.gram)
    print(json.dumps({"load_s": load_s, **timings, "tokens": int(ids.numel()), "gram": a.gram, "calib": a.calib,
                      "rss_after_load_bytes": rss_loaded, "threads": torch.get_num_threads()}))
    return 0


def _tree_rss(pid: int) -> tuple[int, int]:
    """(RSS, anonymous RSS) of `pid` and its children. The difference is file-backed pages: the
    safetensors weights transformers memory-maps (clean page cache the kernel can drop and re-read),
    which RSS counts as soon as a forward pass has touched them."""
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p] + p.children(recursive=True)
    except psutil.Error:
        return 0, 0
    total = anon = 0
    for q in procs:
        try:
            m = q.memory_info()
            total += m.rss
            anon += m.rss - m.shared  # Linux: shared = RssFile + RssShmem
        except psutil.Error:
            pass
    return total, anon


def run_measured(cmd: list[str], env: dict, timeout_s: float, log_dir: Path, tag: str) -> dict:
    """Run `cmd` in its own process group; wall time, exit status, peak RSS (module docstring).
    On timeout the group gets SIGTERM (edgeprune removes its temporaries), then SIGKILL after 30 s."""
    out_path, err_path = log_dir / f"{tag}.stdout", log_dir / f"{tag}.stderr"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        import psutil

        # A child's ru_maxrss starts at the spawning process's own high-water mark (exec keeps the
        # forked or vforked address space's peak, not its current RSS): at or under that peak it
        # says nothing about the child, so only the sampled tree counts then.
        import resource

        spawner_rss = max(psutil.Process().memory_info().rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, start_new_session=True)
        peak, peak_anon, done, timed_out = [0], [0], threading.Event(), [False]

        def sample():
            while not done.wait(0.2):
                rss, anon = _tree_rss(proc.pid)
                peak[0], peak_anon[0] = max(peak[0], rss), max(peak_anon[0], anon)

        def watchdog():
            if done.wait(timeout_s):
                return
            timed_out[0] = True
            for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 0)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    return
                if done.wait(grace):
                    return

        threads = [threading.Thread(target=f, daemon=True) for f in (sample, watchdog)]
        for th in threads:
            th.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        finally:
            wall = time.perf_counter() - t0
            done.set()
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    code = proc.returncode
    ru = usage.ru_maxrss * 1024  # KiB on Linux
    peak_rss = max(ru, peak[0]) if ru > spawner_rss else peak[0]
    stdout = out_path.read_text(errors="replace")
    stderr_tail = [line for line in err_path.read_text(errors="replace").splitlines() if line.strip()][-3:]
    return {"wall_s": wall, "exit_code": code, "timed_out": timed_out[0], "signal": -code if code < 0 else None,
            "peak_rss_bytes": peak_rss, "ru_maxrss_bytes": ru, "tree_rss_peak_bytes": peak[0],
            "peak_anon_rss_bytes": peak_anon[0],
            "user_s": usage.ru_utime, "sys_s": usage.ru_stime, "report": _last_json(stdout),
            "stderr_tail": stderr_tail if code != 0 else [], "stdout_path": str(out_path), "stderr_path": str(err_path)}


def _last_json(text: str):
    """The JSON record a child printed: the whole stdout (edgeprune --json), else its last line."""
    text = text.strip()
    if not text:
        return None
    for candidate in (text, text.splitlines()[-1], text[text.find("{"):] if "{" in text else ""):
        try:
            return json.loads(candidate)
        except ValueError:
            continue
    return None


# ------------------------------------------------------------------------------------- stages
def _stage_timings(stage: str, report) -> dict:
    """The child's own timings, from its --json report."""
    if not isinstance(report, dict):
        return {}
    if stage == "calibrate":
        return {k: v for k, v in report.items() if k.endswith("_s")}
    if stage == "prune":
        return dict(report.get("timings") or {})
    if stage == "export":
        return {k: report.get(k) for k in ("seconds", "verify_seconds", "seconds_total") if report.get(k) is not None}
    if stage == "fit":
        t = dict(report.get("timings") or {})
        dist = report.get("distillation") or {}
        t["distillation_s"] = float(dist.get("seconds") or 0.0)
        return t
    return {}


def _stage_extras(stage: str, report) -> dict:
    if not isinstance(report, dict):
        return {}
    if stage == "prune":
        plan = report.get("plan") or {}
        return {"achieved": plan.get("achieved"), "recovery": (plan.get("method") or {}).get("recover")}
    if stage == "export":
        v = report.get("verification") or {}
        return {"bytes": report.get("bytes"), "arch": report.get("arch"), "top1_agreement": v.get("top1_agreement"),
                "mean_kl": v.get("mean_kl")}
    if stage == "fit":
        res = report.get("result") or {}
        dist = report.get("distillation") or {}
        return {"ok": res.get("ok"), "chosen": (res.get("chosen") or {}).get("label"),
                "distillation": {k: dist.get(k) for k in ("steps", "seconds", "kept", "note")} if dist else None,
                "distillation_box": (dist.get("time_box") or {}).get("why") if dist else None,
                "unreachable": res.get("unreachable")}
    return {}


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "edgeprune.cli", *map(str, args)]


def stage_command(stage: str, model_dir: str, name: str, work: Path, args) -> list[str]:
    if stage == "calibrate":
        cmd = [sys.executable, str(Path(__file__).resolve()), "--stage-child", "calibrate", model_dir, "--calib", args.calib,
               "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
        return cmd + (["--gram"] if args.gram else [])
    if stage == "prune":
        return cli("prune", model_dir, "--sparsity", args.sparsity, "--calib", args.calib, "--nsamples", args.nsamples,
                   "--seqlen", args.seqlen, "--out", work / "pruned", "--json")
    if stage == "export":
        return cli("export", work / "pruned", "--format", "gguf", "--dtype", args.export_dtype, "--out", work / f"x.{args.export_dtype}.gguf",
                   "--json")
    if stage == "fit":
        return cli("fit", "--profile", args.fit_profile, "--model", model_dir, "--formats", args.fit_formats,
                   "--nsamples", args.nsamples, "--seqlen", args.seqlen, *fit_args(name, args), "--out", work / "fit", "--json")
    raise ValueError(stage)


def fit_args(name: str, args) -> list[str]:
    extra = list(FIT_TARGETS) if args.fit_targets is None else args.fit_targets.split()
    if args.fit_recover_time:
        extra += ["--recover-time", args.fit_recover_time]
    elif name == "smoke":
        extra += SMOKE_FIT_ARGS
    return extra


def load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_model(name: str, stages: list[str], args, log_dir: Path) -> list[dict]:
    rows = []
    build = run_measured([sys.executable, str(Path(__file__).resolve()), "--stage-child", "build", name, "--seed", str(args.seed)],
                         dict(os.environ), args.timeout_s, log_dir, f"{name}.build")
    info = build["report"] or {}
    if build["exit_code"] != 0 or "path" not in info:
        print(f"{name}: build failed (exit {build['exit_code']}): {' | '.join(build['stderr_tail'])}", flush=True)
        return [{"model": name, "stage": "build", **_measure_fields(build)}]
    params = info["params"]
    base = {"model": name, "source": info["source"], "params": params["total"], "params_non_embedding": params["non_embedding"],
            "params_embedding": params["embedding"], "fp32_bytes": params["fp32_bytes"]}
    rows.append({**base, "stage": "build", "built": info["built"], "shards": info["shards"], "scales": info["scales"],
                 **_measure_fields(build), "rss_ratio": build["peak_rss_bytes"] / params["fp32_bytes"]})
    print(f"{name}: {params['total'] / 1e6:.1f}M parameters ({params['fp32_bytes'] / GB:.2f} GB fp32) at {info['path']} "
          f"({'built' if info['built'] else 'cached'}, {build['wall_s']:.0f} s)", flush=True)
    work = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=args.work))
    try:
        todo = list(stages)
        if "export" in todo and "prune" not in todo:
            todo.insert(todo.index("export"), "prune")  # export needs prune's checkpoint
        for stage in todo:
            env = dict(os.environ, EDGEPRUNE_CACHE=str(work / f"cache-{stage}"))
            cmd = stage_command(stage, info["path"], name, work, args)
            load = load_avg()
            r = run_measured(cmd, env, args.timeout_s, log_dir, f"{name}.{stage}")
            row = {**base, "stage": stage, "prerequisite": stage not in stages, "command": [Path(c).name if i == 0 else c for i, c in enumerate(cmd)],
                   "calib": "self" if stage == "fit" else args.calib, "tokens": args.nsamples * args.seqlen,
                   **_measure_fields(r), "rss_ratio": r["peak_rss_bytes"] / params["fp32_bytes"],
                   "timings": _stage_timings(stage, r["report"]), **_stage_extras(stage, r["report"]), "load_avg_before": load}
            if stage == "fit":
                row["fit_args"] = fit_args(name, args)
                row["wall_ex_distillation_s"] = r["wall_s"] - row["timings"].get("distillation_s", 0.0)
            rows.append(row)
            note = f" ({' | '.join(r['stderr_tail'])})" if r["exit_code"] else ""
            print(f"  {stage:9s} exit {r['exit_code']:3d}  {r['wall_s']:8.1f} s  peak RSS {r['peak_rss_bytes'] / GB:6.2f} GB  "
                  f"(anonymous {r.get('peak_anon_rss_bytes', 0) / GB:.2f} GB)  "
                  f"({row['rss_ratio']:.2f}x fp32){' TIMED OUT' if r['timed_out'] else ''}{note}", flush=True)
            if stage == "prune" and r["exit_code"] != 0 and "export" in todo:
                print("  export skipped: prune failed", flush=True)
                todo.remove("export")
    finally:
        if args.keep:
            print(f"  kept {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return rows


def _measure_fields(r: dict) -> dict:
    return {k: r[k] for k in ("wall_s", "exit_code", "timed_out", "signal", "peak_rss_bytes", "ru_maxrss_bytes", "tree_rss_peak_bytes", "peak_anon_rss_bytes",
                              "user_s", "sys_s", "stderr_tail")}


# ---------------------------------------------------------------------------------------- fits
def lstsq_line(xs, ys):
    """(intercept, slope) of the least-squares line; (None, y/x) with one point."""
    n = len(xs)
    if n == 0:
        return None, None
    if n == 1 or len(set(xs)) == 1:
        return None, sum(ys) / sum(xs) if sum(xs) else None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - slope * mx, slope


def trend(values) -> str:
    """'falling' / 'rising' / 'flat' / 'mixed' for values in order of model size."""
    if len(values) < 2:
        return "n/a"
    d = [b - a for a, b in zip(values, values[1:])]
    if all(x < 0 for x in d):
        return "falling"
    if all(x > 0 for x in d):
        return "rising"
    if all(abs(x) < 1e-9 for x in d):
        return "flat"
    return "mixed"


def stage_wall(row) -> float:
    return row.get("wall_ex_distillation_s", row["wall_s"]) if row["stage"] == "fit" else row["wall_s"]


def fitted_rows(rows: list[dict], stage: str) -> list[dict]:
    """The successful rows of `stage` the growth is fitted on, by size; `smoke` only when nothing else
    ran (its fixed overhead is hundreds of times its size and would dominate every line)."""
    ok = [r for r in rows if r["stage"] == stage and r.get("exit_code") == 0 and r.get("params")]
    real = [r for r in ok if r["model"] != "smoke"]
    return sorted(real or ok, key=lambda r: r["params"])


def fit_growth(rows: list[dict]) -> dict:
    fits = {}
    for stage in ("build",) + STAGES:
        ok = fitted_rows(rows, stage)
        if not ok:
            continue
        tokens = ok[0].get("tokens")
        pt = [r["params"] * (r.get("tokens") or 1) for r in ok]
        a, b = lstsq_line(pt, [stage_wall(r) for r in ok])
        c, k = lstsq_line([r["params"] for r in ok], [r["peak_rss_bytes"] for r in ok])
        ratios = [r["rss_ratio"] for r in ok]
        fits[stage] = {
            "models": [r["model"] for r in ok], "params": [r["params"] for r in ok], "tokens": tokens,
            "s_per_param_token": [stage_wall(r) / p for r, p in zip(ok, pt)],
            "time_line": {"intercept_s": a, "s_per_param_token": b}, "rss_line": {"intercept_bytes": c, "bytes_per_param": k},
            "rss_ratio": ratios, "rss_ratio_trend": trend(ratios),
            "wall_is": {"fit": "wall less distillation", "build": "wall (per parameter: no tokens)"}.get(stage, "wall"),
        }
    return fits


def predict(fit: dict, params: float, tokens: float) -> tuple[float | None, float | None]:
    t, m = fit["time_line"], fit["rss_line"]
    wall = (t["intercept_s"] or 0.0) + t["s_per_param_token"] * params * tokens if t["s_per_param_token"] is not None else None
    rss = (m["intercept_bytes"] or 0.0) + m["bytes_per_param"] * params if m["bytes_per_param"] is not None else None
    return wall, rss


def check_targets(rows: list[dict], fits: dict, nsamples: int, seqlen: int) -> list[dict]:
    out = []
    for stage, model, max_rss, max_wall in TARGETS:
        row = next((r for r in rows if r["model"] == model and r["stage"] == stage), None)
        entry = {"stage": stage, "model": model, "max_peak_rss_bytes": max_rss, "max_wall_s": max_wall}
        if row is not None:
            entry.update(kind="measured", exit_code=row["exit_code"], peak_rss_bytes=row["peak_rss_bytes"], wall_s=row["wall_s"])
        elif stage in fits and len(fits[stage]["models"]) >= 2:
            params = _model_params(model)
            wall, rss = predict(fits[stage], params, nsamples * seqlen)
            entry.update(kind=f"extrapolated from {', '.join(fits[stage]['models'])}", peak_rss_bytes=rss, wall_s=wall, params=params)
        else:
            entry.update(kind="not measured")
            out.append(entry)
            continue
        rss_ok = entry["peak_rss_bytes"] is not None and entry["peak_rss_bytes"] <= max_rss
        wall_ok = max_wall is None or (entry["wall_s"] is not None and entry["wall_s"] <= max_wall)
        entry["ok"] = bool(rss_ok and wall_ok and entry.get("exit_code", 0) == 0)
        out.append(entry)
    return out


_SHAPE_PARAMS: dict = {}


def shape_params() -> dict:
    """{name: parameter count} of every edgeprune.scale_models shape, asked of a child process so that
    this one never imports torch (its memory is the machine's too while the stages run)."""
    if not _SHAPE_PARAMS:
        code = ("import json; from edgeprune import scale_models as s; "
                "print(json.dumps({n: s.param_counts(s.make_config(n))['total'] for n in s.names()}))")
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        _SHAPE_PARAMS.update(json.loads(res.stdout.strip().splitlines()[-1]))
    return _SHAPE_PARAMS


def _model_params(name: str) -> int:
    return shape_params()[name]


def git_state() -> dict:
    def git(*a):
        r = subprocess.run(["git", "-C", str(HERE.parent), *a], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "modified": status.splitlines() if status else []}


# ------------------------------------------------------------------------------------- output
def fmt_s(s) -> str:
    if s is None:
        return "-"
    return f"{s:.1f} s" if s < 600 else f"{s / 60:.1f} min"


def table(record: dict) -> str:
    lines = ["| model | params | stage | exit | wall | peak RSS | anonymous | RSS / fp32 | own timings |", "|---|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        t = r.get("timings") or {}
        own = ", ".join(f"{k.removesuffix('_s')} {v:.1f}" for k, v in t.items() if isinstance(v, (int, float)) and k != "total_s")
        extra = " (prerequisite)" if r.get("prerequisite") else ""
        wall = fmt_s(r["wall_s"]) + (f" ({fmt_s(r['wall_ex_distillation_s'])} w/o kd)" if r.get("wall_ex_distillation_s") is not None
                                     and r.get("timings", {}).get("distillation_s") else "")
        code = f"{r['exit_code']}{' timeout' if r.get('timed_out') else ''}"
        lines.append(f"| {r['model']} | {(r.get('params') or 0) / 1e6:.1f}M | {r['stage']}{extra} | {code} | {wall} "
                     f"| {r['peak_rss_bytes'] / GB:.2f} GB | {(r.get('peak_anon_rss_bytes') or 0) / GB:.2f} GB "
                     f"| {r.get('rss_ratio', float('nan')):.2f} | {own[:130]} |")
    return "\n".join(lines)


def fits_table(record: dict) -> str:
    lines = ["| stage | models | s per param-token (each) | line: intercept + s/param-token | bytes/param (line) | RSS intercept "
             "| RSS / fp32 (each) | trend |", "|---|---|---|---|---|---|---|---|"]
    for stage, f in record["fits"].items():
        each = " / ".join(f"{x:.2e}" for x in f["s_per_param_token"])
        tl, rl = f["time_line"], f["rss_line"]
        line = (f"{fmt_s(tl['intercept_s'])} + {tl['s_per_param_token']:.2e}" if tl["intercept_s"] is not None
                else f"{tl['s_per_param_token']:.2e} (1 point)")
        inter = f"{rl['intercept_bytes'] / GB:.2f} GB" if rl["intercept_bytes"] is not None else "-"
        lines.append(f"| {stage} | {', '.join(f['models'])} | {each} | {line} | {rl['bytes_per_param']:.2f} | {inter} | "
                     f"{' / '.join(f'{x:.2f}' for x in f['rss_ratio'])} | {f['rss_ratio_trend']} |")
    return "\n".join(lines)


def targets_lines(record: dict) -> str:
    out = []
    for t in record["targets"]:
        lim = f"<= {t['max_peak_rss_bytes'] / GB:.0f} GB" + (f", <= {t['max_wall_s'] / 60:.0f} min" if t["max_wall_s"] else "")
        if t["kind"] == "not measured":
            out.append(f"{t['stage']} at {t['model']} ({lim}): not measured (needs >= 2 sizes to extrapolate)")
            continue
        got = f"{t['peak_rss_bytes'] / GB:.2f} GB" + (f", {fmt_s(t['wall_s'])}" if t["max_wall_s"] else "")
        out.append(f"{t['stage']} at {t['model']} ({lim}): {got}, {t['kind']}: {'met' if t['ok'] else 'MISSED'}")
    return "\n".join(out)


def readme_paragraph(record: dict) -> str:
    parts = []
    for stage, f in record["fits"].items():
        if stage == "build":
            continue
        tl, rl = f["time_line"], f["rss_line"]
        parts.append(f"{stage} {tl['s_per_param_token'] * 1e9:.3g} s per 10^9 parameter-tokens, "
                     f"{rl['bytes_per_param']:.2f} bytes per parameter"
                     + (f" + {rl['intercept_bytes'] / GB:.2f} GB" if rl["intercept_bytes"] is not None else "")
                     + f" (RSS / fp32 size {' → '.join(f'{x:.2f}' for x in f['rss_ratio'])}, {f['rss_ratio_trend']})")
    models = sorted({r["model"] for r in record["rows"]}, key=lambda m: max(r.get("params") or 0 for r in record["rows"] if r["model"] == m))
    return (f"* `scale.py` — random-weight models with real shapes ({', '.join(models)}), each stage its own process: "
            f"least-squares growth, {record['tokens']} calibration tokens: " + "; ".join(parts) + ". Targets: "
            + "; ".join(targets_lines(record).splitlines()) + ".")


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=110)
    colors = {"build": "grey", "calibrate": "tab:blue", "prune": "tab:orange", "export": "tab:green", "fit": "tab:red"}
    names = {}
    for stage in ("build",) + STAGES:
        ok = sorted((r for r in record["rows"] if r["stage"] == stage and r["exit_code"] == 0 and r.get("params")), key=lambda r: r["params"])
        if not ok:
            continue
        xs = [r["params"] for r in ok]
        for r in ok:
            names[r["params"]] = r["model"]
        ax_t.plot(xs, [stage_wall(r) for r in ok], marker="o", color=colors[stage], label=stage + (" (w/o distillation)" if stage == "fit" else ""))
        ax_m.plot(xs, [r["peak_rss_bytes"] / GB for r in ok], marker="o", color=colors[stage], label=stage)
        f = record["fits"].get(stage)
        if f and f["rss_line"]["intercept_bytes"] is not None:
            grid = [min(xs), max(xs)]
            ax_m.plot(grid, [(f["rss_line"]["intercept_bytes"] + f["rss_line"]["bytes_per_param"] * x) / GB for x in grid],
                      color=colors[stage], ls=":", lw=0.8)
    failed = [r for r in record["rows"] if r["exit_code"] != 0 and r.get("params")]
    for r in failed:
        ax_m.scatter([r["params"]], [r["peak_rss_bytes"] / GB], marker="x", color=colors.get(r["stage"], "black"), zorder=5)
    if names:
        xs = sorted(names)
        ax_m.plot(xs, [4 * x / GB for x in xs], color="black", lw=0.8, ls="--", label="fp32 model size")
    ax_m.axhline(12, color="tab:red", ls="-.", lw=0.8, label="target: fit <= 12 GB")
    ax_m.axhline(8, color="tab:orange", ls="-.", lw=0.8, label="target: prune <= 8 GB")
    ax_t.axhline(30 * 60, color="tab:red", ls="-.", lw=0.8, label="target: fit <= 30 min")
    for ax, ylabel in ((ax_t, "wall time (s)"), (ax_m, "peak RSS (GB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel(ylabel)
        for x, n in names.items():
            ax.annotate(n, (x, ax.get_ylim()[0]), fontsize=6, rotation=90, va="bottom", ha="right", color="dimgrey")
        ax.legend(fontsize=6)
    ax_t.set_title(f"edgeprune stages on random models with real shapes ({record['tokens']} calibration tokens)", fontsize=8)
    ax_m.set_title(f"{record['host'].get('cpu', '')[:50]}, {record['host'].get('cores')} cores", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def host() -> dict:
    import psutil

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_bytes": psutil.virtual_memory().total, "python": platform.python_version(),
            "platform": platform.platform()}


def finish(record: dict, out: Path) -> None:
    record["fits"] = fit_growth(record["rows"])
    record["targets"] = check_targets(record["rows"], record["fits"], record["nsamples"], record["seqlen"])
    record["readme"] = readme_paragraph(record)
    out.write_text(json.dumps(record, indent=1) + "\n")
    plot(record, out.with_suffix(".png"))
    print()
    print(table(record))
    print()
    print(fits_table(record))
    print()
    print(targets_lines(record))
    print()
    print("README:")
    print(record["readme"])
    print(f"\nwrote {out} and {out.with_suffix('.png')}")


def merge(paths, out: Path) -> int:
    """One record from several runs: rows of a later file replace the same (model, stage) of an earlier one."""
    records = [json.loads(Path(p).read_text()) for p in paths]
    record = dict(records[-1])
    rows = {}
    for rec in records:
        for r in rec["rows"]:
            rows[(r["model"], r["stage"])] = r
    record["rows"] = sorted(rows.values(), key=lambda r: (r.get("params") or 0, (("build",) + STAGES).index(r["stage"])))
    record["runs"] = [{"path": str(p), "started": rec.get("started"), "seconds": rec.get("seconds"),
                       "models": sorted({r["model"] for r in rec["rows"]})} for p, rec in zip(paths, records)]
    finish(record, out)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--stage-child"]:
        return stage_child(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated edgeprune.scale_models names (smoke, smollm2-135m, "
                    "smollm2-360m, qwen2.5-0.5b, llama-3.2-1b, llama-3.2-3b)")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--calib", default=None, help="calibration source of calibrate and prune: the bundled excerpt (default) or 'self'")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--gram", action="store_true", help="calibrate: also collect the Gram matrices (prune's lstsq recovery does)")
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--export-dtype", default="q4_0")
    ap.add_argument("--fit-profile", default="raspberrypi5")
    ap.add_argument("--fit-targets", default=None, help=f"fit's target flags (default: '{' '.join(FIT_TARGETS)}'; '' for the profile's own)")
    ap.add_argument("--fit-recover-time", default=None, help="fit --recover-time for every model (default: fit's own, auto; smoke: 20s)")
    ap.add_argument("--onnx", action="store_true", help="fit also exports, verifies and benchmarks ONNX (--formats gguf,onnx)")
    ap.add_argument("--seed", type=int, default=0, help="weights of the random models")
    ap.add_argument("--timeout-s", type=float, default=5400, help="per stage; the process group is killed and the timeout recorded")
    ap.add_argument("--work", default=None, help="directory for the stages' outputs (default: the system's temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the stages' outputs (pruned checkpoint, GGUF, fit directory)")
    ap.add_argument("--out", default=str(HERE / "results" / "scale.json"))
    ap.add_argument("--merge", nargs="+", help="combine these JSON records into --out (refit, plot, print)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge:
        return merge(args.merge, out)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        ap.error(f"unknown stage(s) {', '.join(bad)}: choose from {', '.join(STAGES)}")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in shape_params()]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}: choose from {', '.join(shape_params())}")
    args.calib = args.calib or str(excerpt_path())
    args.fit_formats = "gguf,onnx" if args.onnx else "gguf"
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
    started = time.time()
    log_dir = Path(tempfile.mkdtemp(prefix="edgeprune-scale-logs-", dir=args.work))
    record = {"benchmark": "scale", "started": time.strftime("%Y-%m-%d %H:%M:%S"), "host": host(), "git": git_state(),
              "models": models, "stages": stages,
              "calib": "bundled WikiText-2 excerpt" if args.calib == str(excerpt_path()) else args.calib, "nsamples": args.nsamples,
              "seqlen": args.seqlen, "tokens": args.nsamples * args.seqlen, "sparsity": args.sparsity, "export_dtype": args.export_dtype,
              "fit_profile": args.fit_profile, "fit_formats": args.fit_formats, "timeout_s": args.timeout_s,
              "peak_rss": "max(child's ru_maxrss via wait4, sum of RSS over the child's process tree sampled every 0.2 s)",
              "logs": str(log_dir), "rows": []}
    print(f"logs in {log_dir}", flush=True)
    for name in models:
        record["rows"] += run_model(name, stages, args, log_dir)
        record["seconds"] = time.time() - started
        out.write_text(json.dumps(record, indent=1) + "\n")  # partial results survive an interrupted run
    finish(record, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
