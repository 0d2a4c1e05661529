"""Write a (possibly pruned) Llama decoder as one ONNX graph with a KV cache, straight from its modules.

Why not `torch.onnx.export`: the dynamo exporter traces the HF code symbolically; on this shared
2-core machine it took ~270 s for SmolLM2-135M (torch.export 31 s, decompositions + translation
94 s, the onnxscript optimizer 140 s; the profile is dominated by sympy shape reasoning, which grows
with the layer count), against a 30 s budget. A Llama decoder layer is a dozen well-known
operations, so we emit them with `onnx.helper`, reading every weight, bias, norm epsilon and the
RoPE frequencies from the in-memory modules (nothing is rebuilt from config.json): ~2-4 s. The
graph is checked against torch at export (see onnx.verify_onnx).

Per layer: RMSNorm -> one MatMul for q|k|v -> RotaryEmbedding on q and k -> ONNX Attention
(opset 23: grouped-query heads, past/present KV cache, additive mask) -> o_proj -> residual;
RMSNorm -> one MatMul for gate|up -> SiLU * up -> down_proj -> residual. Head counts, FFN widths
and biases are read per layer from the module shapes.

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

OPSET = 23  # Attention and RotaryEmbedding (ORT 1.32 runs both on CPU); >= 21 for GatherBlockQuantized
DATA_SUFFIX = "_data"  # model.onnx_data: optimum's name for external weights
_EXTERNAL_MIN_BYTES = 1024  # small constants stay inline so the graph stays readable
_ALIGN = 4096  # page-aligned offsets, as onnx's own writer uses, so runtimes can memory-map them
_NEG = float(np.finfo(np.float32).min)  # finite, so a fully masked (padding) row gives no NaN
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # inv_freq fixed at load time


@dataclass(frozen=True)
class LayerInfo:
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn: int

    def to_dict(self) -> dict:
        return {"n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads, "head_dim": self.head_dim, "ffn": self.ffn}


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


def _rms_norm(b: _Builder, x: str, norm, name: str) -> str:
    """HF LlamaRMSNorm in fp32: x / sqrt(mean(x^2) + eps) * w (the pattern ORT fuses)."""
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps")
    sq = b.op("Pow", [x, b.const(2.0, np.float32)], f"{name}/Pow")
    mean = b.op("ReduceMean", [sq, b.const([-1])], f"{name}/ReduceMean", keepdims=1)
    std = b.op("Sqrt", [b.op("Add", [mean, b.const(eps, np.float32)], f"{name}/Add")], f"{name}/Sqrt")
    y = b.op("Div", [x, std], f"{name}/Div")
    return b.op("Mul", [y, b.weight(f"{name}.weight", _np(norm.weight))], f"{name}/Mul")


def _rope_tables(b: _Builder, rotary) -> dict:
    """cos/sin [B, S, hd/2] of position_ids * inv_freq, as HF's LlamaRotaryEmbedding computes them
    (in fp32, times attention_scaling); RotaryEmbedding takes them per token, so any position
    (left padding included) works and there is no maximum length."""
    inv_freq = _np(rotary.inv_freq)
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    pos = b.op("Cast", ["position_ids"], "rope/Cast", to=TensorProto.FLOAT)
    freqs = b.op("Mul", [b.op("Unsqueeze", [pos, b.const([-1])], "rope/Unsqueeze"), b.weight("rope.inv_freq", inv_freq)], "rope/Mul")
    cos, sin = b.op("Cos", [freqs], "rope/Cos"), b.op("Sin", [freqs], "rope/Sin")
    if scaling != 1.0:
        cos = b.op("Mul", [cos, b.const(scaling, np.float32)], "rope/ScaleCos")
        sin = b.op("Mul", [sin, b.const(scaling, np.float32)], "rope/ScaleSin")
    return {"cos": cos, "sin": sin}


def _mask_bias(b: _Builder) -> str:
    """Additive attention bias [B, 1, S, T]: 0 where key j is visible to query i, else float min.

    Visible = causal (j <= past + i, with past = T - S from the mask length) and not padding
    (attention_mask[b, j] == 1); this is what HF builds from the same two inputs.
    """
    total = b.op("Gather", [b.op("Shape", ["attention_mask"], "mask/ShapeT"), b.const(1)], "mask/T", axis=0)
    seq = b.op("Gather", [b.op("Shape", ["input_ids"], "mask/ShapeS"), b.const(1)], "mask/S", axis=0)
    past = b.op("Sub", [total, seq], "mask/Past")
    q_pos = b.op("Range", [past, total, b.const(1)], "mask/QPos")
    k_pos = b.op("Range", [b.const(0), total, b.const(1)], "mask/KPos")
    causal = b.op(
        "LessOrEqual",
        [b.op("Unsqueeze", [k_pos, b.const([0])], "mask/K2"), b.op("Unsqueeze", [q_pos, b.const([1])], "mask/Q2")],
        "mask/Causal",
    )  # [S, T]
    keep = b.op("Cast", ["attention_mask"], "mask/Keep", to=TensorProto.BOOL)
    visible = b.op("And", [causal, b.op("Unsqueeze", [keep, b.const([1])], "mask/Keep3")], "mask/Visible")  # [B, S, T]
    bias = b.op("Where", [visible, b.const(0.0, np.float32), b.const(_NEG, np.float32)], "mask/Where")
    return b.op("Unsqueeze", [bias, b.const([1])], "mask/Bias")


def _attention(b: _Builder, x: str, attn, info: LayerInfo, i: int, rope: dict, bias: str) -> str:
    """Self-attention with the KV cache: ONNX RotaryEmbedding + Attention (opset 23) on [B, S, H*hd].

    Two fused nodes instead of ~25 primitive ones per layer: at batch 1 a decode step runs ~1,200
    small nodes, and their dispatch overhead rivalled the (int4) matmul time.
    """
    name, hd, n_kv, n_h = f"layers.{i}.self_attn", info.head_dim, info.n_kv_heads, info.n_heads
    q, k, v = _fused_linear(b, x, [attn.q_proj, attn.k_proj, attn.v_proj], f"{name}.qkv_proj")
    q = b.op("RotaryEmbedding", [q, rope["cos"], rope["sin"]], f"{name}/QRope", num_heads=n_h)
    k = b.op("RotaryEmbedding", [k, rope["cos"], rope["sin"]], f"{name}/KRope", num_heads=n_kv)
    y = b.op_outs(
        "Attention",
        [q, k, v, bias, f"past_key_values.{i}.key", f"past_key_values.{i}.value"],
        [f"{name}/Attention/out", f"present.{i}.key", f"present.{i}.value"],
        f"{name}/Attention",
        q_num_heads=n_h, kv_num_heads=n_kv, scale=float(1.0 / np.sqrt(hd)),
    )[0]
    return _linear(b, y, attn.o_proj, f"{name}.o_proj")


def _mlp(b: _Builder, x: str, mlp, i: int) -> str:
    name = f"layers.{i}.mlp"
    gate, up = _fused_linear(b, x, [mlp.gate_proj, mlp.up_proj], f"{name}.gate_up_proj")
    act = b.op("Mul", [gate, b.op("Sigmoid", [gate], f"{name}/Sigmoid")], f"{name}/SiLU")
    hidden = b.op("Mul", [act, up], f"{name}/GateUp")
    return _linear(b, hidden, mlp.down_proj, f"{name}.down_proj")


def _mlp_block(b: _Builder, h: str, layer, info: LayerInfo, i: int) -> str:
    """Residual MLP; a zero-width FFN contributes only its down_proj bias (if any)."""
    if info.ffn == 0:
        bias = layer.mlp.down_proj.bias
        return h if bias is None else b.op("Add", [h, b.weight(f"layers.{i}.mlp.down_proj.bias", _np(bias))], f"layers.{i}/MlpBias")
    m = _rms_norm(b, h, layer.post_attention_layernorm, f"layers.{i}.post_attention_layernorm")
    return b.op("Add", [h, _mlp(b, m, layer.mlp, i)], f"layers.{i}/MlpResidual")


def _lm_head(b: _Builder, x: str, model, tied_gemm: bool) -> str:
    if tied_gemm:
        # Gemm(transB=1) reads the embedding table in place: one copy of the tied weight.
        flat = b.op("Reshape", [x, b.const([-1, model.config.hidden_size])], "lm_head/Flatten")
        y = b.op("Gemm", [flat, "model.embed_tokens.weight"], "lm_head/Gemm", transB=1)
        shape = b.op(
            "Concat", [b.op("Shape", ["input_ids"], "lm_head/Shape"), b.const([model.lm_head.out_features])], "lm_head/OutShape", axis=0
        )
        return b.op_to("Reshape", [y, shape], "logits", "lm_head/Reshape")
    w = b.weight("lm_head.weight", _np(model.lm_head.weight).T)
    y = b.op_to("MatMul", [x, w], "logits" if model.lm_head.bias is None else "lm_head/out", "lm_head/MatMul")
    if model.lm_head.bias is not None:
        y = b.op_to("Add", [y, b.weight("lm_head.bias", _np(model.lm_head.bias))], "logits", "lm_head/Add")
    return y


def check_supported(model) -> None:
    cfg = model.config
    if getattr(cfg, "model_type", None) != "llama":
        raise EdgepruneError(f"ONNX export supports Llama-family models, not model_type '{getattr(cfg, 'model_type', None)}'")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise EdgepruneError(f"ONNX export supports the SiLU MLP of Llama, not hidden_act '{cfg.hidden_act}'")
    rope_type = getattr(model.model.rotary_emb, "rope_type", "default")
    if rope_type not in _STATIC_ROPE:
        raise EdgepruneError(f"ONNX export supports static RoPE ({', '.join(_STATIC_ROPE)}), not rope_type '{rope_type}'")


def layer_infos(model) -> list[LayerInfo]:
    from edgeprune.arch import head_dim, layer_shapes

    hd = head_dim(model)
    infos = [LayerInfo(s.n_heads, s.n_kv_heads, hd, s.ffn) for s in layer_shapes(model)]
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

    check_supported(model)
    infos = layer_infos(model)
    cfg = model.config
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    b = _Builder(Path(str(path) + DATA_SUFFIX))
    try:
        with torch.no_grad():
            b.weight("model.embed_tokens.weight", _np(model.model.embed_tokens.weight))
            h = b.op("Gather", ["model.embed_tokens.weight", "input_ids"], "embed_tokens/Gather", axis=0)
            rope = _rope_tables(b, model.model.rotary_emb)
            bias = _mask_bias(b)
            for i, (layer, info) in enumerate(zip(model.model.layers, infos)):
                a = _rms_norm(b, h, layer.input_layernorm, f"layers.{i}.input_layernorm")
                h = b.op("Add", [h, _attention(b, a, layer.self_attn, info, i, rope, bias)], f"layers.{i}/AttnResidual")
                h = _mlp_block(b, h, layer, info, i)
            h = _rms_norm(b, h, model.model.norm, "norm")
            _lm_head(b, h, model, tied_gemm=tied and not quantizable_lm_head)
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
    graph = helper.make_graph(b.nodes, "edgeprune_llama_decoder", inputs, outputs, b.inits)
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
        "inputs": inputs,
        "outputs": outputs,
        **(extra or {}),
    }


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
