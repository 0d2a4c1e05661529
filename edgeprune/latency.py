"""Analytic latency and memory model for batch-1 LLM inference on edge devices.

The model is a roofline with fixed overheads, evaluated from a model's *shape* only (no weights),
so the fit search can score thousands of candidate prunings without building them.

Decode (one token, memory-bound on every device edgeprune targets)::

    decode_s = (W_token + KV_token * pos) / bw_eff  +  n_layers * t_layer  +  t_token

    W_token   bytes of weights read for one token: every linear weight of every layer, the whole
              lm_head (for tied embeddings that is the full embedding matrix), ONE row of the
              input embedding, the norms and biases;
    KV_token  bytes of K and V cache per token of context (2 * sum_l n_kv_l * head_dim * kv bytes);
    pos       tokens already in the cache (the prompt length when decode starts);
    bw_eff    effective memory bandwidth (profile `[latency] bandwidth_gbps`, or per export dtype
              `[latency.dtype_bandwidth_gbps]`; measured, never the datasheet peak);
    t_layer   per-layer fixed cost (thread barriers, norms, rope, softmax, kernel launches);
    t_token   per-token fixed cost (sampling, logits copy, graph setup).

Prefill (P prompt tokens, compute-bound)::

    prefill_s = max(F / C[dtype], W_prefill / bw_eff)  +  n_layers * P * t_layer_token  +  t_prefill

    F         2 * P * (linear params of all layers)                 matmuls
              + 2 * (head params) * (1 or P)                         lm_head: llama.cpp computes
                                                                     logits for the last token only;
                                                                     an ONNX graph usually for all P
              + 2 * P * (P + 1) * sum_l n_heads_l * head_dim          causal attention (QK^T and AV;
                                                                     an ONNX graph computes the masked
                                                                     half too: absorbed by its C)
    C[dtype]  effective compute, GOPS, per weight dtype (profile `[latency.compute_gops]`);
    W_prefill bytes of every weight touched once;
    t_layer_token  non-matmul work per layer per prompt token (norms, rope, activations, softmax):
              prefill time is linear in P for these models (measured: 16 to 512 tokens on llama.cpp),
              so the per-layer cost scales with P rather than being a per-call constant;
    t_prefill fixed cost per prefill call.

    ttft_s = prefill_s   (the prefill produces the first token's logits; sampling is in t_prefill)

Memory (what the process needs, compared with the profile's budget)::

    weights   bytes of every stored tensor (tied embeddings stored once in GGUF)
    kv_cache  KV_token * context   (runtimes allocate the whole context up front)
    buffers   runtime_overhead (profile)  +  4 B * batch * (4 * hidden + 2 * max_ffn
              + max_heads * context)  +  4 B * vocab * n_logits        (estimate of compute buffers)

Bytes per weight come from `edgeprune.dtypes` (block formats include their scales). A GGUF dtype is
llama.cpp's mix: `edgeprune.mix` says which storage type its quantizer writes for each tensor (role
rules, the output projection in Q6_K or Q8_0, row-length fallbacks such as Q4_K -> Q5_0 for rows
that are not whole 256-blocks), so the bytes are those really written; `head_dtype` overrides the
output projection (the tied embedding in GGUF), as fit's mixed-precision candidates do. ONNX
exports (exporters/onnx.py): MatMulNBits int8/int4 (block 32) for every linear; fp32 reads a tied
head from the embedding table in place (one copy); int8/int4 give the lm_head its own quantized
MatMul copy; the embedding Gather stays fp32 for int8 and is 4-bit (GatherBlockQuantized) for int4.

All constants are per device and per backend; `edgeprune measure-host` (edgeprune.hostperf) fits them on the host.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from edgeprune.errors import EdgepruneError

from edgeprune import dtypes, mix
from edgeprune.dtypes import BACKEND_FORMAT, BACKENDS
from edgeprune.geometry import ModelGeometry


def normalize_dtype(name: str, backend: str | None = None) -> str:
    """The export dtype `name` in the format `backend` runs (any format when None)."""
    return dtypes.normalize(name, BACKEND_FORMAT[backend] if backend in BACKEND_FORMAT else None)


# --------------------------------------------------------------------------------------------
# Bytes


def _tensor_bytes(storage: str, out_f: int, in_f: int) -> float:
    return dtypes.tensor_bytes(storage, out_f, in_f)


@dataclass
class ByteCounts:
    """Bytes by part for one (geometry, dtype, backend)."""

    layers: float  # linear weights of all decoder layers
    small: float  # norms and biases (f32)
    head: float  # the output projection, read whole every decoded token
    embedding_row: float  # one row of the input embedding, read per token
    embedding_stored: float  # the input embedding as stored (0 when it is the head, GGUF tied)
    kv_per_token: float  # K+V bytes per token of context
    storage: dict = field(default_factory=dict)  # storage type -> count of tensors

    @property
    def read_per_token(self) -> float:
        return self.layers + self.small + self.head + self.embedding_row

    @property
    def stored(self) -> float:
        return self.layers + self.small + self.head + self.embedding_stored


_GGUF_ROLE = {"attn_o": "attn_output"}


def gguf_tensors(g: ModelGeometry) -> list[tuple[str, int | None, int, int]]:
    """(role, layer, rows, row length) of every 2-D weight of a GGUF of `g` (edgeprune.mix's input)."""
    out = [("token_embd", None, g.vocab, g.hidden)] + ([] if g.tied else [("output", None, g.vocab, g.hidden)])
    for i, s in enumerate(g.layers):
        out += [(_GGUF_ROLE.get(role, role), i, o, inf) for role, o, inf in g.layer_tensors(s)]
    return out


def byte_counts(geometry: ModelGeometry, dtype: str, backend: str = "llama.cpp", kv_dtype: str = "f16",
                head_dtype: str | None = None, imatrix: bool = False) -> ByteCounts:
    """Bytes of `geometry` exported as `dtype`. GGUF: the storage types llama.cpp's quantizer really
    writes per tensor (edgeprune.mix: its role rules and row fallbacks), `head_dtype` overriding the
    output projection; `imatrix` says whether an importance matrix is given (it changes some rules)."""
    if backend not in BACKENDS:
        raise EdgepruneError(f"unknown backend '{backend}': use one of {', '.join(BACKENDS)}")
    dtype = normalize_dtype(dtype, backend)
    g = geometry
    small = 4.0 * (sum(g.layer_small_params(s) for s in g.layers) + g.hidden)
    kv = g.kv_elements_per_token() * dtypes.KV_BYTES[kv_dtype]
    storage: dict[str, int] = {}
    if backend == "llama.cpp":
        tensors = gguf_tensors(g)
        overrides = mix.output_override(dtypes.get(head_dtype).base if head_dtype else None)
        n_gqa = next((s.n_heads // s.n_kv_heads for s in g.layers[:1] if s.n_kv_heads), 1)
        types = mix.tensor_types(dtype, tensors, g.tied, overrides, imatrix, n_layers=g.n_layers, n_gqa=n_gqa)
        part = {"layers": 0.0, "head": 0.0, "embd": 0.0}
        for role, layer, rows, row in tensors:
            st = types[mix.tensor_name(role, layer)]
            storage[st] = storage.get(st, 0) + 1
            key = "layers" if layer is not None else ("head" if role == "output" or g.tied else "embd")
            part[key] += _tensor_bytes(st, rows, row)
        # tied: token_embd is the head, stored once; its rows are read as the input embedding too
        emb_st = types["token_embd.weight"]
        emb_stored = part["embd"]
        return ByteCounts(part["layers"], small, part["head"], _tensor_bytes(emb_st, 1, g.hidden), emb_stored, kv, storage)
    # ONNX (exporters/onnx.py): MatMulNBits for every linear; the Gather table is fp32 (int4: 4-bit
    # GatherBlockQuantized); a quantized head is a second copy beside it
    base = dtypes.get(dtype).base
    layer_bytes = 0.0
    for s in g.layers:
        for _, o, inf in g.layer_tensors(s):
            storage[base] = storage.get(base, 0) + 1
            layer_bytes += _tensor_bytes(base, o, inf)
    head_st = dtypes.get(head_dtype).base if head_dtype else base
    head = _tensor_bytes(head_st, g.vocab, g.hidden)
    storage[head_st] = storage.get(head_st, 0) + 1
    emb_st = base if base.startswith("int4") else "f32"  # int4 dtypes quantize the Gather table too
    shared = g.tied and dtype == "fp32" and head_dtype is None  # fp32 Gemm reads the table in place
    emb_stored = 0.0 if shared else _tensor_bytes(emb_st, g.vocab, g.hidden)
    return ByteCounts(layer_bytes, small, head, _tensor_bytes(emb_st, 1, g.hidden), emb_stored, kv, storage)


def speed_bound(geometry: ModelGeometry, dtype: str, backend: str = "llama.cpp", head_dtype: str | None = None,
                context: int = 512) -> dict:
    """What a decoded token reads, by part: the decoder layers (what pruning shrinks) against the
    output projection and embedding row (what it never shrinks) and the KV cache at `context`."""
    b = byte_counts(geometry, dtype, backend, head_dtype=head_dtype)
    parts = {"decoder_layers": b.layers + b.small, "output_projection": b.head, "embedding_row": b.embedding_row,
             "kv_cache": b.kv_per_token * context}
    total = sum(parts.values())
    share = {k: v / total for k, v in parts.items()}
    bound = max(share, key=share.get)
    return {"bytes": parts, "share": share, "bound": bound,
            "says": f"{share['decoder_layers']:.0%} of the bytes a decoded token reads are decoder layers, "
                    f"{share['output_projection'] + share['embedding_row']:.0%} the (never pruned) output projection and "
                    f"embedding row, {share['kv_cache']:.0%} the KV cache at {context} tokens"}


def export_problem(geometry: ModelGeometry, dtype: str) -> str | None:
    """Why `geometry` cannot be exported as GGUF `dtype` (block sizes), or None when it can.

    Quantized rows (a weight's input dimension: hidden, n_heads * head_dim, ffn) must be whole
    blocks of 32 for every quantized type. K-quant mixes are fine at any multiple of 32: llama.cpp
    falls back per tensor (Q4_K -> Q5_0, Q6_K -> Q8_0, ...) and the byte counts follow the fallback.
    Lets the fit skip dtypes without building the model.
    """
    if not dtypes.get(dtype, "gguf").quantized:
        return None
    block = 32
    rows = {"hidden": geometry.hidden}
    for i, s in enumerate(geometry.layers):
        if s.n_heads:
            rows[f"layer {i} attention output ({s.n_heads} heads x {geometry.head_dim})"] = s.n_heads * geometry.head_dim
        if s.ffn:
            rows[f"layer {i} FFN"] = s.ffn
    for what, n in rows.items():
        if n % block:
            return f"{dtype} needs rows that are multiples of {block}; {what} is {n}"
    return None


# --------------------------------------------------------------------------------------------
# Prediction


@dataclass(frozen=True)
class LatencyConstants:
    """The `[latency]` section of a profile: effective rates and fixed overheads of one backend."""

    backend: str
    bandwidth_gbps: float  # effective decode bandwidth, 1e9 bytes/s
    compute_gops: dict  # dtype -> effective prefill compute, 1e9 ops/s
    layer_overhead_ms: float = 0.0  # per decoder layer per decoded token
    token_overhead_ms: float = 0.0  # per decoded token
    prefill_layer_token_overhead_ms: float = 0.0  # per decoder layer per prompt token
    prefill_overhead_ms: float = 0.0  # per prefill call
    kv_dtype: str = "f16"
    prefill_logits: str = "last"  # "last" (llama.cpp) or "all" (ONNX graphs without slicing)
    dtype_bandwidth_gbps: dict = field(default_factory=dict)  # optional per-dtype decode bandwidth

    def bandwidth_for(self, dtype: str) -> float:
        """Effective decode bandwidth for an export dtype: dequantizing kernels differ (on one x86
        thread q4_0 streams at 8.4 GB/s where q8_0 reaches 10.8), so a profile may set it per dtype."""
        key = next((k for k in dtypes.rate_keys(dtype) if k in self.dtype_bandwidth_gbps), None)
        return float(self.dtype_bandwidth_gbps[key] if key else self.bandwidth_gbps)

    def compute_for(self, dtype: str) -> float:
        """Prefill GOPS for `dtype`, or for the nearest measured kernel family (dtypes.RATE_LIKE)."""
        key = next((k for k in dtypes.rate_keys(dtype) if k in self.compute_gops), None)
        c = self.compute_gops.get(key) if key else None
        if c is None:
            raise EdgepruneError(
                f"the profile has no compute rate for dtype {dtype} ([latency.compute_gops] has "
                f"{', '.join(sorted(self.compute_gops)) or 'nothing'}): add '{dtype} = <GOPS>' or pick another dtype")
        return float(c)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class MemoryBreakdown:
    weights: float
    kv_cache: float
    buffers: float

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache + self.buffers

    def to_dict(self) -> dict:
        return {"weights": int(self.weights), "kv_cache": int(self.kv_cache), "buffers": int(self.buffers),
                "total": int(self.total)}


@dataclass
class Prediction:
    dtype: str
    backend: str
    prompt_tokens: int
    context: int
    decode_pos: int
    decode_ms_per_token: float
    decode_tok_s: float
    prefill_s: float
    ttft_s: float
    memory: MemoryBreakdown
    bytes_per_token: float
    prefill_bound: str  # "compute" or "bandwidth"
    terms: dict  # every term of the formulas, in ms, for explanations

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else math.inf

    @property
    def memory_bytes(self) -> float:
        return self.memory.total

    def describe(self) -> str:
        """Three lines with every term of the formulas (for `fit`/`predict` output)."""
        t = self.terms
        return (
            f"decode {self.decode_tok_s:.1f} tok/s = 1 / ({t['decode_bytes_ms']:.2f} ms bytes "
            f"[{t['weights_read_bytes'] / 1e6:.1f} MB weights + {t['decode_kv_bytes'] / 1e6:.1f} MB KV] + "
            f"{t['decode_layers_ms']:.2f} ms layers + {t['decode_token_ms']:.2f} ms token)\n"
            f"prefill/TTFT {self.prefill_s:.3f} s for {self.prompt_tokens} tokens = max({t['prefill_compute_ms']:.0f} ms compute "
            f"[{t['prefill_gflop']:.1f} GFLOP], {t['prefill_read_ms']:.0f} ms read) + {t['prefill_layers_ms']:.0f} ms layers + "
            f"{t['prefill_fixed_ms']:.0f} ms fixed\n"
            f"memory {self.memory.total / 1e6:.1f} MB = {self.memory.weights / 1e6:.1f} weights + "
            f"{self.memory.kv_cache / 1e6:.1f} KV ({self.context} tokens) + {self.memory.buffers / 1e6:.1f} buffers"
        )

    def to_dict(self) -> dict:
        return {"dtype": self.dtype, "backend": self.backend, "prompt_tokens": self.prompt_tokens,
                "context": self.context, "decode_pos": self.decode_pos,
                "decode_ms_per_token": self.decode_ms_per_token, "decode_tok_s": self.decode_tok_s,
                "prefill_s": self.prefill_s, "prefill_tok_s": self.prefill_tok_s, "ttft_s": self.ttft_s,
                "memory": self.memory.to_dict(), "bytes_per_token": int(self.bytes_per_token),
                "prefill_bound": self.prefill_bound, "terms": dict(self.terms)}


def decode_features(geometry: ModelGeometry, bytes_: ByteCounts, pos: int) -> tuple[float, int]:
    """(bytes read for one decoded token at cache position `pos`, layers): the regressors of the decode fit."""
    return bytes_.read_per_token + bytes_.kv_per_token * pos, geometry.n_layers


def prefill_flops(geometry: ModelGeometry, prompt_tokens: int, logits: str = "last") -> float:
    p = int(prompt_tokens)
    head_rows = p if logits == "all" else 1
    return (2.0 * p * geometry.linear_params()
            + 2.0 * geometry.vocab * geometry.hidden * head_rows
            + 2.0 * p * (p + 1) * geometry.attn_width())


def predict(geometry: ModelGeometry, dtype: str, constants: LatencyConstants, prompt_tokens: int = 512,
            context: int = 2048, decode_pos: int | None = None, runtime_overhead: float = 0.0,
            head_dtype: str | None = None, imatrix: bool = False) -> Prediction:
    """Predict decode speed, prefill/TTFT and memory of `geometry` exported as `dtype`.

    prompt_tokens: prefill length (TTFT) and, unless `decode_pos` says otherwise, the number of
    tokens in the cache when decode is timed. context: tokens the KV cache is allocated for.
    runtime_overhead: fixed bytes of runtime buffers (profile `[memory] runtime_overhead`).
    """
    dtype = normalize_dtype(dtype, constants.backend)
    c = constants
    if c.bandwidth_gbps <= 0:
        raise EdgepruneError("latency constants: bandwidth_gbps must be positive")
    bc = byte_counts(geometry, dtype, c.backend, c.kv_dtype, head_dtype, imatrix)
    pos = prompt_tokens if decode_pos is None else int(decode_pos)
    bw = c.bandwidth_for(dtype) * 1e9
    L = geometry.n_layers

    # decode
    read = bc.read_per_token + bc.kv_per_token * pos
    t_bytes = read / bw
    t_layers = L * c.layer_overhead_ms / 1e3
    t_tok = c.token_overhead_ms / 1e3
    decode_s = t_bytes + t_layers + t_tok

    # prefill
    flops = prefill_flops(geometry, prompt_tokens, c.prefill_logits)
    t_compute = flops / (c.compute_for(dtype) * 1e9)
    t_read = (bc.stored + bc.kv_per_token * prompt_tokens) / bw
    t_pl = L * prompt_tokens * c.prefill_layer_token_overhead_ms / 1e3
    t_p0 = c.prefill_overhead_ms / 1e3
    prefill_s = max(t_compute, t_read) + t_pl + t_p0

    # memory
    batch = prompt_tokens if c.backend == "onnxruntime" else min(prompt_tokens, 512)
    n_logits = prompt_tokens if c.prefill_logits == "all" else 1
    max_ffn = max((s.ffn for s in geometry.layers), default=0)
    max_heads = max((s.n_heads for s in geometry.layers), default=0)
    compute_buf = 4.0 * batch * (4 * geometry.hidden + 2 * max_ffn + max_heads * context) + 4.0 * geometry.vocab * n_logits
    mem = MemoryBreakdown(bc.stored, bc.kv_per_token * context, runtime_overhead + compute_buf)

    terms = {"decode_bytes_ms": t_bytes * 1e3, "decode_layers_ms": t_layers * 1e3, "decode_token_ms": t_tok * 1e3,
             "decode_kv_bytes": bc.kv_per_token * pos, "weights_read_bytes": bc.read_per_token,
             "head_bytes": bc.head, "prefill_compute_ms": t_compute * 1e3, "prefill_read_ms": t_read * 1e3,
             "prefill_layers_ms": t_pl * 1e3, "prefill_fixed_ms": t_p0 * 1e3, "prefill_gflop": flops / 1e9}
    return Prediction(dtype=dtype, backend=c.backend, prompt_tokens=int(prompt_tokens), context=int(context),
                      decode_pos=pos, decode_ms_per_token=decode_s * 1e3, decode_tok_s=1.0 / decode_s,
                      prefill_s=prefill_s, ttft_s=prefill_s, memory=mem, bytes_per_token=read,
                      prefill_bound="compute" if t_compute >= t_read else "bandwidth", terms=terms)


def predict_for_profile(geometry: ModelGeometry, profile, dtype: str | None = None,
                        prompt_tokens: int | None = None, context: int | None = None,
                        head_dtype: str | None = None, imatrix: bool = False) -> Prediction:
    """`predict` with the profile's constants, default dtype, target prompt length and memory context."""
    return predict(geometry, dtype or profile.export.default_dtype, profile.latency,
                   prompt_tokens=prompt_tokens or profile.targets.prompt_tokens,
                   context=context or profile.memory.context,
                   runtime_overhead=profile.memory.runtime_overhead, head_dtype=head_dtype, imatrix=imatrix)


# --------------------------------------------------------------------------------------------
# Targets


@dataclass
class Check:
    name: str  # "decode_tok_s", "ttft_s", "memory_bytes"
    value: float
    limit: float
    kind: str  # "min" or "max"

    @property
    def ok(self) -> bool:
        return self.value >= self.limit if self.kind == "min" else self.value <= self.limit

    @property
    def margin(self) -> float:
        """Relative slack: positive when met (0.1 = 10% better than the limit), negative when missed."""
        if self.kind == "min":
            return self.value / self.limit - 1.0
        return 1.0 - self.value / self.limit

    def describe(self) -> str:
        op = ">=" if self.kind == "min" else "<="
        return f"{self.name} {format_value(self.name, self.value)} {op} {format_value(self.name, self.limit)}: {'ok' if self.ok else 'MISSED'}"

    def to_dict(self) -> dict:
        return {"name": self.name, "value": self.value, "limit": self.limit, "kind": self.kind, "ok": self.ok,
                "margin": self.margin}


def format_value(name: str, v: float) -> str:
    """A target value in its unit: MB, s or tok/s."""
    if name == "memory_bytes":
        return f"{v / 1e6:.1f} MB"
    if name == "ttft_s":
        return f"{v:.3f} s"
    return f"{v:.1f} tok/s"


@dataclass
class TargetCheck:
    checks: list

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failures(self) -> list:
        return [c for c in self.checks if not c.ok]

    def describe(self) -> str:
        return "; ".join(c.describe() for c in self.checks)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "checks": [c.to_dict() for c in self.checks]}


def check_targets(prediction: Prediction, targets, memory_budget: float | None = None) -> TargetCheck:
    """Compare a prediction with a profile's `[targets]` (and the `[memory]` budget, if given).

    `targets` needs attributes decode_tok_s_min, ttft_max_s, memory_max (any may be None).
    The memory limit is the smaller of targets.memory_max and memory_budget.
    """
    checks = []
    if getattr(targets, "decode_tok_s_min", None):
        checks.append(Check("decode_tok_s", prediction.decode_tok_s, float(targets.decode_tok_s_min), "min"))
    if getattr(targets, "ttft_max_s", None):
        checks.append(Check("ttft_s", prediction.ttft_s, float(targets.ttft_max_s), "max"))
    limits = [x for x in (getattr(targets, "memory_max", None), memory_budget) if x]
    if limits:
        checks.append(Check("memory_bytes", prediction.memory.total, float(min(limits)), "max"))
    return TargetCheck(checks)


def check_profile(geometry: ModelGeometry, profile, dtype: str | None = None) -> tuple[Prediction, TargetCheck]:
    """Predict `geometry` on `profile` (default dtype, target prompt, memory context) and check its targets."""
    pred = predict_for_profile(geometry, profile, dtype)
    return pred, check_targets(pred, profile.targets, profile.memory.budget)
