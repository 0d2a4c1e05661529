"""Host calibration: fit the latency model's constants by benchmarking synthetic models here.

Latency does not depend on weight values, so calibration builds random Llama models of several
shapes (edgeprune.testing.tiny_llama, embedding widened to a realistic vocabulary), exports them
with edgeprune's own exporters (GGUF for llama.cpp, ONNX for onnxruntime), benchmarks each, and
fits the constants of `edgeprune.latency` by least squares:

    decode:   1 / decode_tok_s  = bytes_read / bw_eff + n_layers * t_layer + t_token
    prefill:  ttft (P tokens)   = FLOPs / compute_eff + n_layers * t_layer_prefill + t_prefill

(non-negative least squares on relative residuals, so small and large models weigh the same).
`validate_model` then benchmarks held-out SmolLM2-like geometries (dense, FFN-pruned, non-uniform,
layer-dropped, KV-group-pruned) and reports predicted-vs-measured % errors.

Measuring on a shared machine: every shape is exported first, then all are timed round-robin
(`rounds` passes), and the figures are the lower quartile of the pooled samples (per decode step,
per prefill), so slow drifts of other jobs' load hit every shape alike and contention (which only
ever adds time) is filtered. `timing="cpu"` with `threads=1` times the CPU time of the calling
thread (llama.cpp and onnxruntime both compute on it with one thread): on the 2-core development
VM this is what made the fit reproducible; two llama.cpp threads next to other jobs ran 4x slower.
Calibration and held-out shapes can be measured in the same session (`run_calibration(heldout=)`).

Caveat for x86 hosts: models smaller than the last-level cache run faster than the bandwidth
term predicts; calibration and validation shapes are kept above ~45 MB (this host's L3 is 32 MB).
"""

from __future__ import annotations

import datetime as _dt
import gc
import itertools
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from edgeprune.errors import EdgepruneError
from edgeprune.latency import (BACKEND_FORMAT, BACKENDS, LatencyConstants, ModelGeometry, byte_counts,
                               decode_features, normalize_dtype, predict, prefill_flops)

Progress = Callable[..., None] | None  # progress(message) or progress(label, done, total)


class _Reporter:
    """Adapts a progress callback: `f(message)` gets text lines, `f(label, done, total)` (the CLI's
    progress bars, one bar per label) gets counts. Free-text notes go to stderr in the latter case."""

    def __init__(self, progress: Progress):
        if isinstance(progress, _Reporter):
            progress = progress.fn
        self.fn = progress
        self.counts = False
        if progress is not None:
            import inspect

            try:
                params = [p for p in inspect.signature(progress).parameters.values()
                          if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
                self.counts = len(params) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params)
            except (TypeError, ValueError):
                self.counts = False

    def __call__(self, message: str) -> None:  # a note
        if self.fn is None:
            return
        if self.counts:
            if message.startswith("warning"):
                import sys

                print(message, file=sys.stderr)
            return
        self.fn(message)

    def step(self, label: str, done: int, total: int, detail: str = "") -> None:
        if self.fn is None:
            return
        if self.counts:
            self.fn(label, done, total)
        elif detail:
            self.fn(f"[{done + 1}/{total}] {detail}" if done < total else f"{label}: done")


DEFAULT_DTYPE = {"llama.cpp": "q8_0", "onnxruntime": "int8"}


# --------------------------------------------------------------------------------------------
# Shapes


@dataclass(frozen=True)
class SynthShape:
    """A synthetic model: uniform dims, optionally narrowed per layer (`ffn_list`, `heads_list`)."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    ffn_list: tuple[int, ...] = ()  # per-layer FFN widths (non-uniform -> GGUF `deci`)
    kv_list: tuple[int, ...] = ()  # per-layer KV heads (query heads scale with them)
    head_dim: int = 64

    def layer_shapes(self):
        from edgeprune.arch import LayerShape

        group = self.heads // self.kv_heads
        out = []
        for i in range(self.layers):
            kv = self.kv_list[i] if self.kv_list else self.kv_heads
            ffn = self.ffn_list[i] if self.ffn_list else self.ffn
            out.append(LayerShape(n_heads=kv * group, n_kv_heads=kv, ffn=ffn))
        return out

    def geometry(self) -> ModelGeometry:
        return ModelGeometry.from_shapes(self.layer_shapes(), self.hidden, self.vocab, self.head_dim, tied=True,
                                         name=self.name)


def calibration_shapes(quick: bool = False) -> list[SynthShape]:
    """Shapes that separate bytes, layer count and FLOPs; all at least 2x this host's 32 MB L3 at 8 bits."""
    shapes = [
        SynthShape("cal-d512-L10-big-vocab", 512, 10, 8, 2, 1536, 49152),
        SynthShape("cal-d384-L32-many-layers", 384, 32, 6, 2, 1024, 32000),
        SynthShape("cal-d768-L10", 768, 10, 12, 4, 2048, 32000),
        SynthShape("cal-d640-L20-small-vocab", 640, 20, 10, 2, 1792, 8192),
        SynthShape("cal-d448-L16", 448, 16, 7, 1, 1280, 49152),
        SynthShape("cal-d1024-L4", 1024, 4, 16, 4, 2816, 32000),
    ]
    if not quick:
        shapes += [
            SynthShape("cal-d896-L8", 896, 8, 14, 2, 2432, 16384),
            SynthShape("cal-d256-L48-thin", 256, 48, 4, 2, 1024, 49152),
        ]
    return shapes


def heldout_shapes(quick: bool = False) -> list[SynthShape]:
    """SmolLM2-135M-like geometries (d 576, 9/3 heads of 64, FFN 1536, vocab 49152) at reduced depth.

    Dense, uniformly FFN-pruned, non-uniform FFN (GGUF `deci`), layer-dropped, KV-group-pruned and
    mixed: the kinds of candidates `edgeprune fit` scores. None of them is a calibration shape.
    """
    d, h, kv, f, v = 576, 9, 3, 1536, 49152
    nonuni = (1536, 1408, 1280, 1152, 1024, 896, 768, 896, 1024, 1152, 1280, 1408, 1536, 1536)
    shapes = [
        SynthShape("smol-like-dense-L14", d, 14, h, kv, f, v),
        SynthShape("smol-like-ffn40-L14", d, 14, h, kv, 928, v),
        SynthShape("smol-like-ffn-nonuniform-L14", d, 14, h, kv, f, v, ffn_list=nonuni),
        SynthShape("smol-like-dropped-L12", d, 12, h, kv, f, v),
        SynthShape("smol-like-kv-pruned-L14", d, 14, h, kv, f, v, kv_list=(3, 3, 2, 2, 1, 1, 2, 2, 1, 1, 2, 3, 3, 3)),
        SynthShape("smol-like-mixed-L13", d, 13, h, kv, f, v,
                   ffn_list=(1536, 1280, 1024, 768, 768, 1024, 1280, 1536, 1024, 768, 1024, 1280, 1536),
                   kv_list=(3, 2, 2, 3, 1, 3, 2, 2, 3, 1, 2, 3, 3)),
        SynthShape("smol-like-dense-L20", d, 20, h, kv, f, v),
    ]
    if not quick:
        shapes += [
            SynthShape("smol-like-ffn25-L24", d, 24, h, kv, 1152, v),
            SynthShape("smollm2-135m-geometry", d, 30, h, kv, f, v),
        ]
    return shapes


def build_model(shape: SynthShape, seed: int = 0):
    """A random LlamaForCausalLM of `shape` and a tokenizer (small real BPE; extra rows are padding tokens).

    The GGUF exporter writes embedding rows beyond the tokenizer as unused padding tokens, so the
    tiny tokenizer serves any vocabulary size and the lm_head costs what a real vocabulary costs.
    """
    import torch

    from edgeprune.arch import head_dim, keep_layers, layers, resize_layer
    from edgeprune.testing import tiny_llama

    tok = _tokenizer()
    model, tok = tiny_llama(tok, hidden=shape.hidden, layers=shape.layers, heads=shape.heads,
                            kv_heads=shape.kv_heads, ffn=shape.ffn, seed=seed, tie=True)
    if shape.vocab != model.config.vocab_size:
        model.resize_token_embeddings(shape.vocab, mean_resizing=False)
        model.config.vocab_size = shape.vocab
    hd = head_dim(model)
    if hd != shape.head_dim:
        raise EdgepruneError(f"synthetic shape {shape.name}: head_dim {hd} != {shape.head_dim}")
    targets = shape.layer_shapes()
    with torch.no_grad():
        for layer, s in zip(layers(model), targets):
            cur = (layer.self_attn.q_proj.out_features // hd, layer.self_attn.k_proj.out_features // hd,
                   layer.mlp.down_proj.in_features)
            if cur != (s.n_heads, s.n_kv_heads, s.ffn):
                resize_layer(layer, s, hd)
                for mod in (layer.self_attn, layer.mlp):
                    for p in mod.parameters():
                        p.normal_(0.0, 0.05)
    keep_layers(model, list(range(len(targets))))
    model.eval()
    return model, tok


_TOK = None


def _tokenizer():
    global _TOK
    if _TOK is None:
        from edgeprune.testing import tiny_tokenizer

        _TOK = tiny_tokenizer()
    return _TOK


# --------------------------------------------------------------------------------------------
# Export and benchmark, per backend


@dataclass
class Measurement:
    shape: str
    dtype: str
    geometry: dict
    prompt_tokens: int
    gen_tokens: int
    decode_tok_s: float  # 1 / (lower-quartile decode step time)
    prefill_s: float  # lower-quartile time to evaluate the prompt and read the first token's logits (TTFT)
    file_bytes: int
    stats: dict = field(default_factory=dict)  # median/min/max/spread of the raw samples
    seconds: float = 0.0  # wall time spent on this shape (build + export + timing)

    @property
    def decode_pos(self) -> float:
        return self.prompt_tokens + self.gen_tokens / 2


def runtime_version(backend: str) -> str:
    try:
        if backend == "llama.cpp":
            import llama_cpp

            return f"llama-cpp-python {llama_cpp.__version__}"
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__}"
    except ImportError:
        return "unavailable"


def backend_available(backend: str) -> tuple[bool, str]:
    """(ok, reason): whether this backend's exporter and runtime can be imported."""
    try:
        if backend == "llama.cpp":
            import llama_cpp  # noqa: F401

            from edgeprune.exporters.gguf import export_gguf, open_llama  # noqa: F401
        elif backend == "onnxruntime":
            import onnxruntime  # noqa: F401

            from edgeprune.exporters.onnx import OnnxDecoder, export_onnx  # noqa: F401
        else:
            return False, f"unknown backend {backend}"
    except ImportError as exc:
        return False, f"{backend} calibration needs {exc.name or exc}"
    return True, ""


def export_shape(shape: SynthShape, backend: str, dtype: str, workdir: Path, progress: Progress = None) -> tuple[Path, dict]:
    """Build a random model of `shape` and export it (no verification). Returns (artifact path, geometry dict)."""
    say = _Reporter(progress)
    model, tok = build_model(shape)
    geometry = ModelGeometry.from_model(model, name=shape.name).to_dict()
    if backend == "llama.cpp":
        from edgeprune.exporters.gguf import export_gguf

        path = workdir / f"{shape.name}.{dtype}.gguf"
        say(f"{shape.name}: exporting {dtype} GGUF")
        export_gguf(model, tok, path, dtype=dtype, verify=False)
    else:
        from edgeprune.exporters.onnx import export_onnx

        path = workdir / f"{shape.name}.{dtype}.onnx-dir"  # an ONNX export is a directory
        say(f"{shape.name}: exporting {dtype} ONNX")
        # the ONNX exporter names f32 "fp32"; latency dtypes are shared with GGUF
        export_onnx(model, tok, path, dtype={"f32": "fp32"}.get(dtype, dtype), verify=False)
    del model
    gc.collect()
    return path, geometry


def _check_timing(timing: str, threads: int | None) -> None:
    if timing not in ("wall", "cpu"):
        raise EdgepruneError(f"timing must be 'wall' or 'cpu', got '{timing}'")
    if timing == "cpu" and threads != 1:
        raise EdgepruneError("cpu timing measures the calling thread only: use it with threads=1")


def _clock(timing: str):
    return time.thread_time if timing == "cpu" else time.perf_counter


def _quantile(xs: Sequence[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        raise EdgepruneError("no timing samples")
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _stats(xs: Sequence[float]) -> dict:
    med = statistics.median(xs)
    return {"median": med, "p25": _quantile(xs, 0.25), "min": min(xs), "max": max(xs),
            "spread": (max(xs) - min(xs)) / med if med else 0.0, "n": len(xs)}


def time_llamacpp(path: Path, threads: int | None, prompt_tokens: int, gen_tokens: int, repeats: int,
                  timing: str = "wall") -> dict:
    """Raw prefill and per-step decode times of a GGUF in llama.cpp (CPU), from an empty cache each repeat.

    Same protocol as `exporters.gguf.bench_gguf` (one batch of `prompt_tokens`, then greedy tokens
    one at a time, the last logits read back after every step), but every decode step is timed on
    its own. Returns {"prefill_s": [...], "step_s": [...]}.
    """
    import llama_cpp
    import numpy as np

    from edgeprune.exporters.gguf import open_llama

    _check_timing(timing, threads)
    clock = _clock(timing)
    llm = open_llama(path, n_ctx=prompt_tokens + gen_tokens, n_threads=threads, logits_all=False, n_batch=prompt_tokens)
    n_vocab = llm.n_vocab()

    def next_token() -> int:  # greedy, from the last position's logits (what a sampler reads)
        logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(n_vocab,))))

    try:
        prompt = [int(t) for t in (np.arange(prompt_tokens) * 7919 % min(n_vocab, 300)) + 3]
        llm.reset()
        llm.eval(prompt[:8])  # warm-up: page the weights in, build the graphs
        prefill, steps = [], []
        for _ in range(repeats):
            llm.reset()
            t0 = clock()
            llm.eval(prompt)
            tok = next_token()
            prefill.append(clock() - t0)
            for _ in range(gen_tokens):
                t0 = clock()
                llm.eval([tok])
                tok = next_token()
                steps.append(clock() - t0)
    finally:
        llm.close()
    return {"prefill_s": prefill, "step_s": steps}


def time_onnx(path: Path, threads: int | None, prompt_tokens: int, gen_tokens: int, repeats: int,
              timing: str = "wall") -> dict:
    """Raw prefill and per-step decode times of an ONNX export in onnxruntime (CPU, KV cache, greedy).

    Same protocol as `exporters.onnx_runtime.bench_onnx`, every decode step timed on its own.
    """
    import numpy as np

    from edgeprune.exporters.onnx_runtime import OnnxDecoder

    _check_timing(timing, threads)
    clock = _clock(timing)
    dec = OnnxDecoder(path, threads)
    vocab = dec.vocab_size or int(dec.logits(np.zeros(1, np.int64)).shape[-1])
    prompt = np.random.default_rng(0).integers(0, vocab, prompt_tokens)
    tok = int(dec.prefill(prompt[: min(8, prompt_tokens)])[-1].argmax())  # warm-up
    dec.step(tok)
    prefill, steps = [], []
    for _ in range(repeats):
        dec.reset()
        t0 = clock()
        tok = int(dec.prefill(prompt)[-1].argmax())
        prefill.append(clock() - t0)
        for _ in range(gen_tokens):
            t0 = clock()
            tok = int(dec.step(tok).argmax())
            steps.append(clock() - t0)
    del dec
    return {"prefill_s": prefill, "step_s": steps}


def measure_shapes(shapes: Sequence[SynthShape], backend: str, dtypes: Sequence[str], workdir: Path,
                   threads: int | None, prompt_tokens: int, gen_tokens: int, repeats: int,
                   progress: Progress = None, timing: str = "wall", rounds: int = 2,
                   quantile: float = 0.25) -> list[Measurement]:
    """Export every (shape, dtype), then time them round-robin `rounds` times (`repeats` runs each).

    Round-robin spreads slow drifts of a shared machine's load over all shapes instead of biasing
    whichever shape ran during a busy minute. Figures are the `quantile` (default: lower quartile)
    of the pooled samples: contention only ever adds time, so a low quantile is closer to what an
    idle device measures than the median. timing: "wall" or "cpu" (see `measure_shape`).
    Exported files are deleted afterwards.
    """
    say = _Reporter(progress)
    _check_timing(timing, threads)
    timer = time_llamacpp if backend == "llama.cpp" else time_onnx
    jobs = list(itertools.product(shapes, dtypes))
    items = []
    export_label, time_label = f"exporting synthetic {backend} models", f"timing {backend} ({timing} time)"
    try:
        for i, (shape, dt) in enumerate(jobs):
            say.step(export_label, i, len(jobs), f"building and exporting {shape.name} ({dt})")
            t0 = time.perf_counter()
            path, geom = export_shape(shape, backend, dt, workdir, say)
            items.append({"shape": shape, "dtype": dt, "path": path, "geometry": geom, "prefill_s": [], "step_s": [],
                          "seconds": time.perf_counter() - t0, "bytes": _path_bytes(path)})
        say.step(export_label, len(jobs), len(jobs))
        n_timed = rounds * len(items)
        for r in range(rounds):
            for k, it in enumerate(items):
                say.step(time_label, r * len(items) + k, n_timed,
                         f"round {r + 1}/{rounds}: timing {it['shape'].name} ({it['dtype']}, prompt {prompt_tokens}, "
                         f"{gen_tokens} tokens x {repeats}, {timing} time)")
                t0 = time.perf_counter()
                raw = timer(it["path"], threads, prompt_tokens, gen_tokens, repeats, timing)
                it["prefill_s"] += raw["prefill_s"]
                it["step_s"] += raw["step_s"]
                it["seconds"] += time.perf_counter() - t0
        say.step(time_label, n_timed, n_timed)
    finally:
        for it in items:
            _remove(it["path"])
    out = []
    for it in items:
        out.append(Measurement(
            shape=it["shape"].name, dtype=it["dtype"], geometry=it["geometry"], prompt_tokens=prompt_tokens,
            gen_tokens=gen_tokens, decode_tok_s=1.0 / _quantile(it["step_s"], quantile),
            prefill_s=_quantile(it["prefill_s"], quantile), file_bytes=it["bytes"],
            stats={"timing": timing, "quantile": quantile, "decode_step_s": _stats(it["step_s"]),
                   "prefill_s": _stats(it["prefill_s"])},
            seconds=it["seconds"]))
    return out


def measure_shape(shape: SynthShape, backend: str, dtype: str, workdir: Path, threads: int | None,
                  prompt_tokens: int, gen_tokens: int, repeats: int, progress: Progress = None,
                  timing: str = "wall", rounds: int = 1) -> Measurement:
    """Build, export and time one synthetic shape; the exported file is deleted afterwards.

    timing: "wall" (elapsed time: what a user sees on an idle machine) or "cpu" (CPU time of the
    timing thread; with threads=1 both runtimes compute on that thread, so this is the time the
    work took even when other jobs share the cores).
    """
    return measure_shapes([shape], backend, [dtype], workdir, threads, prompt_tokens, gen_tokens, repeats, progress,
                          timing, rounds)[0]


def _path_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    total = path.stat().st_size if path.exists() else 0
    return total + sum(p.stat().st_size for p in path.parent.glob(path.name + "?*") if p.is_file())


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
        for extra in path.parent.glob(path.name + "?*"):  # external-data files next to an .onnx
            if extra.is_file():
                extra.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Fitting


def nnls(rows: Sequence[Sequence[float]], y: Sequence[float], weights: Sequence[float] | None = None) -> list[float]:
    """Non-negative least squares for a handful of unknowns (tries every active set; no scipy)."""
    import numpy as np

    A = np.asarray(rows, dtype=float)
    b = np.asarray(y, dtype=float)
    if weights is not None:
        w = np.asarray(weights, dtype=float)
        A, b = A * w[:, None], b * w
    n = A.shape[1]
    best, best_err = np.zeros(n), float(np.sum(b ** 2))
    scale = np.maximum(np.abs(A).max(axis=0), 1e-300)  # column scaling for conditioning
    As = A / scale
    for k in range(1, n + 1):
        for cols in itertools.combinations(range(n), k):
            x_sub, *_ = np.linalg.lstsq(As[:, cols], b, rcond=None)
            if np.any(x_sub < 0):
                continue
            x = np.zeros(n)
            x[list(cols)] = x_sub
            err = float(np.sum((As @ x - b) ** 2))
            if err < best_err - 1e-15:
                best, best_err = x, err
    return [float(v) for v in best / scale]


@dataclass
class Fit:
    bandwidth_gbps: float
    layer_overhead_ms: float
    token_overhead_ms: float
    compute_gops: dict
    prefill_layer_token_overhead_ms: float
    prefill_overhead_ms: float
    dtype_bandwidth_gbps: dict = field(default_factory=dict)
    decode_rel_err: list = field(default_factory=list)
    prefill_rel_err: list = field(default_factory=list)


def fit_constants(measurements: Sequence[Measurement], backend: str, kv_dtype: str, prefill_logits: str) -> Fit:
    """Least-squares fit of the decode and prefill constants.

    decode:  1/decode_tok_s = bytes * (1/bw) + n_layers * t_layer + t_token            (3 unknowns)
    prefill: prefill_s      = sum_d [dtype = d] * FLOPs * (1/C_d) + n_layers * P * t_lt + t_p0
             (one compute rate per dtype, shared overheads)
    Non-negative, on relative residuals (each row divided by its measured value).
    """
    if len(measurements) < 3:
        raise EdgepruneError(f"calibration needs at least 3 measured shapes, got {len(measurements)}")
    dtypes = list(dict.fromkeys(m.dtype for m in measurements))  # first = the profile's default
    rows, y = [], []
    for m in measurements:
        g = ModelGeometry.from_dict(m.geometry)
        bc = byte_counts(g, m.dtype, backend, kv_dtype)
        b, L = decode_features(g, bc, m.decode_pos)
        rows.append([b if m.dtype == d else 0.0 for d in dtypes] + [L, 1.0])
        y.append(1.0 / m.decode_tok_s)
    dcoef = nnls(rows, y, [1.0 / v for v in y])
    inv_bw, t_layer, t_token = dcoef[:-2], dcoef[-2], dcoef[-1]
    if any(ib <= 0 for ib in inv_bw):
        raise EdgepruneError("calibration could not separate the bandwidth term (decode time did not grow with "
                             "model bytes): the host is probably too busy; rerun with fewer other jobs")
    dec_err = [sum(r_i * c_i for r_i, c_i in zip(r, dcoef)) / v - 1.0 for r, v in zip(rows, y)]

    prow, py = [], []
    for m in measurements:
        g = ModelGeometry.from_dict(m.geometry)
        flops = prefill_flops(g, m.prompt_tokens, prefill_logits)
        prow.append([flops if m.dtype == d else 0.0 for d in dtypes] + [g.n_layers * m.prompt_tokens, 1.0])
        py.append(m.prefill_s)
    coef = nnls(prow, py, [1.0 / v for v in py])
    inv_c, t_lt, t_p0 = coef[:-2], coef[-2], coef[-1]
    for d, ic in zip(dtypes, inv_c):
        if ic <= 0:
            raise EdgepruneError(f"calibration could not fit prefill compute for {d}: prefill time did not grow "
                                 "with FLOPs (host too busy?)")
    pre_err = [sum(r_i * c_i for r_i, c_i in zip(r, coef)) / v - 1.0 for r, v in zip(prow, py)]
    bws = {d: 1.0 / ib / 1e9 for d, ib in zip(dtypes, inv_bw)}
    return Fit(bandwidth_gbps=bws[dtypes[0]], layer_overhead_ms=t_layer * 1e3, token_overhead_ms=t_token * 1e3,
               dtype_bandwidth_gbps=bws if len(bws) > 1 else {},
               compute_gops={d: 1.0 / ic / 1e9 for d, ic in zip(dtypes, inv_c)},
               prefill_layer_token_overhead_ms=t_lt * 1e3, prefill_overhead_ms=t_p0 * 1e3,
               decode_rel_err=dec_err, prefill_rel_err=pre_err)


def _sig(x: float, n: int = 4) -> float:
    """x rounded to n significant digits (profiles stay readable without losing small overheads)."""
    return float(f"{x:.{n}g}")


# --------------------------------------------------------------------------------------------
# Host description


def host_description() -> dict:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        import psutil

        ram = int(psutil.virtual_memory().total)
        physical = psutil.cpu_count(logical=False) or cores
    except ImportError:
        ram = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        physical = cores
    return {"hostname": socket.gethostname(), "cpu": model, "cores": cores, "physical_cores": min(physical, cores),
            "ram": ram, "machine": platform.machine(), "system": platform.system()}


def busy_warning(threads: int, timing: str, cores: int) -> str:
    """A hint when other jobs load the machine and the timing mode will suffer from it ('' if fine)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return ""
    if timing == "wall" and load > 0.5 * cores:
        return (f"warning: load average {load:.1f} on {cores} cores: wall-clock timings will be slow and noisy "
                f"(multi-threaded llama.cpp worst); for a fit on a shared machine use threads=1, timing='cpu'")
    return ""


def _isa() -> tuple[str, ...]:
    try:
        flags = open("/proc/cpuinfo").read().split("flags", 1)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return ()
    return tuple(f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile") if f in flags)


# --------------------------------------------------------------------------------------------
# Calibration


@dataclass
class CalibrationResult:
    profile: object  # edgeprune.profiles.Profile
    fit: Fit
    measurements: list
    backend: str
    dtypes: tuple
    threads: int
    seconds: float
    host: dict
    heldout: list = field(default_factory=list)  # measurements of held-out shapes (not fitted)
    validation: object = None  # ValidationReport on `heldout`, or None

    def to_dict(self) -> dict:
        from edgeprune.profiles import profile_to_dict

        return {"backend": self.backend, "dtypes": list(self.dtypes), "threads": self.threads,
                "seconds": self.seconds, "host": self.host, "fit": asdict(self.fit),
                "measurements": [asdict(m) for m in self.measurements],
                "heldout_measurements": [asdict(m) for m in self.heldout],
                "validation": self.validation.to_dict() if self.validation else None,
                "profile": profile_to_dict(self.profile)}


def _dtypes_arg(backend: str, dtype) -> tuple[str, ...]:
    from edgeprune.profiles import FORMAT_DTYPES

    if dtype is None:
        dts = (DEFAULT_DTYPE[backend],)
    elif isinstance(dtype, str):
        dts = tuple(d.strip() for d in dtype.split(",") if d.strip())
    else:
        dts = tuple(dtype)
    dts = tuple(normalize_dtype(d) for d in dts)
    allowed = FORMAT_DTYPES[BACKEND_FORMAT[backend]]
    for d in dts:
        if d not in allowed:
            raise EdgepruneError(f"dtype {d} cannot be benchmarked with {backend}; use one of {', '.join(allowed)}")
    return dts


def run_calibration(backend: str = "llama.cpp", dtype=None, threads: int | None = None, quick: bool = False,
                    progress: Progress = None, shapes: Sequence[SynthShape] | None = None,
                    prompt_tokens: int = 128, gen_tokens: int | None = None, repeats: int | None = None,
                    workdir: Path | None = None, base_profile=None, name: str = "host",
                    timing: str = "wall", rounds: int = 2,
                    heldout: Sequence[SynthShape] | None = None) -> CalibrationResult:
    """Benchmark synthetic shapes with `backend` and fit a profile; see `calibrate_host`.

    heldout: shapes measured in the same round-robin session (so machine-load drift hits both sets
    alike) but never used by the fit; the result's `validation` compares them with the fitted profile.
    """
    if backend not in BACKENDS:
        raise EdgepruneError(f"unknown backend '{backend}': use one of {', '.join(BACKENDS)}")
    ok, why = backend_available(backend)
    if not ok:
        raise EdgepruneError(why)
    dtypes = _dtypes_arg(backend, dtype)
    host = host_description()
    threads = threads or host["physical_cores"]
    _check_timing(timing, threads)
    gen_tokens = gen_tokens or (32 if quick else 64)
    repeats = repeats or (3 if quick else 5)
    shapes = list(shapes) if shapes is not None else calibration_shapes(quick)
    say = _Reporter(progress)
    busy = busy_warning(threads, timing, host["cores"])
    if busy:
        say(busy)
    kv_dtype = "f16" if backend == "llama.cpp" else "f32"
    prefill_logits = "last" if backend == "llama.cpp" else "all"
    start = time.perf_counter()
    heldout = list(heldout or [])
    cal_names = {s.name for s in shapes}
    if cal_names & {s.name for s in heldout}:
        raise EdgepruneError(f"held-out shapes overlap the calibration shapes: {sorted(cal_names & {s.name for s in heldout})}")
    with tempfile.TemporaryDirectory(prefix="edgeprune-cal-", dir=workdir) as tmp:
        measured = measure_shapes(shapes + heldout, backend, dtypes, Path(tmp), threads, prompt_tokens, gen_tokens,
                                  repeats, say, timing, rounds)
    measurements = [m for m in measured if m.shape in cal_names]
    held = [m for m in measured if m.shape not in cal_names]
    fit = fit_constants(measurements, backend, kv_dtype, prefill_logits)
    version = runtime_version(backend)
    profile = _make_profile(fit, backend, dtypes, threads, host, version, kv_dtype, prefill_logits, base_profile,
                            name, len(shapes), prompt_tokens, gen_tokens, repeats)
    validation = ValidationReport(backend, profile.name, [compare(m, profile) for m in held]) if held else None
    return CalibrationResult(profile, fit, measurements, backend, dtypes, threads, time.perf_counter() - start, host,
                             held, validation)


def _make_profile(fit: Fit, backend, dtypes, threads, host, version, kv_dtype, prefill_logits, base_profile, name,
                  n_shapes, prompt_tokens, gen_tokens, repeats):
    from edgeprune.profiles import (ExportSpec, Hardware, MemorySpec, Profile, Provenance, Targets,
                                    load_profile)

    today = _dt.date.today().isoformat()
    calibrated = f"calibrated on {host['hostname']} {today} with {backend} {version}"
    constants = LatencyConstants(
        backend=backend, bandwidth_gbps=_sig(fit.bandwidth_gbps),
        compute_gops={d: _sig(v) for d, v in fit.compute_gops.items()},
        layer_overhead_ms=_sig(fit.layer_overhead_ms), token_overhead_ms=_sig(fit.token_overhead_ms),
        prefill_layer_token_overhead_ms=_sig(fit.prefill_layer_token_overhead_ms),
        prefill_overhead_ms=_sig(fit.prefill_overhead_ms), kv_dtype=kv_dtype, prefill_logits=prefill_logits,
        dtype_bandwidth_gbps={d: _sig(v) for d, v in fit.dtype_bandwidth_gbps.items()})
    fmt = BACKEND_FORMAT[backend]
    mad = lambda xs: 100 * statistics.mean(abs(x) for x in xs) if xs else 0.0  # noqa: E731
    notes = (f"{n_shapes} synthetic random-weight shapes x {', '.join(dtypes)}, {threads} threads, prompt "
             f"{prompt_tokens}, {gen_tokens} generated tokens, lower quartile of {repeats} x rounds; in-sample mean |error| decode "
             f"{mad(fit.decode_rel_err):.1f}%, prefill {mad(fit.prefill_rel_err):.1f}%.")
    sources = [f"edgeprune.hostcal ({calibrated})"]
    if base_profile is not None:
        base = load_profile(base_profile)
        return replace(base, name=name, latency=constants, latency_version=version,
                       hardware=replace(base.hardware, threads=threads),
                       export=replace(base.export, format=fmt, dtypes=tuple(dtypes)),
                       provenance=Provenance(sources=tuple(sources) + base.provenance.sources,
                                             estimates=tuple(e for e in base.provenance.estimates
                                                             if not e.startswith("latency")),
                                             notes=notes, calibrated=calibrated),
                       source="")
    budget = int(min(host["ram"] * 0.5, host["ram"] - 2e9)) if host["ram"] > 4e9 else int(host["ram"] * 0.5)
    return Profile(
        name=name,
        hardware=Hardware(description=f"{host['cpu']} ({host['cores']} cores, {host['system']} {host['machine']})",
                          threads=threads, ram=host["ram"], accelerator="cpu", isa=_isa(),
                          notes=f"host {host['hostname']}"),
        latency=constants,
        memory=MemorySpec(budget=budget, context=2048, runtime_overhead=40_000_000),
        targets=Targets(prompt_tokens=512),
        export=ExportSpec(format=fmt, dtypes=tuple(dtypes), width_multiple=32),
        provenance=Provenance(sources=tuple(sources), estimates=("memory.budget", "memory.runtime_overhead"),
                              notes=notes, calibrated=calibrated),
        latency_version=version,
    )


def calibrate_host(backend: str = "llama.cpp", dtype=None, threads: int | None = None, out: Path | str | None = "host.toml",
                   quick: bool = False, progress: Progress = None, base_profile=None, name: str = "host",
                   record: Path | str | None = None, **kwargs):
    """Benchmark synthetic models on this machine and write a profile with the fitted constants.

    backend: "llama.cpp" (GGUF) or "onnxruntime" (ONNX). dtype: one dtype or several ("q8_0,q4_0");
    default q8_0 / int8. threads: default the physical cores. out: the TOML to write (None: don't).
    quick: 6 shapes, 32 generated tokens, 3 repeats per round (a few minutes on 2 cores) instead of 8/64/5.
    timing: "wall" (default) or "cpu" (needs threads=1; use it on a busy/shared machine).
    rounds: round-robin timing passes (default 2). heldout: extra shapes measured in the same
    session and reported in the result's `validation` (via run_calibration; calibrate_host only
    returns the profile, record= keeps everything).
    base_profile: keep that profile's hardware/memory/targets/export and replace its [latency]
    (calibrating *on* a device). record: also write the measurements and fit as JSON there.
    Returns the Profile (also written to `out`).
    """
    result = run_calibration(backend, dtype, threads, quick, progress, base_profile=base_profile, name=name, **kwargs)
    if out:
        from edgeprune.profiles import write_profile

        write_profile(result.profile, out, header=_header(result))
    if record:
        Path(record).write_text(json.dumps(result.to_dict(), indent=2))
    return result.profile


def _header(result: CalibrationResult) -> str:
    f = result.fit
    return (f"edgeprune host profile '{result.profile.name}' written by `edgeprune calibrate`.\n"
            f"{result.profile.provenance.calibrated}.\n"
            f"Fitted: bandwidth {f.bandwidth_gbps:.2f} GB/s, {f.layer_overhead_ms:.3f} ms/layer + "
            f"{f.token_overhead_ms:.3f} ms/token (decode); compute "
            + ", ".join(f"{k} {v:.1f} GOPS" for k, v in f.compute_gops.items())
            + f" (prefill).\nUnits: memory bytes or '300MB'; GB/s; GOPS; ms for overheads; seconds for ttft_max_s.\n"
            "Targets are empty: add [targets] decode_tok_s_min / ttft_max_s / memory_max for `edgeprune fit`.")


# --------------------------------------------------------------------------------------------
# Validation


@dataclass
class ValidationRow:
    shape: str
    dtype: str
    n_layers: int
    params: int
    predicted_decode_tok_s: float
    measured_decode_tok_s: float
    decode_error_pct: float
    predicted_prefill_s: float
    measured_prefill_s: float
    prefill_error_pct: float
    file_bytes: int
    predicted_weight_bytes: int


@dataclass
class ValidationReport:
    backend: str
    profile: str
    rows: list

    @property
    def decode_within_10(self) -> int:
        return sum(abs(r.decode_error_pct) <= 10 for r in self.rows)

    @property
    def prefill_within_10(self) -> int:
        return sum(abs(r.prefill_error_pct) <= 10 for r in self.rows)

    def summary(self) -> dict:
        n = len(self.rows)
        mae = lambda xs: statistics.mean(abs(x) for x in xs) if xs else 0.0  # noqa: E731
        return {"shapes": n, "decode_within_10pct": self.decode_within_10, "prefill_within_10pct": self.prefill_within_10,
                "decode_mean_abs_error_pct": mae([r.decode_error_pct for r in self.rows]),
                "prefill_mean_abs_error_pct": mae([r.prefill_error_pct for r in self.rows]),
                "decode_max_abs_error_pct": max((abs(r.decode_error_pct) for r in self.rows), default=0.0),
                "prefill_max_abs_error_pct": max((abs(r.prefill_error_pct) for r in self.rows), default=0.0)}

    def table(self) -> str:
        head = (f"{'shape':32s} {'dtype':6s} {'L':>3s} {'params':>8s} | {'decode tok/s pred':>17s} {'meas':>7s} {'err%':>6s} "
                f"| {'prefill s pred':>14s} {'meas':>7s} {'err%':>6s}")
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append(f"{r.shape:32s} {r.dtype:6s} {r.n_layers:3d} {r.params / 1e6:7.1f}M | {r.predicted_decode_tok_s:17.1f} "
                         f"{r.measured_decode_tok_s:7.1f} {r.decode_error_pct:+6.1f} | {r.predicted_prefill_s:14.3f} "
                         f"{r.measured_prefill_s:7.3f} {r.prefill_error_pct:+6.1f}")
        s = self.summary()
        lines.append(f"within +-10%: decode {s['decode_within_10pct']}/{s['shapes']}, prefill {s['prefill_within_10pct']}/{s['shapes']}; "
                     f"mean |error| decode {s['decode_mean_abs_error_pct']:.1f}%, prefill {s['prefill_mean_abs_error_pct']:.1f}%")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"backend": self.backend, "profile": self.profile, "summary": self.summary(),
                "rows": [asdict(r) for r in self.rows]}


def compare(measurement: Measurement, profile) -> ValidationRow:
    """Predicted vs measured for one benchmarked shape under `profile`'s constants."""
    g = ModelGeometry.from_dict(measurement.geometry)
    pred = predict(g, measurement.dtype, profile.latency, prompt_tokens=measurement.prompt_tokens,
                   context=measurement.prompt_tokens + measurement.gen_tokens, decode_pos=int(measurement.decode_pos))
    return ValidationRow(
        shape=measurement.shape, dtype=measurement.dtype, n_layers=g.n_layers, params=g.param_counts()["total"],
        predicted_decode_tok_s=pred.decode_tok_s, measured_decode_tok_s=measurement.decode_tok_s,
        decode_error_pct=100 * (pred.decode_tok_s / measurement.decode_tok_s - 1),
        predicted_prefill_s=pred.prefill_s, measured_prefill_s=measurement.prefill_s,
        prefill_error_pct=100 * (pred.prefill_s / measurement.prefill_s - 1),
        file_bytes=measurement.file_bytes, predicted_weight_bytes=int(pred.memory.weights))


def validate_model(profile, backend: str | None = None, dtype=None, threads: int | None = None, quick: bool = False,
                   progress: Progress = None, shapes: Sequence[SynthShape] | None = None, prompt_tokens: int = 128,
                   gen_tokens: int | None = None, repeats: int | None = None, workdir: Path | None = None,
                   measurements_out: list | None = None, timing: str = "wall", rounds: int = 2) -> ValidationReport:
    """Benchmark held-out shapes (default: SmolLM2-like dense / pruned / layer-dropped) and compare with `profile`.

    profile: a Profile, name or path (normally the one `calibrate_host` just wrote). Shapes are
    disjoint from the calibration shapes. Returns a report with per-shape % errors
    (positive = the model predicts faster decode / longer prefill than measured).
    """
    from edgeprune.profiles import load_profile

    profile = load_profile(profile)
    backend = backend or profile.latency.backend
    if backend != profile.latency.backend:
        raise EdgepruneError(f"profile {profile.name} has {profile.latency.backend} constants, not {backend}")
    ok, why = backend_available(backend)
    if not ok:
        raise EdgepruneError(why)
    dtypes = _dtypes_arg(backend, dtype or profile.export.default_dtype)
    threads = threads or profile.hardware.threads
    _check_timing(timing, threads)
    gen_tokens = gen_tokens or (32 if quick else 64)
    repeats = repeats or (3 if quick else 5)
    shapes = list(shapes) if shapes is not None else heldout_shapes(quick)
    say = _Reporter(progress)
    with tempfile.TemporaryDirectory(prefix="edgeprune-val-", dir=workdir) as tmp:
        ms = measure_shapes(shapes, backend, dtypes, Path(tmp), threads, prompt_tokens, gen_tokens, repeats, say,
                            timing, rounds)
    if measurements_out is not None:
        measurements_out.extend(ms)
    return ValidationReport(backend, profile.name, [compare(m, profile) for m in ms])
