"""Synthetic model shapes for host measurement, and building and exporting their random-weight models.

A synthetic shape is a `ModelGeometry` whose `name` labels it. Latency does not depend on weight
values, so each shape is built as a random LlamaForCausalLM of exactly that geometry and exported
with edgeprune's own exporters (GGUF for llama.cpp, ONNX for onnxruntime).

Caveat for x86 hosts: models smaller than the last-level cache run faster than the bandwidth term
predicts; the fitting and held-out shapes are kept above ~45 MB (the development host's L3 is 32 MB).
"""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

from edgeprune.errors import EdgepruneError
from edgeprune.geometry import LayerShape, ModelGeometry

# ------------------------------------------------------------------------------------------ shapes


def synthetic_shape(name: str, hidden: int, layers: int, heads: int, kv_heads: int, ffn: int, vocab: int,
                    ffn_list: tuple[int, ...] = (), kv_list: tuple[int, ...] = (), head_dim: int = 64) -> ModelGeometry:
    """A geometry of `layers` layers, optionally narrowed per layer, labelled `name`.

    ffn_list: per-layer FFN widths (non-uniform: GGUF `deci`). kv_list: per-layer KV heads; query
    heads scale with them so every layer keeps the `heads // kv_heads` group size.
    """
    group = heads // kv_heads
    shapes = []
    for i in range(layers):
        kv = kv_list[i] if kv_list else kv_heads
        shapes.append(LayerShape(n_heads=kv * group, n_kv_heads=kv, ffn=ffn_list[i] if ffn_list else ffn))
    return ModelGeometry.from_shapes(shapes, hidden, vocab, head_dim, tied=True, name=name)


def fitting_shapes(quick: bool = False) -> list[ModelGeometry]:
    """Shapes that separate bytes, layer count and FLOPs; all at least 2x a 32 MB L3 at 8 bits."""
    shapes = [
        synthetic_shape("cal-d512-L10-big-vocab", 512, 10, 8, 2, 1536, 49152),
        synthetic_shape("cal-d384-L32-many-layers", 384, 32, 6, 2, 1024, 32000),
        synthetic_shape("cal-d768-L10", 768, 10, 12, 4, 2048, 32000),
        synthetic_shape("cal-d640-L20-small-vocab", 640, 20, 10, 2, 1792, 8192),
        synthetic_shape("cal-d448-L16", 448, 16, 7, 1, 1280, 49152),
        synthetic_shape("cal-d1024-L4", 1024, 4, 16, 4, 2816, 32000),
    ]
    if not quick:
        shapes += [
            synthetic_shape("cal-d896-L8", 896, 8, 14, 2, 2432, 16384),
            synthetic_shape("cal-d256-L48-thin", 256, 48, 4, 2, 1024, 49152),
        ]
    return shapes


def heldout_shapes(quick: bool = False) -> list[ModelGeometry]:
    """SmolLM2-135M-like geometries (d 576, 9/3 heads of 64, FFN 1536, vocab 49152) at reduced depth.

    Dense, uniformly FFN-pruned, non-uniform FFN (GGUF `deci`), layer-dropped, KV-group-pruned and
    mixed: the kinds of candidates `edgeprune fit` scores. None of them is a fitting shape.
    """
    d, h, kv, f, v = 576, 9, 3, 1536, 49152
    nonuni = (1536, 1408, 1280, 1152, 1024, 896, 768, 896, 1024, 1152, 1280, 1408, 1536, 1536)
    shapes = [
        synthetic_shape("smol-like-dense-L14", d, 14, h, kv, f, v),
        synthetic_shape("smol-like-ffn40-L14", d, 14, h, kv, 928, v),
        synthetic_shape("smol-like-ffn-nonuniform-L14", d, 14, h, kv, f, v, ffn_list=nonuni),
        synthetic_shape("smol-like-dropped-L12", d, 12, h, kv, f, v),
        synthetic_shape("smol-like-kv-pruned-L14", d, 14, h, kv, f, v, kv_list=(3, 3, 2, 2, 1, 1, 2, 2, 1, 1, 2, 3, 3, 3)),
        synthetic_shape("smol-like-mixed-L13", d, 13, h, kv, f, v,
                        ffn_list=(1536, 1280, 1024, 768, 768, 1024, 1280, 1536, 1024, 768, 1024, 1280, 1536),
                        kv_list=(3, 2, 2, 3, 1, 3, 2, 2, 3, 1, 2, 3, 3)),
        synthetic_shape("smol-like-dense-L20", d, 20, h, kv, f, v),
    ]
    if not quick:
        shapes += [
            synthetic_shape("smol-like-ffn25-L24", d, 24, h, kv, 1152, v),
            synthetic_shape("smollm2-135m-geometry", d, 30, h, kv, f, v),
        ]
    return shapes


# ---------------------------------------------------------------------------------- random models

_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# A few merges because the GGUF vocabulary needs a non-empty merge list; text is never tokenized.
_MERGES = (("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"))

_TOKENIZER = None


def synthetic_tokenizer():
    """A byte-level BPE tokenizer (GPT-2 splitting, ChatML-style special tokens) built without training.

    Its ~260 ids cover the first embedding rows; the exporters write the remaining rows of a
    synthetic model's vocabulary as unused padding tokens, so the lm_head costs what a real
    vocabulary costs. Built once per process.
    """
    global _TOKENIZER
    if _TOKENIZER is None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {t: i for i, t in enumerate(_SPECIAL_TOKENS)}
        for t in sorted(pre_tokenizers.ByteLevel.alphabet()) + ["".join(m) for m in _MERGES]:
            vocab.setdefault(t, len(vocab))
        tok = Tokenizer(models.BPE(vocab=vocab, merges=list(_MERGES)))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(list(_SPECIAL_TOKENS))
        _TOKENIZER = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                             unk_token="<|endoftext|>", pad_token="<|im_end|>")
    return _TOKENIZER


def build_model(shape: ModelGeometry, seed: int = 0):
    """(model, tokenizer): a random tied LlamaForCausalLM of exactly `shape`'s geometry.

    The config holds the widest layer (what a dense model of this family would have); narrower
    layers are resized afterwards and get fresh random weights.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from edgeprune.arch import geometry, layers, resize_layer

    if not shape.tied or shape.qkv_bias:
        raise EdgepruneError(f"synthetic shape {shape.name}: only tied models without q/k/v biases are built")
    tok = synthetic_tokenizer()
    if shape.vocab < len(tok):
        raise EdgepruneError(f"synthetic shape {shape.name}: vocab {shape.vocab} < the tokenizer's {len(tok)} ids")
    widest = LayerShape(max(s.n_heads for s in shape.layers), max(s.n_kv_heads for s in shape.layers),
                        max(s.ffn for s in shape.layers))
    cfg = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=widest.ffn,
                      num_hidden_layers=shape.n_layers, num_attention_heads=widest.n_heads,
                      num_key_value_heads=widest.n_kv_heads, head_dim=shape.head_dim, max_position_embeddings=2048,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, initializer_range=0.05)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer, s in zip(layers(model), shape.layers):
            if s != widest:
                resize_layer(layer, s, shape.head_dim)
                for mod in (layer.self_attn, layer.mlp):
                    for p in mod.parameters():
                        p.normal_(0.0, 0.05)
    built = geometry(model, name=shape.name)
    if built != shape:
        raise EdgepruneError(f"synthetic shape {shape.name}: built {built}, not the requested geometry")
    return model, tok


# ------------------------------------------------------------------------------------------ export


def export_shape(shape: ModelGeometry, backend: str, dtype: str, workdir: Path, note=None) -> Path:
    """Build a random model of `shape` and export it for `backend` (no verification); the artifact's path.

    note: an optional `note(message)` for one line per export.
    """
    model, tok = build_model(shape)
    if backend == "llama.cpp":
        from edgeprune.exporters.gguf import export_gguf

        path = workdir / f"{shape.name}.{dtype}.gguf"
        if note:
            note(f"{shape.name}: exporting {dtype} GGUF")
        export_gguf(model, tok, path, dtype=dtype, verify=False)
    else:
        from edgeprune.exporters.onnx import export_onnx

        path = workdir / f"{shape.name}.{dtype}.onnx-dir"  # an ONNX export is a directory
        if note:
            note(f"{shape.name}: exporting {dtype} ONNX")
        # the ONNX exporter names f32 "fp32"; latency dtypes are shared with GGUF
        export_onnx(model, tok, path, dtype={"f32": "fp32"}.get(dtype, dtype), verify=False)
    del model
    gc.collect()
    return path


def artifact_bytes(path: Path) -> int:
    """Bytes of an exported file (with any files named after it) or of an export directory."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    total = path.stat().st_size if path.exists() else 0
    return total + sum(p.stat().st_size for p in path.parent.glob(path.name + "?*") if p.is_file())


def remove_artifact(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
        for extra in path.parent.glob(path.name + "?*"):  # external-data files next to an .onnx
            if extra.is_file():
                extra.unlink(missing_ok=True)
