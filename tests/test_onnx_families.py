"""ONNX export of every model family (edgeprune.testing.TINY_FAMILIES), checked against torch:
dense and per-layer pruned fp32 (full-sequence logits over 80 tokens, past Gemma 3's 24-token
window, and KV-cache decoding), int8, the family-specific config variants no tiny default
exercises (Gemma's attention scale and logit softcapping, Mistral's and Qwen2's sliding windows),
and the configs the graph refuses."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from edgeprune.errors import EdgepruneError
from edgeprune.exporters.onnx import OnnxDecoder, check_supported, export_onnx
from edgeprune.testing import TINY_FAMILIES, slice_layers, tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEQ = 80  # > 3 x the tiny Gemma 3 window (24): sliding layers hide most keys of the last queries
WINDOWS = np.random.default_rng(0).integers(3, 380, size=(1, SEQ))
ATOL = 1e-4  # fp32 graph vs torch, as tests/test_export_onnx.py
PREFILL = 8  # the decode check prefills this many tokens, then feeds one at a time up to SEQ
SLIDING = "sliding_attention"
FULL = "full_attention"
# Before dropping layer 1: per-layer heads, KV heads, FFN widths, o/down biases (as test_export_onnx).
PLAN = {
    0: ([0, 1, 2, 3], [0, 1], 96, True, True),
    2: ([0, 1, 2], [0], 160, True, False),
    3: ([0, 1], [0, 1], 64, False, True),
}
PRUNED_SHAPES = [(4, 2, 96), (3, 1, 160), (2, 2, 64)]


def _torch_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids)[None]).logits[0].numpy()


def _check_against_torch(model, out) -> float:
    """ORT logits (one pass, then prefill + one-token steps with the KV cache) vs torch; max |Δ|."""
    ids = WINDOWS[0]
    ref = _torch_logits(model, ids)
    dec = OnnxDecoder(out)
    full = dec.logits(ids)
    np.testing.assert_allclose(full, ref, atol=ATOL, rtol=0)
    cached = np.concatenate([dec.prefill(ids[:PREFILL]), np.stack([dec.step(int(t)) for t in ids[PREFILL:]])])
    np.testing.assert_allclose(cached, ref, atol=ATOL, rtol=0)
    return float(max(np.abs(full - ref).max(), np.abs(cached - ref).max()))


def _export_fp32(model, tok, out) -> dict:
    report = export_onnx(model, tok, out, verify_windows=WINDOWS)
    v = report["verification"]
    assert v["passed"] and v["top1_agreement"] == 1.0 and v["greedy_identical"], v
    return report


def _pruned(family: str):
    model, tok = tiny_model(family)
    slice_layers(model, PLAN, drop=[1], bias_std=0.1, generator=torch.Generator().manual_seed(1))
    return model.eval(), tok


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_dense_fp32_matches_torch(family, tmp_path):
    model, tok = tiny_model(family)
    report = _export_fp32(model, tok, tmp_path / "onnx")
    diff = _check_against_torch(model, tmp_path / "onnx")
    side = json.loads((tmp_path / "onnx" / "edgeprune_onnx.json").read_text())
    assert side["model_type"] == model.config.model_type and side["family"] == report["family"]
    types = getattr(model.config, "layer_types", None) or [FULL] * len(model.model.layers)
    window = getattr(model.config, "sliding_window", None)
    assert side["attention_windows"] == [window if t == SLIDING else None for t in types]
    print(f"{family}: max |logit diff| {diff:.2e}")


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_pruned_fp32_matches_torch(family, tmp_path):
    """Per-layer heads, KV heads and FFN widths, o/down biases and a dropped layer."""
    model, tok = _pruned(family)
    _export_fp32(model, tok, tmp_path / "onnx")
    diff = _check_against_torch(model, tmp_path / "onnx")
    side = json.loads((tmp_path / "onnx" / "edgeprune_onnx.json").read_text())
    assert [(s["n_heads"], s["n_kv_heads"], s["ffn"]) for s in side["layers"]] == PRUNED_SHAPES
    if family == "gemma3":
        # [S, S, F, S] minus layer 1: the global layer moves to index 1 and stays global
        kinds = [SLIDING, FULL, SLIDING]
        assert model.config.layer_types == kinds
        assert [layer.attention_type for layer in model.model.layers] == kinds
        assert side["attention_windows"] == [24, None, 24]
    print(f"{family} pruned: max |logit diff| {diff:.2e}")


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_int8_top1(family, tmp_path):
    model, tok = tiny_model(family)
    report = export_onnx(model, tok, tmp_path / "int8", dtype="int8", verify_windows=WINDOWS)
    v, q = report["verification"], report["quantization"]
    assert v["passed"] and v["top1_agreement"] >= 0.9, v
    assert q["lm_head_quantized"] and q["fp32_weight_matmuls"] == []
    print(f"{family} int8: top-1 {v['top1_agreement']:.3f}, KL {v['mean_kl']:.4f}")


def _gemma_scaled_softcapped():
    """Gemma 3 with query_pre_attn_scalar != head_dim and final logit softcapping (tiny defaults
    have neither); the module's scale is what torch uses, so it is set with the config."""
    model, tok = tiny_model("gemma3")
    model.config.query_pre_attn_scalar = 40
    for layer in model.model.layers:
        layer.self_attn.scaling = 40**-0.5
    model.config.final_logit_softcapping = 3.0  # tiny logits have std ~4: the cap bends most
    return model, tok


def _mistral_sliding():
    """Mistral masks every layer with config.sliding_window."""
    model, tok = tiny_model("mistral")
    model.config.sliding_window = 24
    return model, tok


def _qwen2_sliding():
    """Qwen2 with use_sliding_window: layers >= max_window_layers slide (one rotary base for all)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    ref, tok = tiny_model("qwen2")
    cfg = Qwen2Config(**{**ref.config.to_dict(), "use_sliding_window": True, "max_window_layers": 2,
                         "sliding_window": 24, "layer_types": None})
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.load_state_dict(ref.state_dict())
    assert model.config.layer_types == [FULL, FULL, SLIDING, SLIDING]
    return model, tok


def _without_window(model):
    """The same weights with the window out of reach: what the sliding variants must differ from."""
    wide = copy.deepcopy(model)
    wide.config.sliding_window = 10**6
    return wide


@pytest.mark.parametrize("variant", ["gemma3_scale_softcap", "mistral_sliding", "qwen2_sliding"])
def test_family_variants_match_torch(variant, tmp_path):
    model, tok = {"gemma3_scale_softcap": _gemma_scaled_softcapped, "mistral_sliding": _mistral_sliding,
                  "qwen2_sliding": _qwen2_sliding}[variant]()
    ref = _torch_logits(model, WINDOWS[0])
    if variant == "gemma3_scale_softcap":
        assert np.abs(ref).max() <= 3.0 + 1e-5
    else:  # the window changes torch's logits past it, so agreeing below means the graph masks
        assert np.abs(_torch_logits(_without_window(model), WINDOWS[0]) - ref)[24:].max() > 0.01
    _export_fp32(model, tok, tmp_path / "onnx")
    diff = _check_against_torch(model, tmp_path / "onnx")
    print(f"{variant}: max |logit diff| {diff:.2e}")


def test_gemma3_left_padding_batch_matches_single_sequences(tmp_path):
    """Batch 2, the shorter row left-padded: the sliding mask counts cache slots as HF does."""
    model, tok = tiny_model("gemma3")
    export_onnx(model, tok, tmp_path / "onnx", verify=False)
    dec = OnnxDecoder(tmp_path / "onnx")
    a, b = WINDOWS[0][:60], WINDOWS[0][10:50]
    ids = np.stack([a, np.concatenate([np.zeros(20, np.int64), b])])
    mask = np.array([[1] * 60, [0] * 20 + [1] * 40])
    pos = np.maximum(mask.cumsum(-1) - 1, 0)
    logits, _ = dec.run(ids, mask, pos, dec.empty_past(2))
    np.testing.assert_allclose(logits[0], _torch_logits(model, a), atol=ATOL, rtol=0)
    np.testing.assert_allclose(logits[1, 20:], _torch_logits(model, b), atol=ATOL, rtol=0)


def _attn_softcap(model):
    model.config.attn_logit_softcapping = 50.0


def _dynamic_rope(model):
    model.model.rotary_emb.rope_type = "dynamic"


def _relu(model):
    model.model.layers[1].mlp.act_fn = torch.nn.ReLU()


def _unknown_type(model):
    model.config.model_type = "gpt2"


def _bidirectional(model):
    model.config.use_bidirectional_attention = True


@pytest.mark.parametrize(
    "family, breaks, match",
    [
        ("gemma3", _attn_softcap, "attn_logit_softcapping"),
        ("gemma3", _bidirectional, "bidirectional"),
        ("llama", _dynamic_rope, "rope_type 'dynamic'"),
        ("qwen3", _relu, "ReLU"),
        ("llama", _unknown_type, "unsupported architecture 'gpt2'"),
    ],
)
def test_unsupported_config_is_refused(family, breaks, match, tmp_path):
    model, tok = tiny_model(family, layers=2)
    breaks(model)
    with pytest.raises(EdgepruneError, match=match) as err:
        check_supported(model)
    assert "\n" not in str(err.value)
    with pytest.raises(EdgepruneError, match=match):
        export_onnx(model, tok, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists() and list(tmp_path.iterdir()) == []
