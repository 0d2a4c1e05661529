"""Every model family end to end on tiny random models built from transformers configs:
calibrate -> plan (shapes the family's GGUF can hold) -> prune -> checkpoint round trip -> GGUF in
llama.cpp agrees with torch; a user's GGUF of each family is checked against llama.cpp on load.
(ONNX per family: tests/test_onnx_families.py.)"""

import json

import numpy as np
import pytest
import torch

from edgeprune import families
from edgeprune.arch import layer_shapes
from edgeprune.calibrate import calibrate
from edgeprune.checkpoint import load_pruned, save_pruned
from edgeprune.errors import EdgepruneError
from edgeprune.exporters import gguf as G
from edgeprune.plan import base_description
from edgeprune.prune import make_plan, pruned_copy, resolve_shapes
from edgeprune.testing import TINY_FAMILIES, tiny_model

THREADS = 1
GGUF_ARCH = {"llama": "llama", "llama3": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3"}
PER_LAYER = {"llama": True, "llama3": True, "mistral": True, "qwen2": True, "qwen3": False, "gemma3": False}


@pytest.fixture(scope="module")
def windows(tok):
    from edgeprune.exporters.common import verification_windows

    return verification_windows(tok, seqlen=96, n=2)  # 96 tokens: past the tiny Gemma's 24-token window


def _pruned(family, tok, heads=True, shapes="auto", recover="none", drop=1):
    model, _ = tiny_model(family, tok, layers=6, ffn=256)
    ids = torch.randint(0, len(tok), (8, 64), generator=torch.Generator().manual_seed(0))
    stats = calibrate(model, ids, gram=recover == "lstsq")
    plan = make_plan(model, stats, base_description(model, f"tiny-{family}", "x"), 0.4, heads=heads, shapes=shapes,
                     drop_layers=drop, recover=recover)
    return model, pruned_copy(model, plan), plan


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_family_prunes_reloads_and_exports_gguf(family, tok, windows, tmp_path, llama_cpp, one_torch_thread):
    dense, pruned, plan = _pruned(family, tok)
    shapes = layer_shapes(pruned)
    assert plan.method["shapes"] == ("per-layer" if PER_LAYER[family] else "uniform")
    assert plan.method["allocation"] == ("cfsp" if PER_LAYER[family] else "uniform")  # said in the plan
    if not PER_LAYER[family]:  # one shape in every layer, as llama.cpp's qwen3/gemma3 graphs need
        assert len({(s.n_heads, s.n_kv_heads, s.ffn) for s in shapes}) == 1
    assert sum(s.ffn for s in shapes) < 6 * 256 and len(shapes) == 5
    if family == "gemma3":  # the dropped layer's kind goes with it; the rest keep theirs
        kept = [lp.index for lp in plan.layers]
        assert pruned.config.layer_types == [dense.config.layer_types[i] for i in kept]
        assert [layer.attention_type for layer in pruned.model.layers] == pruned.config.layer_types

    save_pruned(pruned, tok, plan, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["model_type"] == dense.config.model_type
    assert config["auto_map"]["AutoModelForCausalLM"] == f"modeling_edgeprune.Edgeprune{type(dense).__name__}"
    reloaded = load_pruned(tmp_path / "ckpt").model
    assert type(reloaded) is type(dense)
    ids = torch.as_tensor(windows[:1])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, pruned(ids).logits)

    report = G.export_gguf(pruned, tok, tmp_path / "m.gguf", verify_windows=windows, n_threads=THREADS)
    per_layer = len({(s.n_heads, s.n_kv_heads, s.ffn) for s in shapes}) > 1
    assert report["arch"] == ("deci" if per_layer or (family == "qwen2" and shapes[0].n_heads < 4) else GGUF_ARCH[family])
    assert report["verification"]["top1_agreement"] >= 0.995  # f32: the export bar (verify_gguf raises below it)
    q8 = G.export_gguf(pruned, tok, tmp_path / "q8.gguf", dtype="q8_0", verify_windows=windows, n_threads=THREADS)
    assert q8["verification"]["top1_agreement"] >= 0.85


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_per_layer_shapes_of_a_uniform_only_family_refuse_gguf_and_say_why(family, tok, tmp_path):
    _, pruned, plan = _pruned(family, tok, shapes="per-layer")
    assert len({s.ffn for s in layer_shapes(pruned)}) > 1
    with pytest.raises(EdgepruneError, match=r"builds every layer from layer 0's shape.*--shapes uniform"):
        G.export_gguf(pruned, tok, tmp_path / "m.gguf", verify=False)
    assert list(tmp_path.iterdir()) == []


def test_bias_compensation_on_gemma_refuses_gguf(tok, tmp_path):
    _, pruned, _ = _pruned("gemma3", tok, recover="bias")
    assert any(layer.mlp.down_proj.bias is not None for layer in pruned.model.layers)
    with pytest.raises(EdgepruneError, match="reads no ffn_down bias"):
        G.export_gguf(pruned, tok, tmp_path / "m.gguf", verify=False)


def test_qwen2_pruned_heads_go_to_deci(tok, windows, tmp_path, llama_cpp, one_torch_thread):
    """qwen2's graph sizes q/o as hidden x hidden: uniform but head-pruned shapes need deci (biases and all)."""
    from edgeprune.testing import slice_layers

    model, _ = tiny_model("qwen2", tok, layers=4)
    slice_layers(model, {i: ([0, 1], [0], 128, False, False) for i in range(4)})
    report = G.export_gguf(model, tok, tmp_path / "m.gguf", verify_windows=windows, n_threads=THREADS)
    assert report["arch"] == "deci" and report["verification"]["top1_agreement"] >= 0.995


def test_shapes_auto_follows_the_family_and_flap_refuses_uniform(tok):
    assert [resolve_shapes("auto", family=f) for f in families.FAMILIES] == [
        "per-layer" if f.per_layer_arch else "uniform" for f in families.FAMILIES]
    model, _ = tiny_model("llama", tok)
    with pytest.raises(EdgepruneError, match="--shapes must be one of"):
        resolve_shapes("ragged", model)
    stats = calibrate(model, torch.randint(0, len(tok), (4, 32)))
    with pytest.raises(EdgepruneError, match="--method flap"):
        make_plan(model, stats, base_description(model, "t", "x"), 0.3, method="flap", shapes="uniform")


def test_uniform_shapes_keep_the_budget(tok):
    model, _ = tiny_model("llama", tok, layers=6, ffn=256)
    stats = calibrate(model, torch.randint(0, len(tok), (4, 32)))
    for p in (0.2, 0.5):
        plan = make_plan(model, stats, base_description(model, "t", "x"), p, shapes="uniform")
        widths = plan.widths()
        assert len(set(widths)) == 1 and widths[0] % 32 == 0
        assert abs(plan.achieved["ffn_sparsity"] - p) <= 32 / 256 / 2 + 1e-9  # within half an alignment step


# Gemma 3 from a GGUF is covered by the real model (test_integration_gemma3.py): transformers
# converts a gemma3 GGUF's vocabulary as SentencePiece only, and the tiny models' is byte-level BPE.
@pytest.mark.parametrize("family", ["llama", "llama3", "qwen2", "qwen3"])
def test_a_users_gguf_is_checked_against_llama_cpp_on_load(family, tok, tmp_path, monkeypatch, llama_cpp):
    from edgeprune.models import load_model

    monkeypatch.setenv("EDGEPRUNE_CACHE", str(tmp_path / "cache"))
    model, _ = tiny_model(family, tok, layers=3)
    G.export_gguf(model, tok, tmp_path / "user.gguf", verify=False)
    lm = load_model(str(tmp_path / "user.gguf"))
    agreement = lm.info["llamacpp_agreement"]
    assert agreement["top1_agreement"] >= 0.95 and agreement["nll_gap"] < 0.01
    assert type(lm.model).__name__ == type(model).__name__
    record = next((tmp_path / "cache" / "gguf").glob("*/llamacpp_agreement.json"))
    assert json.loads(record.read_text()) == agreement  # measured once per conversion


def test_a_gguf_that_transformers_reads_differently_from_llama_cpp_stops(tok, tmp_path, monkeypatch, llama_cpp):
    """A conversion that gets one value wrong (here the norm epsilon, forced through the loader's
    config fixes) gives a torch model that is not what llama.cpp runs: loading stops, every time."""
    from edgeprune import models

    monkeypatch.setenv("EDGEPRUNE_CACHE", str(tmp_path / "cache"))
    model, _ = tiny_model("llama", tok, layers=3)
    G.export_gguf(model, tok, tmp_path / "user.gguf", verify=False)
    monkeypatch.setattr(models, "_gguf_config_fixes", lambda path: {"rms_norm_eps": 0.5})
    with pytest.raises(EdgepruneError, match="disagrees with llama.cpp on the same file"):
        models.load_model(str(tmp_path / "user.gguf"))
    monkeypatch.undo()
    monkeypatch.setenv("EDGEPRUNE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(EdgepruneError, match="disagrees with llama.cpp"):  # remembered with the cached conversion
        models.load_model(str(tmp_path / "user.gguf"))


def test_spm_merges_rank_every_split_by_the_pieces_score():
    from edgeprune.gguf_vocab import spm_merges

    N, B, C = 1, 6, 3  # gguf.TokenType NORMAL, BYTE, CONTROL
    tokens = ["<bos>", "a", "b", "c", "ab", "bc", "abc", "<0x41>"]
    scores = [0.0, -1.0, -2.0, -3.0, -5.0, -4.0, -6.0, 0.0]
    types = [C, N, N, N, N, N, N, B]
    assert spm_merges(tokens, scores, types) == [("b", "c"), ("a", "b"), ("a", "bc"), ("ab", "c")]
