"""GGUF export for llama.cpp, verification against torch, and a llama.cpp benchmark.

A pruned model keeps the Llama block but its sizes vary per layer, so the exporter picks the
llama.cpp architecture from the shapes:

  * every layer the same shape -> `llama` (scalar hyperparameters, what every tool knows);
  * per-layer FFN widths or head counts -> `deci` (llama.cpp's Nemotron-NAS graph, which reads
    `feed_forward_length`, `attention.head_count` and `attention.head_count_kv` as per-layer arrays).

Both llama.cpp graphs accept optional `attn_output.bias` and `ffn_down.bias` tensors (FLAP bias
compensation), as well as q/k/v and gate/up biases: every bias the torch model has is written, F32.

Weights go in in HF's [out, in] layout (gguf-py reverses the dims, so llama.cpp's ne0 = in). Only
Q and K rows are reordered: HF rotates the two halves of each head (rotate_half) while llama.cpp's
`llama`/`deci` RoPE rotates adjacent pairs, so each head's rows go from (2, head_dim/2) order to
(head_dim/2, 2) order, per layer with that layer's own head counts.

f32/f16/q8_0/q4_0 are written directly (gguf-py's numpy quantizers); K-quants (q4_k_m, q5_k_m,
q6_k) go through llama.cpp's own quantizer from a temporary F32 file. The file is written under a
temporary name, loaded back into llama.cpp, compared with the torch model, and only then renamed.

This module imports neither torch nor llama_cpp at import time: `python -m edgeprune.exporters.gguf
bench FILE` measures llama.cpp in a process whose memory is llama.cpp's alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import sys
import time
from pathlib import Path

import gguf
import numpy as np

from edgeprune.errors import EdgepruneError, VerificationError
from edgeprune.exporters.common import (
    GREEDY_TOKENS,
    MIN_TOP1_EXACT,
    atomic_file,
    peak_rss_mb,
    summarize,
    torch_greedy,
    verification_text,
    verification_windows,
)

Q = gguf.GGMLQuantizationType

# Written directly: the type of 2-D weights (1-D tensors -- norms, biases -- always stay F32).
DIRECT_TYPES = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}
FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
}
# Produced by llama.cpp's quantizer (llama_ftype constant names in llama_cpp).
K_QUANTS = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}
DTYPES = tuple(DIRECT_TYPES) + tuple(K_QUANTS)
K_QUANT_BLOCK = 256  # K-quant super-block: every weight row must be a multiple of it

# Sanity floors on top-1 agreement with torch for lossy types: they catch a broken file, not a
# quality loss (the tensor layout is already proven by the F32 path, and the q8_0/q4_0 blocks are
# byte-identical to llama.cpp's own quantizer). Dense SmolLM2-135M measured top-1 / mean KL on the
# 4 x 256 verification windows: f16 0.998 / 5e-6, q8_0 0.956 / 4e-3, q4_0 0.690 / 0.33 -- a
# 135M model loses a lot at 4 bits, and a pruned one may lose more, hence the low 4-bit floor.
MIN_TOP1_LOSSY = {"f16": 0.95, "q8_0": 0.85, "q6_k": 0.80, "q5_k_m": 0.70, "q4_0": 0.50, "q4_k_m": 0.50}

# F32 files differ from torch only by summation order: mean KL is ~1e-6 (SmolLM2 6e-7), while a
# dropped FLAP bias or a mis-permuted head gives 1e-1 and more. Checked with top-1 and greedy.
MAX_KL_EXACT = 1e-3

GREEDY_PROMPT = 16  # tokens of verification window 0 used as the greedy prompt

# HF pre-tokenizer -> llama.cpp `tokenizer.ggml.pre` name with the same splitting regex.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


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
) -> dict:
    """Write `model` as a GGUF at `out_path`, verified against torch before it appears there.

    dtype: f32 | f16 | q8_0 | q4_0 (written directly) | q4_k_m | q5_k_m | q6_k (llama.cpp quantizer).
    verify_windows: [n, T] token ids (default: 4 x 256 tokens of WikiText-2 validation).
    metadata: extra GGUF key/values (str, int, float, bool), e.g. {"general.name": "...",
      "edgeprune.plan": json}; "tokenizer.ggml.pre" here overrides the detected pre-tokenizer.
    progress: optional callable taking one status string.
    Returns a report: path, arch, dtype, bytes, seconds, verify_seconds, tensor_count, verification.
    """
    from edgeprune.arch import layer_shapes

    say = progress or (lambda msg: None)
    if dtype not in DTYPES:
        raise EdgepruneError(f"unknown GGUF dtype '{dtype}': choose one of {', '.join(DTYPES)}")
    shapes = layer_shapes(model)
    arch = choose_arch(shapes)
    check_shapes(model, shapes)
    check_block_sizes(model, shapes, dtype)
    out_path = Path(out_path)

    start = time.perf_counter()
    with atomic_file(out_path) as tmp:
        if dtype in K_QUANTS:
            f32 = tmp.with_name(tmp.name + ".f32")
            try:
                say(f"writing F32 {arch} GGUF for llama.cpp's {dtype} quantizer")
                n_tensors = write_gguf(model, tokenizer, f32, arch, "f32", metadata)
                say(f"quantizing to {dtype} with llama.cpp")
                quantize_with_llamacpp(f32, tmp, dtype, n_threads)
            finally:
                f32.unlink(missing_ok=True)
        else:
            say(f"writing {dtype} {arch} GGUF")
            n_tensors = write_gguf(model, tokenizer, tmp, arch, dtype, metadata)
        seconds = time.perf_counter() - start
        verification, verify_seconds = None, 0.0
        if verify:
            say("verifying the GGUF in llama.cpp against torch")
            t0 = time.perf_counter()
            verification = verify_gguf(model, tokenizer, tmp, dtype, verify_windows, n_threads)
            verify_seconds = time.perf_counter() - t0
        size = tmp.stat().st_size
    return {
        "path": str(out_path),
        "arch": arch,
        "dtype": dtype,
        "bytes": size,
        "seconds": seconds,
        "verify_seconds": verify_seconds,
        "tensor_count": n_tensors,
        "verification": verification,
    }


def choose_arch(shapes) -> str:
    """`llama` when one shape fits every layer (biases are fine there too), else `deci`."""
    return "llama" if len({(s.n_heads, s.n_kv_heads, s.ffn) for s in shapes}) == 1 else "deci"


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
    if getattr(model.config, "rope_scaling", None) and _rope_type(model.config) not in ("default", "linear", "llama3"):
        raise EdgepruneError(f"RoPE scaling '{_rope_type(model.config)}' is not supported by the GGUF exporter (default, linear, llama3 are)")


def check_block_sizes(model, shapes, dtype: str) -> None:
    """Every quantized weight row must split into whole blocks: say which tensor does not."""
    if dtype in ("f32", "f16"):
        return
    block = K_QUANT_BLOCK if dtype in K_QUANTS else gguf.GGML_QUANT_SIZES[DIRECT_TYPES[dtype]][0]
    for name, row in _weight_rows(model, shapes):
        if row % block:
            if dtype in K_QUANTS:
                raise EdgepruneError(
                    f"{dtype} needs every weight row to be a multiple of {block} (K-quant super-blocks), but {name} "
                    f"has rows of {row}: export q8_0 or q4_0 (blocks of 32) instead; llama.cpp would silently use another type"
                )
            raise EdgepruneError(
                f"{dtype} stores blocks of {block} values, but {name} has rows of {row} (not a multiple of {block}): "
                f"prune to widths that are multiples of {block}, or export f16/f32"
            )


def _weight_rows(model, shapes):
    """(GGUF name, row length) of every 2-D weight; a GGUF row is the HF input dimension."""
    d = model.config.hidden_size
    hd = _head_dim(model)
    yield "token_embd.weight", d
    if not _tied(model):
        yield "output.weight", d
    for i, s in enumerate(shapes):
        if s.n_heads:
            for part in ("attn_q", "attn_k", "attn_v"):
                yield f"blk.{i}.{part}.weight", d
            yield f"blk.{i}.attn_output.weight", s.n_heads * hd
        yield f"blk.{i}.ffn_gate.weight", d
        yield f"blk.{i}.ffn_up.weight", d
        yield f"blk.{i}.ffn_down.weight", s.ffn


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


def gguf_tensors(model, shapes):
    """(GGUF name, fp32 array) for every tensor llama.cpp reads, in HF [out, in] layout."""
    m = model.model
    yield "token_embd.weight", _np(m.embed_tokens.weight)
    for i, (layer, s) in enumerate(zip(m.layers, shapes)):
        attn, mlp, p = layer.self_attn, layer.mlp, f"blk.{i}."
        if s.n_heads:  # a head-less layer has no attention tensors at all in deci
            yield p + "attn_norm.weight", _np(layer.input_layernorm.weight)
            for part, lin, heads in (("attn_q", attn.q_proj, s.n_heads), ("attn_k", attn.k_proj, s.n_kv_heads), ("attn_v", attn.v_proj, None)):
                for kind in ("weight", "bias"):
                    t = getattr(lin, kind)
                    if t is not None:
                        yield f"{p}{part}.{kind}", rope_permute(_np(t), heads) if heads else _np(t)
            yield p + "attn_output.weight", _np(attn.o_proj.weight)
            if attn.o_proj.bias is not None:
                yield p + "attn_output.bias", _np(attn.o_proj.bias)
        yield p + "ffn_norm.weight", _np(layer.post_attention_layernorm.weight)
        for part, lin in (("ffn_gate", mlp.gate_proj), ("ffn_up", mlp.up_proj), ("ffn_down", mlp.down_proj)):
            yield f"{p}{part}.weight", _np(lin.weight)
            if lin.bias is not None:
                yield f"{p}{part}.bias", _np(lin.bias)
    yield "output_norm.weight", _np(m.norm.weight)
    if not _tied(model):  # tied: llama.cpp reuses token_embd as the output projection
        yield "output.weight", _np(model.lm_head.weight)
    freqs = _llama3_rope_freqs(model.config)
    if freqs is not None:
        yield "rope_freqs.weight", freqs


def encode(name: str, arr: np.ndarray, dtype: str) -> tuple[np.ndarray, Q]:
    """Array and GGML type as stored: 1-D stays F32; 2-D takes `dtype`."""
    if arr.ndim == 1 or dtype == "f32":
        return np.ascontiguousarray(arr, dtype=np.float32), Q.F32
    qtype = DIRECT_TYPES[dtype]
    if dtype == "q4_0" and name in ("token_embd.weight", "output.weight"):
        qtype = Q.Q8_0  # the (often tied) output projection is the most sensitive matrix: keep 8 bits
    return gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), qtype), qtype


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
    if dtype not in ("f32", "f16"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_hparams(w, model, shapes, arch, n_vocab)
    write_tokenizer(w, tokenizer, n_vocab, metadata.pop("tokenizer.ggml.pre", None))
    for key, value in metadata.items():
        _add_kv(w, key, value)
    n = 0
    for name, arr in gguf_tensors(model, shapes):
        data, qtype = encode(name, arr, dtype)
        w.add_tensor(name, data, raw_dtype=qtype)
        n += 1
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    return n


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
    if arch == "llama":
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


# ----------------------------------------------------------------------------------------------
# tokenizer


def write_tokenizer(w: gguf.GGUFWriter, tokenizer, n_vocab: int, pre: str | None = None) -> None:
    """Vocabulary, merges/scores, token types, special ids, add_bos and chat template."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else None
    if spec is None or spec["model"]["type"] != "BPE":
        raise EdgepruneError("the GGUF exporter needs a Hugging Face fast BPE tokenizer (tokenizer.json)")
    id_to_tok = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(id_to_tok) >= n_vocab:
        raise EdgepruneError(f"the tokenizer has ids up to {max(id_to_tok)} but the embedding only {n_vocab} rows")
    added = {i: tok for i, tok in tokenizer.added_tokens_decoder.items()}
    if _is_sentencepiece(spec):
        _write_spm_vocab(w, spec, id_to_tok, added, n_vocab, tokenizer)
    else:
        _write_bpe_vocab(w, spec, id_to_tok, added, n_vocab, pre or bpe_pre_name(spec))
    for add, tid in (
        (w.add_bos_token_id, tokenizer.bos_token_id),
        (w.add_eos_token_id, tokenizer.eos_token_id),
        (w.add_unk_token_id, tokenizer.unk_token_id),
        (w.add_pad_token_id, tokenizer.pad_token_id),
    ):
        if tid is not None:
            add(int(tid))
    # What the HF tokenizer really does, not what its config claims.
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    w.add_add_bos_token(tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id])
    w.add_add_eos_token(tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id] and len(probe) > 1)
    template = getattr(tokenizer, "chat_template", None)
    if template:
        w.add_chat_template(template)


def _is_sentencepiece(spec: dict) -> bool:
    """Llama-2-style: BPE over '▁'-marked text with byte-fallback tokens, no byte-level mapping."""
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")], ensure_ascii=False)
    return "ByteLevel" not in text and ("\u2581" in text or "Metaspace" in text)


def bpe_pre_name(spec: dict) -> str:
    """The llama.cpp pre-tokenizer whose regex splits text as this HF pre-tokenizer does."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # digits one by one, then the GPT-2 regex (SmolLM, StarCoder)
    if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == _LLAMA3_SPLIT:
        return "llama-bpe"
    raise EdgepruneError(
        f"unknown BPE pre-tokenizer {json.dumps(pre)[:160]}: pass metadata={{'tokenizer.ggml.pre': NAME}} "
        "with the llama.cpp pre-tokenizer name that matches it"
    )


def _token_type(i: int, added: dict) -> int:
    T = gguf.TokenType
    if i in added:
        return T.CONTROL if added[i].special else T.USER_DEFINED
    return T.NORMAL


def _write_bpe_vocab(w, spec, id_to_tok, added, n_vocab, pre) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    tokens, types = [], []
    for i in range(n_vocab):  # embedding rows beyond the tokenizer become unused padding tokens
        tok = id_to_tok.get(i)
        tokens.append(tok if tok is not None else f"[PAD{i}]")
        types.append(_token_type(i, added) if tok is not None else gguf.TokenType.UNUSED)
    w.add_token_list(tokens)
    w.add_token_types(types)
    merges = spec["model"]["merges"]  # "a b" strings (old tokenizers) or [a, b] pairs (new)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])


def _write_spm_vocab(w, spec, id_to_tok, added, n_vocab, tokenizer) -> None:
    """SentencePiece-BPE vocab: llama.cpp merges by score, and BPE ids follow merge order, so score = -id."""
    T = gguf.TokenType
    w.add_tokenizer_model("llama")
    tokens, scores, types = [], [], []
    for i in range(n_vocab):
        tok = id_to_tok.get(i)
        tokens.append(tok if tok is not None else f"[PAD{i}]")
        scores.append(0.0 if i in added else -float(i))
        if tok is None:
            types.append(T.UNUSED)
        elif i == tokenizer.unk_token_id:
            types.append(T.UNKNOWN)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", tok):
            types.append(T.BYTE)
        else:
            types.append(_token_type(i, added))
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    # Llama-2 tokenizers prepend '▁' to the text; llama.cpp does it when add_space_prefix is set.
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
    prepends = ('"Prepend"', '"prepend_scheme": "always"', '"prepend_scheme": "first"', '"add_prefix_space": true')
    w.add_add_space_prefix(any(p in text for p in prepends))


# ----------------------------------------------------------------------------------------------
# llama.cpp runtime


def _threads(n: int | None) -> int:
    """Requested threads, else the cores this process may run on."""
    if n:
        return n
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


_LOG_WARN, _LOG_ERROR, _LOG_CONT = 3, 4, 5  # ggml_log_level (DEBUG=1, INFO=2 come before them)


@contextlib.contextmanager
def _llamacpp_log():
    """Collect llama.cpp's warnings/errors (instead of printing them) for our one-line errors."""
    import llama_cpp

    lines: list[str] = []
    keep = [False]  # whether the message being continued (level CONT) is one we collect

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        if level != _LOG_CONT:
            keep[0] = level in (_LOG_WARN, _LOG_ERROR)
        if keep[0]:
            lines.append(" ".join(text.decode("utf-8", "replace").split()))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        from llama_cpp._logger import llama_log_callback  # llama-cpp-python's own logger

        llama_cpp.llama_log_set(llama_log_callback, ctypes.c_void_p(0))


def open_llama(path, n_ctx: int = 512, n_threads: int | None = None, logits_all: bool = True, n_batch: int | None = None):
    """A llama_cpp.Llama on `path` (CPU), or a one-line EdgepruneError saying why llama.cpp refused it."""
    try:
        import llama_cpp
    except ImportError:
        raise EdgepruneError("llama.cpp is needed here: pip install llama-cpp-python") from None
    threads = _threads(n_threads)
    n_batch = n_batch or n_ctx
    with _llamacpp_log() as log:
        try:
            return llama_cpp.Llama(
                model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_threads=threads,
                n_threads_batch=threads, logits_all=logits_all, n_gpu_layers=0, verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            # the first complaint is the cause; "error loading model" carries the loader's reason
            reasons = [ln for ln in log if ln][:1] + [ln for ln in log if "error loading model" in ln]
            reason = "; ".join(dict.fromkeys(reasons)) or str(exc)
            raise EdgepruneError(f"llama.cpp cannot load {path}: {reason}") from None


def _eval_logits(llm, tokens) -> np.ndarray:
    """Logits [T, vocab] of one window, from an empty KV cache (no BOS is added to raw ids)."""
    tokens = [int(t) for t in np.asarray(tokens).reshape(-1)]
    if len(tokens) > llm.n_ctx():
        raise EdgepruneError(f"a window of {len(tokens)} tokens does not fit llama.cpp's context of {llm.n_ctx()}")
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def llamacpp_logits_fn(path, n_ctx: int = 512, n_threads: int | None = None):
    """A `LogitsFn` (int tokens [T] -> float32 logits [T, vocab]) backed by llama.cpp."""
    llm = open_llama(path, n_ctx=n_ctx, n_threads=n_threads)

    def fn(tokens: np.ndarray) -> np.ndarray:
        return _eval_logits(llm, tokens)

    fn.llm = llm  # keeps the model alive with the function, and lets callers reuse it
    return fn


def llamacpp_greedy(llm, prompt, n_new: int) -> list[int]:
    """Greedy continuation with llama.cpp's KV cache: prefill the prompt, then one token per step."""
    llm.reset()
    llm.eval([int(t) for t in prompt])
    out = []
    for _ in range(n_new):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        llm.eval([tok])
    return out


def _tokenizer_samples(tokenizer) -> list[str]:
    text = verification_text()[:3000]
    tricky = "The capital of France is Paris.  In 1889, 324 m!\n\n\tIt's   \"done\" — naïve café 😀\n"
    samples = [text, tricky]
    bos = tokenizer.bos_token or ""
    eos = tokenizer.eos_token or ""
    samples.append(f"{bos}user\nHi there{eos}\n")  # special tokens written in the text
    return samples


def check_tokenizer(llm, tokenizer) -> dict:
    """llama.cpp tokenizes as the HF tokenizer does, BOS and special tokens included."""
    samples = _tokenizer_samples(tokenizer)
    for s in samples:
        ref = tokenizer(s, add_special_tokens=True)["input_ids"]
        with _llamacpp_log():  # quiet: the BOS-in-text sample makes llama.cpp warn about a double BOS
            got = llm.tokenize(s.encode("utf-8"), add_bos=True, special=True)
        if ref != got:
            k = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
            raise VerificationError(
                f"llama.cpp tokenizes differently from the HF tokenizer at token {k} of {s[:40]!r}: "
                f"HF {ref[k:k + 5]} vs llama.cpp {got[k:k + 5]} (wrong tokenizer.ggml.pre or add_bos?)"
            )
    return {"tokenizer_match": True, "tokenizer_samples": len(samples)}


def verify_gguf(model, tokenizer, path, dtype: str = "f32", windows=None, n_threads: int | None = None) -> dict:
    """Compare the GGUF in llama.cpp with the torch model; raise VerificationError below the bar.

    All dtypes: identical tokenization, top-1 agreement and mean KL on `windows`.
    f32: top-1 >= MIN_TOP1_EXACT, mean KL <= MAX_KL_EXACT and the same GREEDY_TOKENS-token greedy
    continuation (torch and llama.cpp each decoding with their own KV cache).
    Lossy dtypes: top-1 >= MIN_TOP1_LOSSY[dtype] (a sanity floor), greedy agreement reported.
    """
    from edgeprune.evaluate import compare_logits, torch_logits_fn

    windows = verification_windows(tokenizer) if windows is None else np.asarray(windows)
    prompt = np.asarray(windows[0][:GREEDY_PROMPT], dtype=np.int64)
    n_ctx = max(int(windows.shape[1]), len(prompt) + GREEDY_TOKENS)
    llm = open_llama(path, n_ctx=n_ctx, n_threads=n_threads)
    try:
        report = check_tokenizer(llm, tokenizer)
        reference = torch_logits_fn(model)
        report.update(compare_logits(reference, lambda t: _eval_logits(llm, t), windows))
        ref_greedy = torch_greedy(model, prompt, GREEDY_TOKENS)
        got_greedy = llamacpp_greedy(llm, prompt, GREEDY_TOKENS)
    finally:
        llm.close()
    same = next((i for i, (a, b) in enumerate(zip(ref_greedy, got_greedy)) if a != b), GREEDY_TOKENS)
    report.update({"greedy_tokens": GREEDY_TOKENS, "greedy_match": same, "windows": int(len(windows)), "seqlen": int(windows.shape[1])})
    top1, kl = report["top1_agreement"], report["mean_kl"]
    if dtype == "f32":
        report["min_top1"] = MIN_TOP1_EXACT
        if top1 < MIN_TOP1_EXACT or same < GREEDY_TOKENS or kl > MAX_KL_EXACT:
            raise VerificationError(
                f"F32 GGUF disagrees with torch: top-1 {top1:.4f} (need >= {MIN_TOP1_EXACT}), greedy continuation "
                f"identical for {same}/{GREEDY_TOKENS} tokens, mean KL {kl:.2e} (need <= {MAX_KL_EXACT:g}), "
                f"max |dlogit| {report['max_abs_logit_diff']:.3g}"
            )
    else:
        report["min_top1"] = MIN_TOP1_LOSSY[dtype]
        if top1 < MIN_TOP1_LOSSY[dtype]:
            raise VerificationError(
                f"{dtype} GGUF is implausibly far from torch: top-1 {top1:.4f} (sanity floor {MIN_TOP1_LOSSY[dtype]}), mean KL {kl:.3f}"
            )
    return report


# ----------------------------------------------------------------------------------------------
# K-quants


def quantize_with_llamacpp(src, dst, dtype: str, n_threads: int | None = None) -> None:
    """llama.cpp's quantizer, F32 GGUF -> K-quant GGUF (rows were checked to be multiples of 256)."""
    try:
        import llama_cpp
    except ImportError:
        raise EdgepruneError(f"{dtype} needs llama.cpp's quantizer: pip install llama-cpp-python") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, K_QUANTS[dtype])
    params.nthread = _threads(n_threads)
    with _llamacpp_log() as log:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise EdgepruneError(f"llama.cpp could not quantize to {dtype}: {next((ln for ln in reversed(log) if ln), f'error {rc}')}")
    fallback = [i for i, ln in enumerate(log) if "falling back" in ln]
    if fallback:  # belt and braces: the row check should make this impossible
        i = fallback[0]  # the tensor name is in the line before "-> falling back to ..."
        raise EdgepruneError(f"llama.cpp fell back to another type while quantizing to {dtype}: {' '.join(log[max(i - 1, 0):i + 1])}")


# ----------------------------------------------------------------------------------------------
# benchmark (no torch: run it in a fresh process for a clean peak RSS)


def bench_gguf(path, threads: int | None = None, prompt_tokens: int = 128, gen_tokens: int = 64, repeats: int = 3) -> dict:
    """llama.cpp CPU speed: prefill and decode tokens/s, time to first token, peak RSS (median of repeats).

    Prefill evaluates `prompt_tokens` real tokens in one batch; decode then evaluates `gen_tokens`
    greedy tokens one at a time; each repeat starts from an empty KV cache.
    """
    path = Path(path)
    if not path.is_file():
        raise EdgepruneError(f"GGUF file not found: {path}")
    if prompt_tokens < 1 or gen_tokens < 1 or repeats < 1:
        raise EdgepruneError("--prompt-tokens, --gen-tokens and --repeats must be at least 1")
    threads = _threads(threads)
    llm = open_llama(path, n_ctx=prompt_tokens + gen_tokens, n_threads=threads, logits_all=False, n_batch=prompt_tokens)
    import llama_cpp

    text = llm.tokenize(verification_text().encode("utf-8"), add_bos=False)
    prompt = (text * (prompt_tokens // max(len(text), 1) + 1))[:prompt_tokens]
    n_vocab = llm.n_vocab()

    def last_logits_argmax() -> int:
        logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(n_vocab,))))

    llm.reset()
    llm.eval(prompt[:8])  # warm-up: page the weights in, build the compute graphs
    prefill, decode, ttft = [], [], []
    for _ in range(repeats):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        tok = last_logits_argmax()
        t1 = time.perf_counter()
        for _ in range(gen_tokens):
            llm.eval([tok])
            tok = last_logits_argmax()
        t2 = time.perf_counter()
        prefill.append(prompt_tokens / (t1 - t0))
        decode.append(gen_tokens / (t2 - t1))
        ttft.append(t1 - t0)
    arch = llm.metadata.get("general.architecture", "unknown")
    llm.close()
    return {
        "path": str(path),
        "arch": arch,
        "file_bytes": path.stat().st_size,
        "threads": threads,
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "prefill_tok_s": summarize(prefill),
        "decode_tok_s": summarize(decode),
        "ttft_s": summarize(ttft),
        "peak_rss_mb": peak_rss_mb(),
        "runtime": f"llama-cpp-python {llama_cpp.__version__}",
    }


def main(argv: list[str] | None = None) -> int:
    from edgeprune.exporters.common import bench_main

    return bench_main("python -m edgeprune.exporters.gguf", bench_gguf, argv)


if __name__ == "__main__":
    sys.exit(main())
