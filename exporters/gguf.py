"""GGUF writer for llama.cpp: tensors, RoPE permutation, hyperparameters, and the export entry point.

The model's family (edgeprune/families) names llama.cpp's architecture; a pruned model keeps its
block but its sizes may vary per layer, so the exporter picks the architecture from the shapes:

  * every layer the same shape -> the family's own architecture (`llama` for Llama and Mistral,
    `qwen2`, `qwen3`, `gemma3`): scalar hyperparameters, what every tool knows;
  * per-layer FFN widths or head counts, or FLAP's o/down biases on a family whose graph reads
    none -> `deci` (llama.cpp's Nemotron-NAS graph: per-layer `feed_forward_length`,
    `attention.head_count` and `attention.head_count_kv` arrays, every bias). Qwen3 and Gemma 3
    have no such architecture (deci has no q/k norms and no Gemma norms): they need uniform shapes.

Every bias the torch model has is written, F32 (the architecture check above guarantees the graph
reads it). Gemma's RMSNorms scale by (1 + w), llama.cpp's by w: their weights are written plus one,
as llama.cpp's own converter does.

Weights go in in HF's [out, in] layout (gguf-py reverses the dims, so llama.cpp's ne0 = in). Q and
K rows are reordered only for architectures whose RoPE rotates adjacent pairs (llama, deci): HF
rotates the two halves of each head (rotate_half), so each head's rows go from (2, head_dim/2) to
(head_dim/2, 2) order, per layer with that layer's own head counts. qwen2, qwen3 and gemma3 rotate
halves (NEOX) like HF: rows stay.

f32 and f16 are written directly. Every quantized dtype (q8_0 ... q3_k_m) is made by llama.cpp's
own quantizer from a temporary F32 file (exporters/llamacpp_quantize.py), optionally with an
importance matrix and per-tensor overrides; llama.cpp picks each tensor's type by role and layer
and falls back to another type where a row does not split into whole blocks (mix.py predicts it,
the report lists what was really written). The file is written under a temporary name, loaded back
into llama.cpp, compared with the torch model (exporters/llamacpp.py), and only then renamed.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import gguf
import numpy as np

from edgeprune import dtypes
from edgeprune.families import family_for_model_type, family_of
from edgeprune.errors import EdgepruneError
from edgeprune.exporters.common import atomic_file
from edgeprune.exporters.gguf_tokenizer import write_tokenizer

Q = gguf.GGMLQuantizationType

# Written directly (2-D weights; 1-D tensors -- norms, biases -- always stay F32).
DIRECT_TYPES = {"f32": Q.F32, "f16": Q.F16}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}
DTYPES = dtypes.GGUF_DTYPES


# ----------------------------------------------------------------------------------------------
# export


def export_gguf(
    model,
    tokenizer,
    out_path,
    dtype: str = "f32",
    verify: bool = True,
    verify_windows=None,
    progress=None,
    metadata: dict | None = None,
    n_threads: int | None = None,
    imatrix: dict | None = None,
    overrides: dict | None = None,
) -> dict:
    """Write `model` as a GGUF at `out_path`, verified against torch before it appears there.

    dtype: a GGUF dtype of `edgeprune.dtypes` (f32, f16 written directly; q8_0, q6_k, q5_k_m, q5_1,
      q5_0, q4_k_m, q4_1, q4_0, iq4_nl, q3_k_m by llama.cpp's quantizer). An ONNX name is an error.
    verify_windows: [n, T] token ids (default: 4 x 256 tokens of WikiText-2 validation).
    metadata: extra GGUF key/values (str, int, float, bool), e.g. {"general.name": "...",
      "edgeprune.plan": json}; "tokenizer.ggml.pre" here overrides the detected pre-tokenizer.
    imatrix: {GGUF tensor name: float32 [row length] mean squared input activation per column}
      (`edgeprune.imatrix.collect_imatrix`); llama.cpp weighs each column's rounding error by it.
    overrides: {tensor name | regex | "output" | "token_embd": storage type such as "q8_0"}; the
      first matching entry wins, and llama.cpp's row-length fallback still applies (mix.py).
    progress: optional callable taking one status string.
    Returns a report: path, arch, dtype, bytes, seconds, verify_seconds, tensor_count, verification,
    tensor_types {name: storage}, type_counts {storage: n}, bytes_by_type {storage: bytes}.
    """
    from edgeprune.arch import layer_shapes
    from edgeprune.exporters.llamacpp import verify_gguf
    from edgeprune.exporters.llamacpp_quantize import quantize_gguf, read_tensor_types

    say = progress or (lambda msg: None)
    dtype = dtypes.normalize(dtype, "gguf")
    shapes = layer_shapes(model)
    arch = model_arch(model, shapes)
    check_shapes(model, shapes)
    quantized = dtype not in DIRECT_TYPES
    if overrides and not quantized:
        raise EdgepruneError(f"per-tensor overrides need a quantized GGUF dtype, not {dtype}: llama.cpp would ignore them")
    if imatrix and quantized:
        check_imatrix(imatrix, {name: row for name, _, _, row in weight_geometry(model, shapes)})
    out_path = Path(out_path)

    start = time.perf_counter()
    with atomic_file(out_path) as tmp:
        if quantized:
            f32 = tmp.with_name(tmp.name + ".f32")
            try:
                say(f"writing F32 {arch} GGUF for llama.cpp's {dtype} quantizer")
                n_tensors = write_gguf(model, tokenizer, f32, arch, "f32", metadata)
                say(f"quantizing to {dtype} with llama.cpp" + (" and an importance matrix" if imatrix else ""))
                quantize_gguf(f32, tmp, dtype, imatrix=imatrix, overrides=overrides, tied=_tied(model), n_threads=n_threads)
            finally:
                f32.unlink(missing_ok=True)
        else:
            say(f"writing {dtype} {arch} GGUF")
            n_tensors = write_gguf(model, tokenizer, tmp, arch, dtype, metadata)
        seconds = time.perf_counter() - start
        written = read_tensor_types(tmp)
        verification, verify_seconds = None, 0.0
        if verify:
            say("verifying the GGUF in llama.cpp against torch")
            t0 = time.perf_counter()
            verification = verify_gguf(model, tokenizer, tmp, dtype, verify_windows, n_threads)
            verify_seconds = time.perf_counter() - t0
        size = tmp.stat().st_size
    counts: dict[str, int] = {}
    by_type: dict[str, int] = {}
    for storage, nbytes in written.values():
        counts[storage] = counts.get(storage, 0) + 1
        by_type[storage] = by_type.get(storage, 0) + nbytes
    return {
        "path": str(out_path),
        "arch": arch,
        "dtype": dtype,
        "bytes": size,
        "seconds": seconds,
        "verify_seconds": verify_seconds,
        "tensor_count": n_tensors,
        "verification": verification,
        "tensor_types": {name: storage for name, (storage, _) in written.items()},
        "type_counts": dict(sorted(counts.items())),
        "bytes_by_type": dict(sorted(by_type.items())),
        "imatrix_entries": len(imatrix or {}) if quantized else 0,
        "overrides": dict(overrides or {}),
    }


def choose_arch(shapes, family=None, biases: frozenset = frozenset(), full_heads: int | None = None) -> str:
    """The family's uniform architecture when one shape fits every layer and its graph reads every
    bias the model has, else its per-layer one (`deci`); an EdgepruneError when there is none.
    full_heads: hidden / head_dim, to tell whether query heads were pruned."""
    family = family or family_for_model_type("llama")
    per_layer = len({(s.n_heads, s.n_kv_heads, s.ffn) for s in shapes}) > 1
    heads_pruned = full_heads is not None and bool(shapes) and shapes[0].n_heads != full_heads
    return family.gguf_arch(per_layer=per_layer, biases=biases, heads_pruned=heads_pruned)


def model_arch(model, shapes) -> str:
    """`choose_arch` for this model: its family, its biases, and whether its query heads were pruned."""
    return choose_arch(shapes, family_of(model), model_biases(model), model.config.hidden_size // _head_dim(model))


def model_biases(model) -> frozenset:
    """GGUF roles (attn_q ... ffn_down) that carry a bias in at least one layer."""
    fam = family_of(model)
    return frozenset(role for layer in fam.layers(model) for role in fam.linears
                     if fam.linear(layer, role).bias is not None)


def check_shapes(model, shapes) -> None:
    """Refuse the shapes llama.cpp would silently run differently from torch."""
    if not shapes:
        raise EdgepruneError("the model has no decoder layers left: nothing to export")
    if shapes[0].n_heads == 0:
        # llama.cpp derives the head size from layer 0's head count.
        raise EdgepruneError("layer 0 has no attention heads: llama.cpp needs layer 0 to keep attention (drop the layer instead)")
    for i, s in enumerate(shapes):
        if s.ffn == 0:
            # deci's graph skips the whole layer (attention included) when its FFN width is 0.
            raise EdgepruneError(f"layer {i} has FFN width 0: llama.cpp's deci graph would skip the whole layer; drop the layer or keep some FFN channels")
        if s.n_heads and (s.n_kv_heads == 0 or s.n_heads % s.n_kv_heads):
            raise EdgepruneError(f"layer {i} has {s.n_heads} query heads and {s.n_kv_heads} KV heads: query heads must be a positive multiple of KV heads")
        if s.n_heads == 0 and (s.n_kv_heads or s.attn_out_bias):
            # deci runs a head-less layer as "no attention": an o_proj bias would be dropped.
            raise EdgepruneError(f"layer {i} has no query heads but keeps KV heads or an o_proj bias (FLAP compensation): llama.cpp deci cannot carry it")
    cfg = model.config
    if getattr(cfg, "rope_scaling", None) and _rope_type(cfg) not in ("default", "linear", "llama3"):
        raise EdgepruneError(f"RoPE scaling '{_rope_type(cfg)}' is not supported by the GGUF exporter (default, linear, llama3 are)")
    if getattr(cfg, "attn_logit_softcapping", None):
        raise EdgepruneError("attention logit soft-capping (Gemma 2) is not in llama.cpp's gemma3 graph: export ONNX instead")
    if family_of(model).name == "gemma3":
        hd = _head_dim(model)
        if float(getattr(cfg, "query_pre_attn_scalar", hd)) != float(hd):
            # llama.cpp scales queries by 1/sqrt(head_dim) for every Gemma 3 size but 27B
            raise EdgepruneError(f"query_pre_attn_scalar {cfg.query_pre_attn_scalar} differs from head_dim {hd}: "
                                 "llama.cpp's gemma3 graph would scale attention differently")



def check_imatrix(imatrix: dict, rows: dict[str, int]) -> None:
    """Every entry names a 2-D weight and holds one finite, non-negative value per weight column
    (llama.cpp aborts the whole quantization on a size mismatch, without saying which file)."""
    for name, values in imatrix.items():
        if name not in rows:
            raise EdgepruneError(f"imatrix entry '{name}' is not a weight of this model (expected names like blk.0.attn_q.weight)")
        arr = np.asarray(values)
        if arr.shape != (rows[name],):
            raise EdgepruneError(f"imatrix entry '{name}' has shape {arr.shape}, but the weight's rows have {rows[name]} values")
        if not np.all(np.isfinite(arr)) or (arr < 0).any():
            raise EdgepruneError(f"imatrix entry '{name}' has non-finite or negative values")


def weight_geometry(model, shapes):
    """(GGUF name, layer, rows, row length) of every 2-D weight; a GGUF row is the HF input
    dimension, layer is None for token_embd/output. The shape of what mix.py takes."""
    d = model.config.hidden_size
    hd = _head_dim(model)
    n_vocab = model.model.embed_tokens.weight.shape[0]
    yield "token_embd.weight", None, n_vocab, d
    if not _tied(model):
        yield "output.weight", None, n_vocab, d
    for i, s in enumerate(shapes):
        if s.n_heads:
            yield f"blk.{i}.attn_q.weight", i, s.n_heads * hd, d
            yield f"blk.{i}.attn_k.weight", i, s.n_kv_heads * hd, d
            yield f"blk.{i}.attn_v.weight", i, s.n_kv_heads * hd, d
            yield f"blk.{i}.attn_output.weight", i, d, s.n_heads * hd
        yield f"blk.{i}.ffn_gate.weight", i, s.ffn, d
        yield f"blk.{i}.ffn_up.weight", i, s.ffn, d
        yield f"blk.{i}.ffn_down.weight", i, d, s.ffn


# ----------------------------------------------------------------------------------------------
# tensors


def rope_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate_half row order -> llama.cpp adjacent-pair order, head by head (weights or biases)."""
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _np(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _tied(model) -> bool:
    out = model.get_output_embeddings()
    return out is None or out.weight is model.model.embed_tokens.weight or (
        out.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    )


def _head_dim(model) -> int:
    from edgeprune.arch import head_dim

    return head_dim(model)


def _norm(fam, module) -> np.ndarray:
    return _np(module.weight) + np.float32(fam.norm_offset)


def gguf_tensors(model, shapes, arch: str | None = None):
    """(GGUF name, fp32 array) for every tensor llama.cpp reads, in HF [out, in] layout."""
    m, fam = model.model, family_of(model)
    arch = arch or model_arch(model, shapes)
    permute = fam.rope_permuted(arch)
    yield "token_embd.weight", _np(m.embed_tokens.weight)
    for i, (layer, s) in enumerate(zip(fam.layers(model), shapes)):
        p = f"blk.{i}."
        roles = (("attn_q", s.n_heads), ("attn_k", s.n_kv_heads), ("attn_v", None), ("attn_output", None)) if s.n_heads else ()
        for name in fam.norms:  # a head-less layer (deci) has no attention tensors at all
            if s.n_heads or not name.startswith("attn"):
                yield f"{p}{name}.weight", _norm(fam, fam.norm(layer, name))
        for role, heads in roles:  # Q and K rows in the architecture's RoPE order, per layer's own head count
            lin = fam.linear(layer, role)
            for kind in ("weight", "bias"):
                t = getattr(lin, kind)
                if t is not None:
                    yield f"{p}{role}.{kind}", rope_permute(_np(t), heads) if heads and permute else _np(t)
        if fam.qk_norm and s.n_heads:  # one head_dim vector shared by every head: unaffected by pruning or RoPE order
            yield p + "attn_q_norm.weight", _norm(fam, layer.self_attn.q_norm)
            yield p + "attn_k_norm.weight", _norm(fam, layer.self_attn.k_norm)
        for role in ("ffn_gate", "ffn_up", "ffn_down"):
            lin = fam.linear(layer, role)
            yield f"{p}{role}.weight", _np(lin.weight)
            if lin.bias is not None:
                yield f"{p}{role}.bias", _np(lin.bias)
    yield "output_norm.weight", _norm(fam, m.norm)
    if not _tied(model):  # tied: llama.cpp reuses token_embd as the output projection
        yield "output.weight", _np(model.lm_head.weight)
    freqs = _llama3_rope_freqs(model.config)
    if freqs is not None:
        yield "rope_freqs.weight", freqs


def encode(name: str, arr: np.ndarray, dtype: str) -> tuple[np.ndarray, Q]:
    """Array and GGML type as stored: 1-D stays F32; 2-D takes `dtype` (f32 or f16)."""
    if arr.ndim == 1 or dtype == "f32":
        return np.ascontiguousarray(arr, dtype=np.float32), Q.F32
    return np.ascontiguousarray(arr, dtype=np.float16), Q.F16


# ----------------------------------------------------------------------------------------------
# writing


def write_gguf(model, tokenizer, path, arch: str, dtype: str, metadata: dict | None = None) -> int:
    """Write the GGUF file (no verification). Returns the number of tensors."""
    from edgeprune.arch import layer_shapes

    shapes = layer_shapes(model)
    metadata = dict(metadata or {})
    n_vocab = model.model.embed_tokens.weight.shape[0]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(str(metadata.pop("general.name", None) or _model_name(model)))
    w.add_file_type(int(FILE_TYPES[dtype]))
    write_hparams(w, model, shapes, arch, n_vocab)
    write_tokenizer(w, tokenizer, n_vocab, metadata.pop("tokenizer.ggml.pre", None))
    for key, value in metadata.items():
        _add_kv(w, key, value)
    n = 0
    for name, arr in gguf_tensors(model, shapes, arch):
        data, qtype = encode(name, arr, dtype)
        w.add_tensor(name, data, raw_dtype=qtype)
        n += 1
    write_and_close(w)
    return n


def write_and_close(w: gguf.GGUFWriter) -> None:
    """Header, key/values and tensors, in gguf-py's required order; the file is closed either way."""
    # gguf-py logs every file it writes at INFO; onnxruntime's quantizer turns root INFO logging on
    logging.getLogger("gguf.gguf_writer").setLevel(logging.WARNING)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()


def _model_name(model) -> str:
    src = getattr(model.config, "_name_or_path", "") or "model"
    return f"{Path(src).name or 'model'} (edgeprune)"


def _rope_type(cfg) -> str:
    rs = getattr(cfg, "rope_scaling", None) or {}
    return rs.get("rope_type", rs.get("type", "default"))


def _rope_theta(cfg) -> float:
    theta = getattr(cfg, "rope_theta", None)
    if theta is None:  # transformers 5 keeps it in rope_parameters
        theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)


def _llama3_rope_freqs(cfg) -> np.ndarray | None:
    """Llama 3 long-context RoPE: llama.cpp divides each rotation frequency by these factors."""
    if _rope_type(cfg) != "llama3":
        return None
    rs = cfg.rope_scaling
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    freqs = 1.0 / _rope_theta(cfg) ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    old_ctx = rs["original_max_position_embeddings"]
    low_wavelen = old_ctx / rs["low_freq_factor"]
    high_wavelen = old_ctx / rs["high_freq_factor"]
    factors = []
    for f in freqs:
        wavelen = 2 * np.pi / f
        if wavelen < high_wavelen:  # high frequencies: unscaled
            factors.append(1.0)
        elif wavelen > low_wavelen:  # low frequencies: fully scaled
            factors.append(rs["factor"])
        else:  # in between: interpolate the inverse factor
            smooth = (old_ctx / wavelen - rs["low_freq_factor"]) / (rs["high_freq_factor"] - rs["low_freq_factor"])
            factors.append(1.0 / ((1 - smooth) / rs["factor"] + smooth))
    return np.asarray(factors, dtype=np.float32)


def write_hparams(w: gguf.GGUFWriter, model, shapes, arch: str, n_vocab: int) -> None:
    cfg = model.config
    hd = _head_dim(model)
    w.add_block_count(len(shapes))
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(int(cfg.hidden_size))
    w.add_vocab_size(int(n_vocab))
    if arch != "deci":  # the uniform architectures read scalars (layer 0's values for every layer)
        s = shapes[0]
        w.add_feed_forward_length(int(s.ffn))
        w.add_head_count(int(s.n_heads))
        w.add_head_count_kv(int(s.n_kv_heads))
    else:  # gguf-py wants Python ints in arrays (numpy ints are rejected)
        w.add_feed_forward_length([int(s.ffn) for s in shapes])
        w.add_head_count([int(s.n_heads) for s in shapes])
        w.add_head_count_kv([int(s.n_kv_heads) for s in shapes])
    # Explicit even where llama.cpp could derive them: it derives them from layer 0 / hidden size.
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    if _rope_type(cfg) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
    if family_of(model).sliding_layers:
        write_sliding_window(w, cfg)
    if getattr(cfg, "final_logit_softcapping", None):
        w.add_final_logit_softcapping(float(cfg.final_logit_softcapping))


def write_sliding_window(w: gguf.GGUFWriter, cfg) -> None:
    """Gemma 3's window, its rotary base, and which layers use it, listed per layer: llama.cpp's
    default rule (every 6th layer global) would be wrong once layers are dropped."""
    types = list(getattr(cfg, "layer_types", None) or [])
    window = getattr(cfg, "sliding_window", None)
    if not window or "sliding_attention" not in types:
        return
    w.add_sliding_window(int(window))
    w.add_sliding_window_pattern([t == "sliding_attention" for t in types])
    w.add_rope_freq_base_swa(float(getattr(cfg, "rope_local_base_freq", 10000.0)))


def _add_kv(w: gguf.GGUFWriter, key: str, value) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_int64(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    else:
        raise EdgepruneError(f"GGUF metadata '{key}' must be a str, int, float or bool, got {type(value).__name__}")
