"""Write a (possibly pruned) decoder of any edgeprune family as one ONNX graph with a KV cache, straight from its modules.

Why not `torch.onnx.export`: the dynamo exporter traces the HF code symbolically; on this shared
2-core machine it took ~270 s for SmolLM2-135M (torch.export 31 s, decompositions + translation
94 s, the onnxscript optimizer 140 s; the profile is dominated by sympy shape reasoning, which grows
with the layer count), against a 30 s budget. A decoder layer is a dozen well-known operations, so
we emit them with `onnx.helper`, reading every weight, bias, norm epsilon, the RoPE frequencies, the
attention scale and the embedding scale from the in-memory modules; config.json is read only for
what no module holds (the sliding window, final logit softcapping): ~2-4 s. The graph is checked
against torch at export (see onnx.verify_onnx).

Per layer (Llama, Mistral, Qwen2): RMSNorm -> one MatMul for q|k|v (+ biases) -> RotaryEmbedding
on q and k -> ONNX Attention (opset 23: grouped-query heads, past/present KV cache, additive mask)
-> o_proj -> residual; RMSNorm -> one MatMul for gate|up -> SiLU * up -> down_proj -> residual.
What the family (edgeprune.families) adds:

  qk_norm        q and k viewed as [B, S, H, hd], RMSNorm over hd, before RotaryEmbedding (Qwen3, Gemma 3)
  norm_offset    every RMSNorm scales by (1 + w) (Gemma: the stored weight is w; the graph holds 1 + w)
  post norms     Gemma 3 also normalizes the attention and FFN outputs before each residual add
  activation     GeGLU: Gelu(approximate="tanh") on the gate (opset 20+) instead of SiLU
  embed_scale    the Gather output times sqrt(d) (the table stays unscaled: a tied lm_head reads it)
  sliding layers a second additive mask that also hides keys with q_pos - k_pos >= window, built
                 once and shared by every sliding layer; Gemma 3's sliding layers take their RoPE
                 table from `rotary_emb_local` (another base), its global ones from `rotary_emb`
  attention scale  from the module (Gemma: query_pre_attn_scalar ** -0.5, not hd ** -0.5)
  softcapping    final logits = cap * tanh(logits / cap) when config.final_logit_softcapping is set

Head counts, FFN widths and biases are read per layer from the module shapes, for every family.
The KV cache keeps every position for sliding layers too (the mask hides the old ones), so the
I/O contract is the same for all families.

Weights go to an external data file, written tensor by tensor while the graph is built, so the
export never holds a second in-memory copy of the model (protobuf caps inline models at 2 GB).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgeprune.errors import EdgepruneError

OPSET = 23  # Attention and RotaryEmbedding (ORT 1.32 runs both on CPU); >= 21 for GatherBlockQuantized, >= 20 for Gelu(tanh)
DATA_SUFFIX = "_data"  # model.onnx_data: optimum's name for external weights
_EXTERNAL_MIN_BYTES = 1024  # small constants stay inline so the graph stays readable
_ALIGN = 4096  # page-aligned offsets, as onnx's own writer uses, so runtimes can memory-map them
_NEG = float(np.finfo(np.float32).min)  # finite, so a fully masked (padding) row gives no NaN
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # inv_freq fixed at load time
# The gate activation, by the class of transformers' `mlp.act_fn` (the module is the truth, not
# the config's spelling): silu = x * sigmoid(x); gelu_tanh = GELU with the tanh approximation
# (GELUTanh and NewGELUActivation compute the same formula); gelu = exact (erf) GELU.
_ACTIVATIONS = {
    "SiLUActivation": "silu", "SiLU": "silu",
    "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh", "NewGELUActivation": "gelu_tanh",
    "GELUActivation": "gelu",
}
# Family norm names (edgeprune.families.Family.norms) this graph's block layout places.
_PRE_NORMS = ("attn_norm", "ffn_norm")  # every family: before attention, before the FFN
_POST_NORMS = {"attn": "post_attention_norm", "ffn": "post_ffw_norm"}  # Gemma 3: on each branch's output


@dataclass(frozen=True)
class LayerInfo:
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn: int
    window: int | None = None  # sliding attention: keys with q_pos - k_pos >= window are hidden

    def to_dict(self) -> dict:
        """The shapes (the sidecar lists the windows apart, as attention_windows)."""
        return {"n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads, "head_dim": self.head_dim, "ffn": self.ffn}


@dataclass(frozen=True)
class _Spec:
    """What differs per family, resolved once from the family, the modules and (for what no module
    holds) the config; check_supported builds it, so every refusal happens before a file is written."""

    family: str
    norms: dict  # family norm name -> decoder-layer attribute
    norm_offset: float  # RMSNorm scales by (offset + w)
    qk_norm: bool
    activation: str  # the family's gate activation, for an MLP module without act_fn
    embed_scale: float | None  # Gather output times this (Gemma: sqrt(d)); None: no scaling
    logit_softcap: float | None  # logits = cap * tanh(logits / cap)


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    """optimum's names: ORTModelForCausalLM finds the cache by '.key' / '.value' in them."""
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


class _Builder:
    """Collects nodes and initializers; big initializers are appended to the external data file."""

    def __init__(self, data_path: Path):
        self.data_path = data_path
        self._data = open(data_path, "wb")
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def close(self) -> None:
        self._data.close()

    def weight(self, name: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array)
        if array.nbytes < _EXTERNAL_MIN_BYTES:
            self.inits.append(onnx.numpy_helper.from_array(array, name))
            return name
        pad = -self._data.tell() % _ALIGN
        self._data.write(b"\0" * pad)
        offset = self._data.tell()
        self._data.write(array.tobytes())
        t = onnx.TensorProto(name=name, dims=array.shape, data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.data_path.name), ("offset", str(offset)), ("length", str(array.nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        self.inits.append(t)
        return name

    def const(self, values, dtype=np.int64) -> str:
        self._n += 1
        return self.weight(f"const_{self._n}", np.asarray(values, dtype=dtype))

    def op(self, op_type: str, inputs: list[str], name: str, n_out: int = 1, **attrs):
        outs = [f"{name}/out{k}" if n_out > 1 else f"{name}/out" for k in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, **attrs))
        return outs if n_out > 1 else outs[0]

    def op_outs(self, op_type: str, inputs: list[str], outputs: list[str], name: str, **attrs) -> list[str]:
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, **attrs))
        return outputs

    def op_to(self, op_type: str, inputs: list[str], output: str, name: str, **attrs) -> str:
        """A node writing a graph output under its public name."""
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=name, **attrs))
        return output


def _np(t) -> np.ndarray:
    return t.detach().to("cpu").float().numpy()


def _linear(b: _Builder, x: str, lin, name: str) -> str:
    """x @ W^T (+ bias); W stored transposed [in, out] so quantizers see MatMul(x, initializer)."""
    y = b.op("MatMul", [x, b.weight(f"{name}.weight", _np(lin.weight).T)], f"{name}/MatMul")
    if lin.bias is not None:
        y = b.op("Add", [y, b.weight(f"{name}.bias", _np(lin.bias))], f"{name}/Add")
    return y


def _fused_linear(b: _Builder, x: str, lins: list, name: str) -> list[str]:
    """Several linears of the same input as one MatMul + Split: fewer, larger kernels per token.

    Concatenating along the output axis keeps each column's input blocks, so block-wise
    quantization is unchanged.
    """
    w = np.concatenate([_np(lin.weight) for lin in lins], axis=0).T
    y = b.op("MatMul", [x, b.weight(f"{name}.weight", w)], f"{name}/MatMul")
    if any(lin.bias is not None for lin in lins):
        bias = [_np(lin.bias) if lin.bias is not None else np.zeros(lin.out_features, np.float32) for lin in lins]
        y = b.op("Add", [y, b.weight(f"{name}.bias", np.concatenate(bias))], f"{name}/Add")
    sizes = b.const([lin.out_features for lin in lins])
    return b.op("Split", [y, sizes], f"{name}/Split", n_out=len(lins), axis=-1)


def _rms_norm(b: _Builder, x: str, norm, name: str, offset: float = 0.0) -> str:
    """HF's RMSNorm in fp32: x / sqrt(mean(x^2) + eps) * (offset + w) over the last axis (the
    pattern ORT fuses). Gemma stores w - 1 (offset 1): the initializer holds the effective scale."""
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps")
    weight = _np(norm.weight)
    if offset:
        weight = weight + np.float32(offset)  # as Gemma3RMSNorm: (1.0 + w.float()) in fp32
    sq = b.op("Pow", [x, b.const(2.0, np.float32)], f"{name}/Pow")
    mean = b.op("ReduceMean", [sq, b.const([-1])], f"{name}/ReduceMean", keepdims=1)
    std = b.op("Sqrt", [b.op("Add", [mean, b.const(eps, np.float32)], f"{name}/Add")], f"{name}/Sqrt")
    y = b.op("Div", [x, std], f"{name}/Div")
    return b.op("Mul", [y, b.weight(f"{name}.weight", weight)], f"{name}/Mul")


def _head_norm(b: _Builder, x: str, norm, n_heads: int, hd: int, name: str, offset: float) -> str:
    """Per-head RMSNorm (Qwen3 / Gemma 3 q_norm, k_norm): [B, S, H*hd] -> [B, S, H, hd], normalize
    over hd, back to [B, S, H*hd] for RotaryEmbedding and Attention, which take the 3-D layout."""
    heads = b.op("Reshape", [x, b.const([0, 0, n_heads, hd])], f"{name}/Split")  # 0: copy B and S
    y = _rms_norm(b, heads, norm, name, offset)
    return b.op("Reshape", [y, b.const([0, 0, n_heads * hd])], f"{name}/Merge")


def _layer_norm(b: _Builder, x: str, layer, spec: _Spec, role: str, i: int) -> str:
    attr = spec.norms[role]
    return _rms_norm(b, x, getattr(layer, attr), f"layers.{i}.{attr}", spec.norm_offset)


def _post_norm(b: _Builder, y: str, layer, spec: _Spec, branch: str, i: int) -> str:
    """Gemma 3 normalizes a branch's output before the residual add; other families add it as is."""
    role = _POST_NORMS[branch]
    return _layer_norm(b, y, layer, spec, role, i) if role in spec.norms else y


def _rope_tables(b: _Builder, rotary, name: str = "rope") -> dict:
    """cos/sin [B, S, hd/2] of position_ids * inv_freq, as HF's rotary modules compute them
    (in fp32, times attention_scaling); RotaryEmbedding takes them per token, so any position
    (left padding included) works and there is no maximum length."""
    inv_freq = _np(rotary.inv_freq)
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    pos = b.op("Cast", ["position_ids"], f"{name}/Cast", to=TensorProto.FLOAT)
    pos = b.op("Unsqueeze", [pos, b.const([-1])], f"{name}/Unsqueeze")
    freqs = b.op("Mul", [pos, b.weight(f"{name}.inv_freq", inv_freq)], f"{name}/Mul")
    cos, sin = b.op("Cos", [freqs], f"{name}/Cos"), b.op("Sin", [freqs], f"{name}/Sin")
    if scaling != 1.0:
        cos = b.op("Mul", [cos, b.const(scaling, np.float32)], f"{name}/ScaleCos")
        sin = b.op("Mul", [sin, b.const(scaling, np.float32)], f"{name}/ScaleSin")
    return {"cos": cos, "sin": sin}


def _uses_local_rope(model, layer) -> bool:
    """Gemma 3's sliding layers rotate with `rotary_emb_local` (base rope_local_base_freq), as its
    decoder layer picks by `self_attn.is_sliding`; every other layer uses `rotary_emb`."""
    return bool(getattr(layer.self_attn, "is_sliding", False)) and hasattr(model.model, "rotary_emb_local")


def _layer_ropes(b: _Builder, model) -> list[dict]:
    """Each layer's cos/sin tables: one pair per rotary module in use, computed once and shared."""
    local = [_uses_local_rope(model, layer) for layer in model.model.layers]
    tables = {}
    if not all(local):
        tables[False] = _rope_tables(b, model.model.rotary_emb)
    if any(local):
        tables[True] = _rope_tables(b, model.model.rotary_emb_local, "rope_local")
    return [tables[k] for k in local]


def _mask_biases(b: _Builder, windows: set) -> dict:
    """Additive attention biases [B, 1, S, T], one per attention window in use (None: full):
    0 where key j is visible to query i, else float min.

    Visible = causal (j <= past + i, with past = T - S from the mask length) and not padding
    (attention_mask[b, j] == 1); a sliding window w also needs i - j < w (cache slots, as HF's
    sliding_window_overlay compares them). This is what HF builds from the same two inputs. Each
    bias is built once and shared by all layers of its window.
    """
    total = b.op("Gather", [b.op("Shape", ["attention_mask"], "mask/ShapeT"), b.const(1)], "mask/T", axis=0)
    seq = b.op("Gather", [b.op("Shape", ["input_ids"], "mask/ShapeS"), b.const(1)], "mask/S", axis=0)
    past = b.op("Sub", [total, seq], "mask/Past")
    q_pos = b.op("Range", [past, total, b.const(1)], "mask/QPos")
    k_pos = b.op("Range", [b.const(0), total, b.const(1)], "mask/KPos")
    k2 = b.op("Unsqueeze", [k_pos, b.const([0])], "mask/K2")  # [1, T]
    q2 = b.op("Unsqueeze", [q_pos, b.const([1])], "mask/Q2")  # [S, 1]
    causal = b.op("LessOrEqual", [k2, q2], "mask/Causal")  # [S, T]
    keep = b.op("Cast", ["attention_mask"], "mask/Keep", to=TensorProto.BOOL)
    visible = b.op("And", [causal, b.op("Unsqueeze", [keep, b.const([1])], "mask/Keep3")], "mask/Visible")  # [B, S, T]
    biases = {}
    if None in windows:
        biases[None] = _bias(b, visible, "mask")
    for w in sorted(w for w in windows if w is not None):
        near = b.op("Less", [b.op("Sub", [q2, k2], f"mask_w{w}/Dist"), b.const(w)], f"mask_w{w}/Near")  # [S, T]
        biases[w] = _bias(b, b.op("And", [visible, near], f"mask_w{w}/Visible"), f"mask_w{w}")
    return biases


def _bias(b: _Builder, visible: str, name: str) -> str:
    bias = b.op("Where", [visible, b.const(0.0, np.float32), b.const(_NEG, np.float32)], f"{name}/Where")
    return b.op("Unsqueeze", [bias, b.const([1])], f"{name}/Bias")


def _attention(b: _Builder, x: str, attn, info: LayerInfo, i: int, rope: dict, bias: str, spec: _Spec) -> str:
    """Self-attention with the KV cache: ONNX RotaryEmbedding + Attention (opset 23) on [B, S, H*hd].

    Two fused nodes instead of ~25 primitive ones per layer: at batch 1 a decode step runs ~1,200
    small nodes, and their dispatch overhead rivalled the (int4) matmul time. The scale is the
    module's (Gemma 3: query_pre_attn_scalar ** -0.5, not hd ** -0.5).
    """
    name, hd, n_kv, n_h = f"layers.{i}.self_attn", info.head_dim, info.n_kv_heads, info.n_heads
    q, k, v = _fused_linear(b, x, [attn.q_proj, attn.k_proj, attn.v_proj], f"{name}.qkv_proj")
    if spec.qk_norm:  # before RoPE, as Qwen3 / Gemma 3 apply it
        q = _head_norm(b, q, attn.q_norm, n_h, hd, f"{name}.q_norm", spec.norm_offset)
        k = _head_norm(b, k, attn.k_norm, n_kv, hd, f"{name}.k_norm", spec.norm_offset)
    q = b.op("RotaryEmbedding", [q, rope["cos"], rope["sin"]], f"{name}/QRope", num_heads=n_h)
    k = b.op("RotaryEmbedding", [k, rope["cos"], rope["sin"]], f"{name}/KRope", num_heads=n_kv)
    y = b.op_outs(
        "Attention",
        [q, k, v, bias, f"past_key_values.{i}.key", f"past_key_values.{i}.value"],
        [f"{name}/Attention/out", f"present.{i}.key", f"present.{i}.value"],
        f"{name}/Attention",
        q_num_heads=n_h, kv_num_heads=n_kv, scale=float(getattr(attn, "scaling", 1.0 / np.sqrt(hd))),
    )[0]
    return _linear(b, y, attn.o_proj, f"{name}.o_proj")


def _activation(mlp, default: str = "silu") -> str | None:
    """The graph's name for the gate activation of `mlp` (None: one this graph has no node for)."""
    act = getattr(mlp, "act_fn", None)
    return default if act is None else _ACTIVATIONS.get(type(act).__name__)


def _mlp(b: _Builder, x: str, mlp, i: int, spec: _Spec) -> str:
    """down(act(gate(x)) * up(x)): SwiGLU, or GeGLU (Gemma) with the tanh GELU."""
    name = f"layers.{i}.mlp"
    gate, up = _fused_linear(b, x, [mlp.gate_proj, mlp.up_proj], f"{name}.gate_up_proj")
    kind = _activation(mlp, spec.activation)
    if kind == "silu":
        act = b.op("Mul", [gate, b.op("Sigmoid", [gate], f"{name}/Sigmoid")], f"{name}/SiLU")
    else:  # Gelu (opset 20): one node, which ORT runs as one kernel
        act = b.op("Gelu", [gate], f"{name}/Gelu", approximate="tanh" if kind == "gelu_tanh" else "none")
    hidden = b.op("Mul", [act, up], f"{name}/GateUp")
    return _linear(b, hidden, mlp.down_proj, f"{name}.down_proj")


def _mlp_block(b: _Builder, h: str, layer, info: LayerInfo, i: int, spec: _Spec) -> str:
    """Residual MLP; a zero-width FFN contributes only its down_proj bias (if any; through the
    post-FFN norm for Gemma, which maps a zero output to zero)."""
    if info.ffn == 0:
        bias = layer.mlp.down_proj.bias
        if bias is None:
            return h
        y = _post_norm(b, b.weight(f"layers.{i}.mlp.down_proj.bias", _np(bias)), layer, spec, "ffn", i)
        return b.op("Add", [h, y], f"layers.{i}/MlpBias")
    m = _layer_norm(b, h, layer, spec, "ffn_norm", i)
    y = _post_norm(b, _mlp(b, m, layer.mlp, i, spec), layer, spec, "ffn", i)
    return b.op("Add", [h, y], f"layers.{i}/MlpResidual")


def _decoder_layer(b: _Builder, h: str, layer, info: LayerInfo, i: int, rope: dict, bias: str, spec: _Spec) -> str:
    a = _layer_norm(b, h, layer, spec, "attn_norm", i)
    y = _post_norm(b, _attention(b, a, layer.self_attn, info, i, rope, bias, spec), layer, spec, "attn", i)
    h = b.op("Add", [h, y], f"layers.{i}/AttnResidual")
    return _mlp_block(b, h, layer, info, i, spec)


def _embed(b: _Builder, model, spec: _Spec) -> str:
    """Gather from the unscaled table (a tied lm_head reads the same initializer), then Gemma's
    sqrt(d) as one constant Mul, in fp32 as Gemma3TextScaledWordEmbedding multiplies."""
    b.weight("model.embed_tokens.weight", _np(model.model.embed_tokens.weight))
    h = b.op("Gather", ["model.embed_tokens.weight", "input_ids"], "embed_tokens/Gather", axis=0)
    if spec.embed_scale is not None:
        h = b.op("Mul", [h, b.const(spec.embed_scale, np.float32)], "embed_tokens/Scale")
    return h


def _lm_head(b: _Builder, x: str, model, tied_gemm: bool, softcap: float | None = None) -> str:
    out = "logits" if softcap is None else "lm_head/logits"
    if tied_gemm:
        # Gemm(transB=1) reads the embedding table in place: one copy of the tied weight.
        flat = b.op("Reshape", [x, b.const([-1, model.config.hidden_size])], "lm_head/Flatten")
        y = b.op("Gemm", [flat, "model.embed_tokens.weight"], "lm_head/Gemm", transB=1)
        shape = b.op(
            "Concat", [b.op("Shape", ["input_ids"], "lm_head/Shape"), b.const([model.lm_head.out_features])], "lm_head/OutShape", axis=0
        )
        y = b.op_to("Reshape", [y, shape], out, "lm_head/Reshape")
    else:
        w = b.weight("lm_head.weight", _np(model.lm_head.weight).T)
        y = b.op_to("MatMul", [x, w], out if model.lm_head.bias is None else "lm_head/out", "lm_head/MatMul")
        if model.lm_head.bias is not None:
            y = b.op_to("Add", [y, b.weight("lm_head.bias", _np(model.lm_head.bias))], out, "lm_head/Add")
    if softcap is None:
        return y
    # Gemma's final_logit_softcapping: cap * tanh(logits / cap), as Gemma3ForCausalLM applies it
    capped = b.op("Tanh", [b.op("Div", [y, b.const(softcap, np.float32)], "softcap/Div")], "softcap/Tanh")
    return b.op_to("Mul", [capped, b.const(softcap, np.float32)], "logits", "softcap/Mul")


def _rope_type(rotary) -> str:
    return getattr(rotary, "rope_type", "default")


def check_supported(model) -> _Spec:
    """Refuse (one-line EdgepruneError) what this graph cannot build; return what it will build."""
    from edgeprune.families import family_of

    fam = family_of(model)  # an unknown model_type gets the family module's error
    cfg = model.config
    unplaced = sorted(set(fam.norms) - set(_PRE_NORMS) - set(_POST_NORMS.values()))
    if unplaced or not set(_PRE_NORMS) <= set(fam.norms):
        raise EdgepruneError(f"ONNX export has no block layout for the {fam.name} norms {', '.join(sorted(fam.norms))}")
    if getattr(cfg, "attn_logit_softcapping", None) is not None:
        # ORT's Attention softcap is not checked against HF's (cap before the mask); Gemma 3 leaves it null
        raise EdgepruneError(f"ONNX export does not cap attention logits (config attn_logit_softcapping="
                             f"{cfg.attn_logit_softcapping}); Gemma 3 and the other families leave it null")
    if getattr(cfg, "use_bidirectional_attention", False):
        raise EdgepruneError("ONNX export builds causal decoders, not use_bidirectional_attention models")
    for rotary in (getattr(model.model, "rotary_emb", None), getattr(model.model, "rotary_emb_local", None)):
        if rotary is not None and _rope_type(rotary) not in _STATIC_ROPE:
            raise EdgepruneError(f"ONNX export supports static RoPE ({', '.join(_STATIC_ROPE)}), not rope_type '{_rope_type(rotary)}'")
    for i, layer in enumerate(model.model.layers):
        if _activation(layer.mlp, fam.activation) is None:
            raise EdgepruneError(f"ONNX export supports SiLU and GELU gates, not layer {i}'s {type(layer.mlp.act_fn).__name__}")
        if fam.qk_norm and not (hasattr(layer.self_attn, "q_norm") and hasattr(layer.self_attn, "k_norm")):
            raise EdgepruneError(f"layer {i} has no self_attn.q_norm / k_norm, which the {fam.name} family applies")
    scale = getattr(model.model.embed_tokens, "embed_scale", None)
    if scale is None and fam.embed_scale:
        scale = cfg.hidden_size**0.5
    scale = None if scale is None or float(scale) == 1.0 else float(scale)
    cap = getattr(cfg, "final_logit_softcapping", None)
    return _Spec(fam.name, dict(fam.norms), fam.norm_offset, fam.qk_norm, fam.activation, scale, float(cap) if cap else None)


def _layer_window(model, layer, i: int, family: str) -> int | None:
    """The window a layer attends within (None: full causal), as torch masks it: Qwen2/Qwen3/
    Gemma 3 layers carry their kind (`attention_type`, built from config.layer_types, which
    edgeprune.arch.keep_layers subsets with the layers); Mistral masks every layer with
    config.sliding_window; Llama never slides."""
    cfg = model.config
    kind = getattr(layer, "attention_type", None)
    if kind is None and getattr(cfg, "layer_types", None):
        kind = cfg.layer_types[i]
    if kind is None:
        window = getattr(cfg, "sliding_window", None) if family == "mistral" else None
    elif kind == "full_attention":
        window = None
    elif kind == "sliding_attention":
        window = getattr(cfg, "sliding_window", None)
        if not window:
            raise EdgepruneError(f"layer {i} is a sliding_attention layer but config.sliding_window is {window!r}")
    else:
        raise EdgepruneError(f"ONNX export builds full and sliding attention layers, not layer {i}'s '{str(kind)[:40]}'")
    return int(window) if window else None


def layer_infos(model) -> list[LayerInfo]:
    from edgeprune.arch import head_dim, layer_shapes
    from edgeprune.families import family_of

    hd, family = head_dim(model), family_of(model).name
    infos = [
        LayerInfo(s.n_heads, s.n_kv_heads, hd, s.ffn, _layer_window(model, layer, i, family))
        for i, (s, layer) in enumerate(zip(layer_shapes(model), model.model.layers))
    ]
    for i, info in enumerate(infos):
        if info.n_kv_heads == 0 or info.n_heads == 0 or info.n_heads % info.n_kv_heads:
            raise EdgepruneError(
                f"layer {i} has {info.n_heads} query heads and {info.n_kv_heads} KV heads: ONNX export needs "
                "at least one of each and n_heads divisible by n_kv_heads (drop the layer instead)"
            )
    return infos


def _value_info(name: str, elem, dims) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, dims)


def build_decoder(model, path: Path, quantizable_lm_head: bool = False) -> list[LayerInfo]:
    """Write `model` as `path` (graph) + `path`_data (weights). Returns the per-layer shapes.

    quantizable_lm_head: give the lm_head its own transposed weight and a MatMul even when it is
    tied to the embedding, so the int8/int4 quantizers (which rewrite MatMul(x, initializer))
    cover it; in fp32 a tied head reads the embedding through Gemm(transB) instead (no copy).
    """
    import torch

    spec = check_supported(model)
    infos = layer_infos(model)
    cfg = model.config
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    b = _Builder(Path(str(path) + DATA_SUFFIX))
    try:
        with torch.no_grad():
            h = _embed(b, model, spec)
            ropes = _layer_ropes(b, model)
            biases = _mask_biases(b, {info.window for info in infos})
            for i, (layer, info) in enumerate(zip(model.model.layers, infos)):
                h = _decoder_layer(b, h, layer, info, i, ropes[i], biases[info.window], spec)
            h = _rms_norm(b, h, model.model.norm, "norm", spec.norm_offset)
            _lm_head(b, h, model, tied_gemm=tied and not quantizable_lm_head, softcap=spec.logit_softcap)
    finally:
        b.close()

    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [
        _value_info("input_ids", i64, ["batch_size", "sequence_length"]),
        _value_info("attention_mask", i64, ["batch_size", "total_sequence_length"]),
        _value_info("position_ids", i64, ["batch_size", "sequence_length"]),
    ]
    outputs = [_value_info("logits", f32, ["batch_size", "sequence_length", cfg.vocab_size])]
    for i, info in enumerate(infos):
        for kv in ("key", "value"):
            inputs.append(_value_info(f"past_key_values.{i}.{kv}", f32, ["batch_size", info.n_kv_heads, "past_sequence_length", info.head_dim]))
            outputs.append(_value_info(f"present.{i}.{kv}", f32, ["batch_size", info.n_kv_heads, "total_sequence_length", info.head_dim]))
    graph = helper.make_graph(b.nodes, f"edgeprune_{spec.family}_decoder", inputs, outputs, b.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgeprune")
    proto.ir_version = helper.find_min_ir_version_for(proto.opset_import)  # older runtimes refuse newer IRs
    onnx.save(proto, str(path))
    return infos


def sidecar(infos: list[LayerInfo], dtype: str, extra: dict | None = None) -> dict:
    inputs, outputs = io_names(len(infos))
    return {
        "format": "edgeprune-onnx-decoder",
        "version": 1,
        "dtype": dtype,
        "opset": OPSET,
        "num_layers": len(infos),
        "layers": [info.to_dict() for info in infos],
        "attention_windows": [info.window for info in infos],  # per layer; null: full causal attention
        "inputs": inputs,
        "outputs": outputs,
        **(extra or {}),
    }


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
