"""Timing exported synthetic models in llama.cpp and onnxruntime, round-robin, on a possibly shared machine.

Every shape is exported first, then all are timed round-robin (`rounds` passes), and the figures
are the lower quartile of the pooled samples (per decode step, per prefill): slow drifts of other
jobs' load hit every shape alike, and contention (which only ever adds time) is filtered.
`timing="cpu"` with `threads=1` times the CPU time of the calling thread (llama.cpp and onnxruntime
both compute on it with one thread): on the 2-core development VM this is what made the fit
reproducible; two llama.cpp threads next to other jobs ran 4x slower.
"""

from __future__ import annotations

import itertools
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from edgeprune.errors import EdgepruneError
from edgeprune.geometry import ModelGeometry
from edgeprune.hostperf.shapes import artifact_bytes, export_shape, remove_artifact

ProgressFn = Callable[[str, int, int], None]  # progress(label, done, total): one bar per label
LogFn = Callable[[str], None]  # log(message): one line of text


class Reporter:
    """Where host measurement reports to: counts go to `progress`, text lines to `log`.

    Either may be None. Warnings go to `log`, or to stderr when there is no log, so a caller that
    only draws progress bars still sees them.
    """

    def __init__(self, progress: ProgressFn | None = None, log: LogFn | None = None):
        self.progress = progress
        self.log = log

    def note(self, message: str) -> None:
        if self.log is not None:
            self.log(message)
        elif message.startswith("warning"):
            print(message, file=sys.stderr)

    def step(self, label: str, done: int, total: int, detail: str = "") -> None:
        """`done` of `total` items of `label` are finished; `detail` describes the next one."""
        if self.progress is not None:
            self.progress(label, done, total)
        if self.log is not None and detail:
            self.log(f"[{done + 1}/{total}] {detail}")


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


def check_timing(timing: str, threads: int | None) -> None:
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

    Same protocol as `exporters.llamacpp.bench_gguf` (one batch of `prompt_tokens`, then greedy
    tokens one at a time, the last logits read back after every step), but every decode step is
    timed on its own. Returns {"prefill_s": [...], "step_s": [...]}.
    """
    import llama_cpp
    import numpy as np

    from edgeprune.exporters.llamacpp import open_llama

    check_timing(timing, threads)
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

    check_timing(timing, threads)
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


def measure_shapes(shapes: Sequence[ModelGeometry], backend: str, dtypes: Sequence[str], workdir: Path,
                   threads: int | None, prompt_tokens: int, gen_tokens: int, repeats: int,
                   reporter: Reporter | None = None, timing: str = "wall", rounds: int = 2,
                   quantile: float = 0.25) -> list[Measurement]:
    """Export every (shape, dtype), then time them round-robin `rounds` times (`repeats` runs each).

    Round-robin spreads slow drifts of a shared machine's load over all shapes instead of biasing
    whichever shape ran during a busy minute. Figures are the `quantile` (default: lower quartile)
    of the pooled samples: contention only ever adds time, so a low quantile is closer to what an
    idle device measures than the median. timing: "wall" or "cpu" (see `measure_shape`).
    Exported files are deleted afterwards.
    """
    say = reporter or Reporter()
    check_timing(timing, threads)
    timer = time_llamacpp if backend == "llama.cpp" else time_onnx
    jobs = list(itertools.product(shapes, dtypes))
    items = []
    export_label, time_label = f"exporting synthetic {backend} models", f"timing {backend} ({timing} time)"
    try:
        for i, (shape, dt) in enumerate(jobs):
            say.step(export_label, i, len(jobs), f"building and exporting {shape.name} ({dt})")
            t0 = time.perf_counter()
            path = export_shape(shape, backend, dt, workdir, say.note)
            items.append({"shape": shape, "dtype": dt, "path": path, "prefill_s": [], "step_s": [],
                          "seconds": time.perf_counter() - t0, "bytes": artifact_bytes(path)})
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
            remove_artifact(it["path"])
    return [Measurement(
        shape=it["shape"].name, dtype=it["dtype"], geometry=it["shape"].to_dict(), prompt_tokens=prompt_tokens,
        gen_tokens=gen_tokens, decode_tok_s=1.0 / _quantile(it["step_s"], quantile),
        prefill_s=_quantile(it["prefill_s"], quantile), file_bytes=it["bytes"],
        stats={"timing": timing, "quantile": quantile, "decode_step_s": _stats(it["step_s"]),
               "prefill_s": _stats(it["prefill_s"])},
        seconds=it["seconds"]) for it in items]


def measure_shape(shape: ModelGeometry, backend: str, dtype: str, workdir: Path, threads: int | None,
                  prompt_tokens: int, gen_tokens: int, repeats: int, progress: ProgressFn | None = None,
                  log: LogFn | None = None, timing: str = "wall", rounds: int = 1) -> Measurement:
    """Build, export and time one synthetic shape; the exported file is deleted afterwards.

    timing: "wall" (elapsed time: what a user sees on an idle machine) or "cpu" (CPU time of the
    timing thread; with threads=1 both runtimes compute on that thread, so this is the time the
    work took even when other jobs share the cores).
    """
    return measure_shapes([shape], backend, [dtype], workdir, threads, prompt_tokens, gen_tokens, repeats,
                          Reporter(progress, log), timing, rounds)[0]
