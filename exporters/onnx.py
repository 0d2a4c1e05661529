"""ONNX export for onnxruntime: one KV-cache decoder graph, verified against torch before it is kept.

    export_onnx(model, tokenizer, out_dir, dtype="fp32" | "int8" | "int4" | "int4_b128") -> report dict
    check_supported(model)                                     (raises EdgepruneError before any file)
    ort_logits_fn(dir), OnnxDecoder(dir), bench_onnx(dir)      (onnx_runtime.py, torch-free)
    python -m edgeprune.exporters.onnx bench DIR --threads 2   (one JSON line, clean RSS)

The directory holds model.onnx + model.onnx_data (the graph and its weights), config.json,
generation_config.json and the tokenizer (so optimum's ORTModelForCausalLM can load it where
every layer keeps the dense KV-head count), and edgeprune_onnx.json: the family and model_type,
the true per-layer shapes and attention windows, I/O names, dtype, quantization and the
verification figures. Every family of edgeprune.families exports (onnx_graph builds each one's
norms, activation, rotary tables and masks), at per-layer shapes.

Quantization is weight-only, block-wise (onnxruntime MatMulNBits, block 32, symmetric,
accuracy_level 4 = int8 activations per block inside the kernel, which doubled int4 decode speed
on this AVX2 CPU with no accuracy change). Why not `quantize_dynamic` for int8: its per-tensor
activation quantization meets SmolLM2's activation outliers (down_proj inputs) and gave top-1 0.60 /
KL 0.60 on SmolLM2-135M (per_channel: 0.0, likely the u8s8 overflow of AVX2 without VNNI; 0.61 with
reduce_range; 0.82 with down_proj left in fp32), against 0.97 / 0.005 for 8-bit MatMulNBits, which
was also faster. The lm_head is quantized too (a tied head gets its own
copy for that); int4 also stores the embedding table in 4 bits (GatherBlockQuantized; 8-bit Gather
is not supported by the quantizer, so int8 keeps it in fp32).

Torch is imported only inside the export path, never at module import (see bench).
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from edgeprune import dtypes
from edgeprune.errors import EdgepruneError, VerificationError
from edgeprune.exporters.common import GREEDY_TOKENS, MIN_TOP1_EXACT, atomic_dir, torch_greedy
from edgeprune.exporters.onnx_runtime import (  # noqa: F401  (public API of this module)
    MODEL_FILE,
    SIDECAR_FILE,
    OnnxDecoder,
    artifact_bytes,
    bench_onnx,
    ort_logits_fn,
    read_sidecar,
)

DTYPES = dtypes.ONNX_DTYPES
# Weight-only MatMulNBits settings per dtype (edgeprune.dtypes names them and their storage).
# int4_b128 trades accuracy for bytes: one f32 scale per 128 weights (4.25 bpw) instead of per 32 (5).
_QUANT = {
    "int8": {"bits": 8, "block_size": 32, "is_symmetric": True, "accuracy_level": 4, "embedding": False},
    "int4": {"bits": 4, "block_size": 32, "is_symmetric": True, "accuracy_level": 4, "embedding": True},
    "int4_b128": {"bits": 4, "block_size": 128, "is_symmetric": True, "accuracy_level": 4, "embedding": True},
}
# Sanity floors for quantized artifacts: they catch a broken graph (a wrong kernel gave top-1 0.0),
# not quantization loss. SmolLM2-135M measured top-1 0.97 (int8) and 0.65 (int4): its weights are
# already dequantized Q4_1, and re-rounding to a symmetric 4-bit grid costs that much.
MIN_TOP1_QUANT = {"int8": 0.85, "int4": 0.40, "int4_b128": 0.35}
KV_REL_TOL = 1e-5  # fp32 cached decode vs recompute: |Δlogit| <= KV_REL_TOL * max(10, max|logit|)
GREEDY_PROMPT = 32  # tokens of the first verification window used as the greedy prompt
KV_PREFILL = 16  # the KV check prefills this many tokens, then decodes one at a time
KV_STEPS = 32


def check_supported(model) -> None:
    """Raise a one-line EdgepruneError if the ONNX graph cannot represent `model`: an unknown
    model_type (the families' error), attention logit softcapping, bidirectional attention, an
    activation other than SiLU / GELU, a RoPE whose frequencies change with the length, a layer
    kind other than full / sliding attention, or a layer without query or KV heads."""
    from edgeprune.exporters import onnx_graph

    onnx_graph.check_supported(model)
    onnx_graph.layer_infos(model)


def export_onnx(model, tokenizer, out_dir, dtype: str = "fp32", verify: bool = True, verify_windows=None, progress=None) -> dict:
    """Export `model` (in memory, possibly pruned) to `out_dir`; verify; swap into place atomically."""
    if dtype not in DTYPES:
        raise EdgepruneError(f"unknown ONNX dtype '{dtype}': choose one of {', '.join(DTYPES)}")
    check_supported(model)  # before the temporary directory: a refusal leaves nothing behind
    say = progress or (lambda message: None)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        start = time.perf_counter()
        say(f"writing the ONNX graph ({dtype})")
        infos, quant = _write_model(model, tmp, dtype, say)
        _write_hf_files(model, tokenizer, tmp)
        export_s = time.perf_counter() - start
        report = _report(model, infos, dtype, quant, tmp, export_s)
        if verify:
            say("verifying against torch")
            windows = verify_windows if verify_windows is not None else _default_windows(tokenizer)
            report["verification"] = verify_onnx(model, tmp, dtype, windows)
        _write_sidecar(tmp, infos, dtype, report)
    report["path"] = str(out_dir)
    return report


def _default_windows(tokenizer) -> np.ndarray:
    from edgeprune.exporters.common import verification_windows

    return verification_windows(tokenizer)


def _write_model(model, tmp: Path, dtype: str, say) -> tuple[list, dict]:
    from edgeprune.exporters.onnx_graph import build_decoder

    if dtype == "fp32":
        return build_decoder(model, tmp / MODEL_FILE), {}
    scratch = tmp / "fp32"
    scratch.mkdir()
    infos = build_decoder(model, scratch / MODEL_FILE, quantizable_lm_head=True)
    say(f"quantizing to {dtype} (MatMulNBits)")
    quant = _quantize(scratch / MODEL_FILE, tmp / MODEL_FILE, **_QUANT[dtype])
    shutil.rmtree(scratch)
    return infos, quant


def _quantize(src: Path, dst: Path, bits: int, block_size: int, is_symmetric: bool, accuracy_level: int, embedding: bool) -> dict:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from edgeprune.exporters.onnx_graph import DATA_SUFFIX

    ops, axes = ("MatMul",), (("MatMul", 0),)
    if embedding:  # GatherBlockQuantized: the [vocab, d] table blocked along d
        ops, axes = ("MatMul", "Gather"), (("MatMul", 0), ("Gather", 1))
    # The quantizer logs every node it visits at INFO/WARNING through the root logger.
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        quantizer = MatMulNBitsQuantizer(
            onnx.load(str(src)), bits=bits, block_size=block_size, is_symmetric=is_symmetric,
            accuracy_level=accuracy_level, op_types_to_quantize=ops, quant_axes=axes,
        )
        quantizer.process()
        proto = quantizer.model.model
    finally:
        logging.disable(previous)
    counts = _op_counts(proto)
    onnx.save(proto, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
              location=dst.name + DATA_SUFFIX, size_threshold=1024)
    left = [n.name for n in proto.graph.node if n.op_type in ("MatMul", "Gemm") and _has_initializer_b(proto, n)]
    return {
        "method": "onnxruntime MatMulNBits (weight-only, block-wise)",
        "bits": bits,
        "block_size": block_size,
        "symmetric": is_symmetric,
        "accuracy_level": accuracy_level,
        "quantized_matmuls": counts.get("MatMulNBits", 0),
        "fp32_weight_matmuls": left,
        "lm_head_quantized": "lm_head/MatMul" not in left,
        "embedding": f"int{bits} (GatherBlockQuantized)" if counts.get("GatherBlockQuantized") else "fp32",
    }


def _op_counts(proto) -> dict:
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _has_initializer_b(proto, node) -> bool:
    names = {t.name for t in proto.graph.initializer}
    return len(node.input) > 1 and node.input[1] in names


def _write_hf_files(model, tokenizer, tmp: Path) -> None:
    """config.json with the dense global sizes optimum expects, generation config and tokenizer."""
    from edgeprune.model_files import save_tokenizer  # handles the GGUF vocab_file pitfall

    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, "quantization_config"):  # left by transformers' GGUF loader
        delattr(cfg, "quantization_config")
    cfg.use_cache = True
    cfg.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    if tokenizer is not None:
        save_tokenizer(tokenizer, tmp)


def _report(model, infos, dtype: str, quant: dict, tmp: Path, export_s: float) -> dict:
    from edgeprune.families import family_of

    cfg = model.config
    # optimum sizes its empty KV cache from config.json: num_key_value_heads heads of
    # hidden_size // num_attention_heads each (config.head_dim only for Gemma), so only dense KV
    # heads of that width fit it
    kv_dim = cfg.head_dim if getattr(cfg, "model_type", None) == "gemma3_text" else cfg.hidden_size // cfg.num_attention_heads
    dense_kv = all(i.n_kv_heads == cfg.num_key_value_heads and i.head_dim == kv_dim for i in infos)
    files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.is_file()}
    return {
        "format": "onnx",
        "family": family_of(model).name,
        "model_type": getattr(cfg, "model_type", None),
        "dtype": dtype,
        "export_seconds": export_s,
        "size_mb": artifact_bytes(tmp) / 2**20,
        "files": files,
        "num_layers": len(infos),
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "tied_embeddings": model.lm_head.weight is model.model.embed_tokens.weight,
        "optimum_compatible": dense_kv,
        "quantization": quant or None,
    }


def _write_sidecar(tmp: Path, infos, dtype: str, report: dict) -> None:
    from edgeprune.exporters.onnx_graph import sidecar, write_json

    extra = {k: v for k, v in report.items() if k not in ("dtype", "num_layers", "files")}
    write_json(tmp / SIDECAR_FILE, sidecar(infos, dtype, extra))


# ---------------------------------------------------------------- verification


def verify_onnx(model, onnx_dir, dtype: str, windows) -> dict:
    """Compare the exported graph with torch; raise VerificationError when it fails the gates.

    Gates (fp32): top-1 >= MIN_TOP1_EXACT over `windows` (full sequence, empty cache), the same
    GREEDY_TOKENS-token greedy continuation as torch (onnxruntime decoding with its KV cache), and
    cached decoding equal to full recomputation. Quantized: top-1 >= MIN_TOP1_QUANT[dtype]; the
    rest is reported.
    """
    from edgeprune.evaluate import compare_logits, torch_logits_fn

    start = time.perf_counter()
    windows = np.asarray(windows, dtype=np.int64)
    if windows.ndim != 2 or windows.shape[1] < 4:
        raise EdgepruneError(f"verification windows must be [n, T >= 4] token ids, got shape {windows.shape}")
    dec = OnnxDecoder(onnx_dir)
    result = {"windows": int(windows.shape[0]), "seqlen": int(windows.shape[1])}
    result.update(compare_logits(torch_logits_fn(model), dec.logits, windows))
    prompt = windows[0][: min(GREEDY_PROMPT, windows.shape[1])]
    want = torch_greedy(model, prompt, GREEDY_TOKENS)
    got = dec.generate(prompt, GREEDY_TOKENS)
    result["greedy_tokens"] = GREEDY_TOKENS
    result["greedy_match_prefix"] = next((k for k, (a, b) in enumerate(zip(want, got)) if a != b), len(want))
    result["greedy_identical"] = want == got
    result.update(_kv_check(dec, windows[0]))
    result["seconds"] = time.perf_counter() - start
    del dec  # release the session (and its mapped weights) before the directory is renamed

    failures = _failures(result, dtype)
    result["passed"] = not failures
    if failures:
        raise VerificationError(f"ONNX {dtype} export failed verification: {'; '.join(failures)}")
    return result


def _failures(r: dict, dtype: str) -> list[str]:
    if dtype != "fp32":
        floor = MIN_TOP1_QUANT[dtype]
        return [f"top-1 agreement {r['top1_agreement']:.4f} < sanity floor {floor}"] if r["top1_agreement"] < floor else []
    out = []
    if r["top1_agreement"] < MIN_TOP1_EXACT:
        out.append(f"top-1 agreement {r['top1_agreement']:.4f} < {MIN_TOP1_EXACT}")
    if not r["greedy_identical"]:
        out.append(f"greedy continuation differs from torch at token {r['greedy_match_prefix']} of {GREEDY_TOKENS}")
    if r["kv_max_abs_diff"] > r["kv_tolerance"]:
        out.append(f"KV-cache decoding differs from recomputation by {r['kv_max_abs_diff']:.2e} (> {r['kv_tolerance']:.1e})")
    return out


def _kv_check(dec: OnnxDecoder, window: np.ndarray) -> dict:
    """Logits of prefill + one-token steps (with the presents as past) vs one full-sequence pass."""
    n = min(len(window), KV_PREFILL + KV_STEPS)
    pre = min(KV_PREFILL, n // 2)
    ids = window[:n]
    full = dec.logits(ids)
    cached = [dec.prefill(ids[:pre])]
    cached += [dec.step(int(t))[None] for t in ids[pre:]]
    diff = float(np.abs(np.concatenate(cached) - full).max())
    return {
        "kv_positions": int(n),
        "kv_prefill": int(pre),
        "kv_max_abs_diff": diff,
        "kv_tolerance": KV_REL_TOL * max(10.0, float(np.abs(full).max())),
    }


# ---------------------------------------------------------------- command line (torch-free)


def main(argv: list[str] | None = None) -> int:
    from edgeprune.exporters.common import bench_main

    return bench_main("python -m edgeprune.exporters.onnx", bench_onnx, argv)


if __name__ == "__main__":
    raise SystemExit(main())
