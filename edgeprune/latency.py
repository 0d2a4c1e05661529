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

Bytes per weight by dtype (block formats include their scales):

    f32 4        f16 2        q8_0 34/32 (32 int8 + f16 scale)      q4_0 18/32 (32 nibbles + f16 scale)
    q4_k_m       llama.cpp's mix: Q4_K (144 B / 256 = 4.5 bits) for most linears, Q6_K (210 B / 256
                 = 6.56 bits) for attn_v and ffn_down in the layers llama.cpp's `use_more_bits` rule
                 picks (first and last eighth, and every third layer between), Q6_K for the output /
                 tied embedding. K-quants need rows (input dim) % 256 == 0; otherwise llama.cpp falls
                 back to Q5_0 for Q4_K and Q8_0 for Q6_K (SmolLM2's d = 576 would; edgeprune's
                 exporter refuses such K-quant exports instead, see `export_problem`).
    int8         onnxruntime MatMulNBits 8-bit, block 32, symmetric: 32 B + f32 scale = 36 B / 32
    int4         MatMulNBits 4-bit, block 32, symmetric: 16 B + f32 scale = 20 B / 32
                 (exporters/onnx.py's settings: weight-only, accuracy_level 4)

GGUF exports store the tied embedding / lm_head as edgeprune's exporter does: f32, f16 and q8_0 as
the weights; q4_0 keeps it in Q8_0 (the exporter's rule: the output projection is the most
sensitive matrix); q4_k_m uses llama.cpp's quantizer rule, Q6_K (Q8_0 when hidden % 256 != 0).
Override with `head_dtype`. ONNX exports (exporters/onnx.py): fp32 reads a
tied head from the embedding table in place (one copy); int8/int4 give the lm_head its own
quantized MatMul copy; the embedding Gather stays fp32 for int8 and is 4-bit
(GatherBlockQuantized, block 32) for int4.

All constants are per device and per backend; `edgeprune.hostcal` fits them on the host.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Iterable, Sequence

from edgeprune.errors import EdgepruneError

if TYPE_CHECKING:  # edgeprune.arch imports torch; keep `profiles list` fast
    from edgeprune.arch import LayerShape

# Weight dtypes a user can ask for, per export format.
GGUF_DTYPES = ("f32", "f16", "q8_0", "q4_0", "q4_k_m")
ONNX_DTYPES = ("f32", "int8", "int4")  # exporters/onnx.py: fp32, int8, int4
DTYPES = ("f32", "f16", "q8_0", "q4_0", "q4_k_m", "int8", "int4")
BACKENDS = ("llama.cpp", "onnxruntime")
BACKEND_FORMAT = {"llama.cpp": "gguf", "onnxruntime": "onnx"}
KV_DTYPES = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}

# Bytes per weight of each storage type (block formats include their scales).
STORAGE_BYTES = {
    "f32": 4.0,
    "f16": 2.0,
    "q8_0": 34 / 32,
    "q5_0": 22 / 32,
    "q4_0": 18 / 32,
    "q4_k": 144 / 256,
    "q6_k": 210 / 256,
    "int8": 36 / 32,  # MatMulNBits 8-bit, block 32, symmetric: 32 B + f32 scale
    "int4": 20 / 32,  # MatMulNBits 4-bit, block 32, symmetric: 16 B + f32 scale
}
K_QUANT_FALLBACK = {"q4_k": "q5_0", "q6_k": "q8_0"}


def normalize_dtype(name: str) -> str:
    """'Q4_K_M' -> 'q4_k_m'; raises EdgepruneError for names edgeprune does not know."""
    key = str(name).strip().lower().replace("-", "_")
    aliases = {"fp32": "f32", "float32": "f32", "fp16": "f16", "float16": "f16", "q8": "q8_0", "q4": "q4_0",
               "uint8": "int8", "qint8": "int8", "uint4": "int4"}
    key = aliases.get(key, key)
    if key not in DTYPES:
        raise EdgepruneError(f"unknown dtype '{name}': use one of {', '.join(DTYPES)}")
    return key


# --------------------------------------------------------------------------------------------
# Geometry


@dataclass(frozen=True)
class ModelGeometry:
    """Everything the latency model needs to know about a (possibly pruned) Llama-family model.

    `layers` holds the kept decoder layers in order (dropped layers are simply absent). A layer
    with n_heads == 0 has no attention; one with ffn == 0 has no FFN.
    """

    hidden: int
    vocab: int
    head_dim: int
    layers: tuple[LayerShape, ...]
    tied: bool = True
    qkv_bias: bool = False
    name: str = ""

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        for v, what in ((self.hidden, "hidden"), (self.vocab, "vocab"), (self.head_dim, "head_dim")):
            if int(v) <= 0:
                raise EdgepruneError(f"model geometry: {what} must be positive, got {v}")
        for i, s in enumerate(self.layers):
            if s.n_heads < 0 or s.n_kv_heads < 0 or s.ffn < 0:
                raise EdgepruneError(f"model geometry: layer {i} has a negative size ({s})")
            if s.n_kv_heads and s.n_heads % s.n_kv_heads:
                raise EdgepruneError(f"model geometry: layer {i} has {s.n_heads} query heads, not a multiple of {s.n_kv_heads} KV heads")

    # constructors ---------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model, name: str = "") -> "ModelGeometry":
        from edgeprune.arch import head_dim, layer_shapes, layers

        emb = model.model.embed_tokens
        lm_head = getattr(model, "lm_head", None)
        tied = lm_head is None or lm_head.weight is emb.weight or lm_head.weight.data_ptr() == emb.weight.data_ptr()
        first = layers(model)[0].self_attn.q_proj if len(layers(model)) else None
        return cls(
            hidden=emb.embedding_dim,
            vocab=emb.num_embeddings,
            head_dim=head_dim(model),
            layers=tuple(layer_shapes(model)),
            tied=bool(tied),
            qkv_bias=bool(first is not None and first.bias is not None),
            name=name or getattr(model.config, "_name_or_path", "") or "",
        )

    @classmethod
    def from_shapes(cls, layers: Iterable[LayerShape | dict], hidden: int, vocab: int, head_dim: int,
                    tied: bool = True, qkv_bias: bool = False, name: str = "") -> "ModelGeometry":
        from edgeprune.arch import LayerShape

        shapes = tuple(LayerShape(**s) if isinstance(s, dict) else s for s in layers)
        return cls(hidden=int(hidden), vocab=int(vocab), head_dim=int(head_dim), layers=shapes, tied=tied,
                   qkv_bias=qkv_bias, name=name)

    @classmethod
    def uniform(cls, hidden: int, n_layers: int, n_heads: int, n_kv_heads: int, ffn: int, vocab: int,
                head_dim: int | None = None, tied: bool = True, name: str = "") -> "ModelGeometry":
        from edgeprune.arch import LayerShape

        hd = head_dim or hidden // n_heads
        return cls(hidden, vocab, hd, tuple(LayerShape(n_heads, n_kv_heads, ffn) for _ in range(n_layers)), tied, False, name)

    @classmethod
    def smollm2_135m(cls) -> "ModelGeometry":
        """SmolLM2-135M(-Instruct): 30 layers, d 576, FFN 1536, 9 q / 3 kv heads of 64, vocab 49152, tied."""
        return cls.uniform(576, 30, 9, 3, 1536, 49152, head_dim=64, name="SmolLM2-135M")

    # derived sizes --------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def with_layers(self, layers: Iterable[LayerShape], name: str | None = None) -> "ModelGeometry":
        return replace(self, layers=tuple(layers), name=self.name if name is None else name)

    def layer_tensors(self, s: LayerShape) -> list[tuple[str, int, int]]:
        """(role, out_features, in_features) of each linear weight of one layer."""
        d, hd = self.hidden, self.head_dim
        out: list[tuple[str, int, int]] = []
        if s.n_heads:
            out += [("attn_q", s.n_heads * hd, d), ("attn_k", s.n_kv_heads * hd, d),
                    ("attn_v", s.n_kv_heads * hd, d), ("attn_o", d, s.n_heads * hd)]
        if s.ffn:
            out += [("ffn_gate", s.ffn, d), ("ffn_up", s.ffn, d), ("ffn_down", d, s.ffn)]
        return out

    def layer_small_params(self, s: LayerShape) -> int:
        """Norm weights and biases of one layer (kept in f32 by every exporter)."""
        n = 2 * self.hidden
        if s.n_heads and self.qkv_bias:
            n += (s.n_heads + 2 * s.n_kv_heads) * self.head_dim
        if s.attn_out_bias:
            n += self.hidden
        if s.ffn_bias:
            n += self.hidden
        return n

    def param_counts(self) -> dict[str, int]:
        """Same keys as `edgeprune.arch.param_counts`."""
        attn = ffn = norms = 0
        for s in self.layers:
            for role, o, i in self.layer_tensors(s):
                if role.startswith("attn"):
                    attn += o * i
                else:
                    ffn += o * i
            norms += 2 * self.hidden
            if s.n_heads and self.qkv_bias:
                attn += (s.n_heads + 2 * s.n_kv_heads) * self.head_dim
            attn += self.hidden if s.attn_out_bias else 0
            ffn += self.hidden if s.ffn_bias else 0
        norms += self.hidden
        emb = self.vocab * self.hidden
        head = 0 if self.tied else emb
        return {"embedding": emb, "lm_head_untied": head, "attention": attn, "ffn": ffn, "norms": norms,
                "linear": attn + ffn, "total": emb + head + attn + ffn + norms}

    def linear_params(self) -> int:
        return sum(o * i for s in self.layers for _, o, i in self.layer_tensors(s))

    def attn_width(self) -> int:
        """sum over layers of n_heads * head_dim (attention FLOPs scale with it)."""
        return sum(s.n_heads for s in self.layers) * self.head_dim

    def kv_elements_per_token(self) -> int:
        """K and V elements cached per token of context, all layers."""
        return 2 * sum(s.n_kv_heads for s in self.layers) * self.head_dim

    def to_dict(self) -> dict:
        return {"name": self.name, "hidden": self.hidden, "vocab": self.vocab, "head_dim": self.head_dim,
                "tied": self.tied, "qkv_bias": self.qkv_bias, "n_layers": self.n_layers,
                "layers": [s.to_dict() for s in self.layers]}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelGeometry":
        return cls.from_shapes(d["layers"], d["hidden"], d["vocab"], d["head_dim"], d.get("tied", True),
                               d.get("qkv_bias", False), d.get("name", ""))


# --------------------------------------------------------------------------------------------
# Bytes


def _use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's rule for the Q4_K_M layers whose attn_v / ffn_down get Q6_K (described, not copied)."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _k_quant(kind: str, in_features: int) -> str:
    return kind if in_features % 256 == 0 else K_QUANT_FALLBACK[kind]


def head_storage(dtype: str, backend: str, hidden: int) -> str:
    """Storage type of the output projection (the tied embedding in GGUF) for an export dtype."""
    if backend == "onnxruntime":
        return dtype
    if dtype in ("f32", "f16", "q8_0"):
        return dtype
    if dtype == "q4_0":
        return "q8_0"  # exporters/gguf.py keeps token_embd / output in Q8_0 for q4_0
    return "q6_k" if hidden % 256 == 0 else "q8_0"  # llama.cpp's quantizer for K-quant ftypes


def tensor_storage(dtype: str, backend: str, role: str, layer: int, n_layers: int, in_features: int) -> str:
    """Storage type of one linear weight of a decoder layer."""
    if dtype != "q4_k_m":
        return dtype
    if role in ("attn_v", "ffn_down") and _use_more_bits(layer, n_layers):
        return _k_quant("q6_k", in_features)
    return _k_quant("q4_k", in_features)


def _tensor_bytes(storage: str, out_f: int, in_f: int) -> float:
    return out_f * in_f * STORAGE_BYTES[storage]


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


def byte_counts(geometry: ModelGeometry, dtype: str, backend: str = "llama.cpp", kv_dtype: str = "f16",
                head_dtype: str | None = None) -> ByteCounts:
    dtype = normalize_dtype(dtype)
    if backend not in BACKENDS:
        raise EdgepruneError(f"unknown backend '{backend}': use one of {', '.join(BACKENDS)}")
    g = geometry
    storage: dict[str, int] = {}
    layer_bytes = 0.0
    n = g.n_layers
    for i, s in enumerate(g.layers):
        for role, o, inf in g.layer_tensors(s):
            st = tensor_storage(dtype, backend, role, i, n, inf)
            storage[st] = storage.get(st, 0) + 1
            layer_bytes += _tensor_bytes(st, o, inf)
    small = 4.0 * (sum(g.layer_small_params(s) for s in g.layers) + g.hidden)
    head_st = normalize_dtype(head_dtype) if head_dtype else head_storage(dtype, backend, g.hidden)
    head_st = "q6_k" if head_st == "q4_k_m" else head_st
    head = _tensor_bytes(head_st, g.vocab, g.hidden)
    storage[head_st] = storage.get(head_st, 0) + 1
    if backend == "llama.cpp":
        # GGUF: token_embd is the head when tied (stored once); untied embeddings use the weight dtype
        emb_st = head_st if g.tied else {"q4_0": "q8_0", "q4_k_m": _k_quant("q4_k", g.hidden)}.get(dtype, dtype)
        emb_stored = 0.0 if g.tied else _tensor_bytes(emb_st, g.vocab, g.hidden)
    else:
        # ONNX: the Gather table is fp32 (int4: 4-bit GatherBlockQuantized); a quantized head is a second copy
        emb_st = "int4" if dtype == "int4" else "f32"
        shared = g.tied and dtype == "f32" and head_dtype is None  # fp32 Gemm reads the table in place
        emb_stored = 0.0 if shared else _tensor_bytes(emb_st, g.vocab, g.hidden)
    emb_row = _tensor_bytes(emb_st, 1, g.hidden)
    kv = g.kv_elements_per_token() * KV_DTYPES[kv_dtype]
    return ByteCounts(layer_bytes, small, head, emb_row, emb_stored, kv, storage)


def export_problem(geometry: ModelGeometry, dtype: str) -> str | None:
    """Why `geometry` cannot be exported as GGUF `dtype` (block sizes), or None when it can.

    Quantized rows (a weight's input dimension: hidden, n_heads * head_dim, ffn) must be whole
    blocks: 32 for q8_0/q4_0, 256 for K-quants (exporters/gguf.py refuses otherwise). Lets the
    fit skip dtypes without building the model.
    """
    dtype = normalize_dtype(dtype)
    block = {"q8_0": 32, "q4_0": 32, "q4_k_m": 256}.get(dtype)
    if block is None:
        return None
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
        return float(self.dtype_bandwidth_gbps.get(dtype, self.bandwidth_gbps))

    def compute_for(self, dtype: str) -> float:
        c = self.compute_gops.get(dtype)
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
            head_dtype: str | None = None) -> Prediction:
    """Predict decode speed, prefill/TTFT and memory of `geometry` exported as `dtype`.

    prompt_tokens: prefill length (TTFT) and, unless `decode_pos` says otherwise, the number of
    tokens in the cache when decode is timed. context: tokens the KV cache is allocated for.
    runtime_overhead: fixed bytes of runtime buffers (profile `[memory] runtime_overhead`).
    """
    dtype = normalize_dtype(dtype)
    c = constants
    if c.bandwidth_gbps <= 0:
        raise EdgepruneError("latency constants: bandwidth_gbps must be positive")
    bc = byte_counts(geometry, dtype, c.backend, c.kv_dtype, head_dtype)
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
                        prompt_tokens: int | None = None, context: int | None = None) -> Prediction:
    """`predict` with the profile's constants, default dtype, target prompt length and memory context."""
    return predict(geometry, dtype or profile.export.default_dtype, profile.latency,
                   prompt_tokens=prompt_tokens or profile.targets.prompt_tokens,
                   context=context or profile.memory.context,
                   runtime_overhead=profile.memory.runtime_overhead)


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
        return f"{self.name} {_fmt(self.name, self.value)} {op} {_fmt(self.name, self.limit)}: {'ok' if self.ok else 'MISSED'}"

    def to_dict(self) -> dict:
        return {"name": self.name, "value": self.value, "limit": self.limit, "kind": self.kind, "ok": self.ok,
                "margin": self.margin}


def _fmt(name: str, v: float) -> str:
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


def pruned_geometry(geometry: ModelGeometry, ffn_keep: float = 1.0, drop_layers: Sequence[int] = (),
                    align: int = 32, name: str | None = None) -> ModelGeometry:
    """Uniformly narrowed FFNs (keep ratio, rounded to `align`) without the layers in `drop_layers`.

    A what-if helper for reports and tests; real candidates come from the pruning plan.
    """
    drop = set(drop_layers)
    out = []
    for i, s in enumerate(geometry.layers):
        if i in drop:
            continue
        w = max(align, int(round(s.ffn * ffn_keep / align)) * align) if s.ffn else 0
        out.append(replace(s, ffn=min(w, s.ffn)))
    label = name or f"{geometry.name or 'model'} ffn x{ffn_keep:g}" + (f" -{len(drop)} layers" if drop else "")
    return geometry.with_layers(out, label)
