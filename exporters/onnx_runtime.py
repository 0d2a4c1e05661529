"""Run an exported decoder with onnxruntime: full-sequence logits, KV-cache decoding, benchmarks.

Torch-free on purpose: `python -m edgeprune.exporters.onnx bench` measures peak RSS, and importing
torch would add hundreds of MiB that an edge deployment never loads.

The graph contract (see onnx_graph): input_ids / attention_mask / position_ids plus
past_key_values.{i}.key|value [B, n_kv_i, past, hd] in; logits and present.{i}.key|value out.
Per-layer KV shapes are read from the session's input metadata, so any decoder with these names
(including optimum's exports) runs here.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from edgeprune.errors import EdgepruneError

MODEL_FILE = "model.onnx"
SIDECAR_FILE = "edgeprune_onnx.json"


def model_path(onnx_dir: str | Path) -> Path:
    path = Path(onnx_dir)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise EdgepruneError(f"no ONNX model at {path}: pass a directory written by the ONNX export")
    return path


def read_sidecar(onnx_dir: str | Path) -> dict:
    path = model_path(onnx_dir).parent / SIDECAR_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def open_session(onnx_dir: str | Path, threads: int | None = None):
    import onnxruntime as ort

    if threads is not None and threads < 1:
        raise EdgepruneError(f"--threads must be at least 1, got {threads}")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1  # one decoder graph: parallelism is inside the ops
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3  # hide the optimizer's informational warnings
    path = model_path(onnx_dir)
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for corrupt files
        raise EdgepruneError(f"onnxruntime cannot load {onnx_dir}: {str(exc).splitlines()[0]}") from None


class OnnxDecoder:
    """One onnxruntime session plus the KV cache of one sequence (batch 1) for greedy decoding."""

    def __init__(self, onnx_dir: str | Path | None = None, threads: int | None = None, session=None):
        if session is None and onnx_dir is None:
            raise EdgepruneError("OnnxDecoder needs an ONNX directory or a session")
        self.session = session or open_session(onnx_dir, threads)
        self.past_names = [i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        self.kv_shapes = {i.name: (i.shape[1], i.shape[3]) for i in self.session.get_inputs() if i.name in self.past_names}
        logits = self.session.get_outputs()[0]
        self.vocab_size = logits.shape[-1] if isinstance(logits.shape[-1], int) else None
        self.output_names = ["logits", *self.present_names]
        self.reset()

    def reset(self) -> None:
        self.past: list[np.ndarray] | None = None
        self.length = 0

    def empty_past(self, batch: int = 1) -> list[np.ndarray]:
        return [np.zeros((batch, h, 0, d), np.float32) for h, d in (self.kv_shapes[n] for n in self.past_names)]

    def run(self, input_ids, attention_mask, position_ids, past) -> tuple[np.ndarray, list[np.ndarray]]:
        """One graph call; every array is [batch, ...]. Returns logits and the new KV cache."""
        feed = {
            "input_ids": np.asarray(input_ids, np.int64),
            "attention_mask": np.asarray(attention_mask, np.int64),
            "position_ids": np.asarray(position_ids, np.int64),
            **dict(zip(self.past_names, past)),
        }
        out = self.session.run(self.output_names, feed)
        return out[0], out[1:]

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        """Full-sequence logits [T, vocab] from an empty cache (a `LogitsFn`); leaves the state alone."""
        ids = np.asarray(tokens, np.int64)[None]
        t = ids.shape[1]
        logits, _ = self.run(ids, np.ones((1, t), np.int64), np.arange(t, dtype=np.int64)[None], self.empty_past())
        return logits[0]

    def prefill(self, ids) -> np.ndarray:
        """Start a new sequence with `ids`; returns their logits [T, vocab]."""
        ids = np.asarray(ids, np.int64).reshape(1, -1)
        t = ids.shape[1]
        logits, self.past = self.run(ids, np.ones((1, t), np.int64), np.arange(t, dtype=np.int64)[None], self.empty_past())
        self.length = t
        return logits[0]

    def step(self, token: int) -> np.ndarray:
        """Feed one token after prefill/step; returns its logits [vocab]."""
        if self.past is None:
            raise EdgepruneError("OnnxDecoder.step() before prefill()")
        n = self.length
        logits, self.past = self.run(
            np.array([[token]], np.int64), np.ones((1, n + 1), np.int64), np.array([[n]], np.int64), self.past
        )
        self.length = n + 1
        return logits[0, -1]

    def generate(self, ids, n: int) -> list[int]:
        """Greedy continuation of `ids` by `n` tokens with the KV cache."""
        if n <= 0:
            return []
        tok = int(self.prefill(ids)[-1].argmax())
        out = [tok]
        while len(out) < n:
            tok = int(self.step(tok).argmax())
            out.append(tok)
        return out


def ort_logits_fn(onnx_dir: str | Path, threads: int | None = None):
    """A `LogitsFn` (tokens [T] -> logits [T, vocab]) backed by the exported graph."""
    return OnnxDecoder(onnx_dir, threads).logits


def artifact_bytes(onnx_dir: str | Path) -> int:
    folder = model_path(onnx_dir).parent
    return sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith(MODEL_FILE))


def bench_onnx(onnx_dir: str | Path, threads: int | None = None, prompt_tokens: int = 128, gen_tokens: int = 64, repeats: int = 3) -> dict:
    """Prefill and decode speed of batch-1 greedy generation, medians over `repeats` (after a warm-up).

    prefill tokens/s = prompt_tokens / prefill time; time to first token = that prefill call plus
    the argmax; decode tokens/s = gen_tokens / time of gen_tokens single-token steps with the cache.
    The prompt is random token ids: speed does not depend on the text.
    """
    from edgeprune.exporters.common import peak_rss_mb, summarize

    if prompt_tokens < 1 or gen_tokens < 1 or repeats < 1:
        raise EdgepruneError("--prompt-tokens, --gen-tokens and --repeats must be at least 1")
    start = time.perf_counter()
    dec = OnnxDecoder(onnx_dir, threads)
    load_s = time.perf_counter() - start
    vocab = dec.vocab_size or int(dec.logits(np.zeros(1, np.int64)).shape[-1])
    prompt = np.random.default_rng(0).integers(0, vocab, prompt_tokens)
    _generate_timed(dec, prompt[: min(16, prompt_tokens)], 4)  # warm-up: allocations, thread pool
    prefill, ttft, decode = [], [], []
    for _ in range(repeats):
        p_s, first_s, d_s = _generate_timed(dec, prompt, gen_tokens)
        prefill.append(prompt_tokens / p_s)
        ttft.append(first_s)
        decode.append(gen_tokens / d_s)
    side = read_sidecar(onnx_dir)
    return {
        "backend": "onnxruntime",
        "onnxruntime": _ort_version(),
        "model": str(model_path(onnx_dir).parent),
        "dtype": side.get("dtype"),
        "size_mb": artifact_bytes(onnx_dir) / 2**20,
        "threads": threads or os.cpu_count(),
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "load_seconds": load_s,
        # the same keys and units as bench_gguf, so `edgeprune bench/check/fit` read both alike
        "prefill_tok_s": summarize(prefill),
        "decode_tok_s": summarize(decode),
        "ttft_s": summarize(ttft),
        "peak_rss_mb": peak_rss_mb(),
    }


def _generate_timed(dec: OnnxDecoder, prompt: np.ndarray, n: int) -> tuple[float, float, float]:
    """(prefill seconds, first-token seconds, seconds for n decode steps)."""
    t0 = time.perf_counter()
    logits = dec.prefill(prompt)
    t1 = time.perf_counter()
    tok = int(logits[-1].argmax())
    t2 = time.perf_counter()
    for _ in range(n):
        tok = int(dec.step(tok).argmax())
    t3 = time.perf_counter()
    return t1 - t0, t2 - t0, t3 - t2


def _ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__
