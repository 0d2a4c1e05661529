"""edgeprune.scale_models (random-weight models with real shapes) and benchmarks/scale.py's measurement helpers."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from edgeprune import scale_models as sm

REPO = Path(__file__).resolve().parents[1]

# (name, published parameter count, hidden, ffn, layers, heads, kv heads, head_dim, vocab, rope_theta)
PUBLISHED = [
    ("smollm2-135m", 134.5e6, 576, 1536, 30, 9, 3, 64, 49152, 100000.0),
    ("smollm2-360m", 362e6, 960, 2560, 32, 15, 5, 64, 49152, 100000.0),
    ("qwen2.5-0.5b", 494e6, 896, 4864, 24, 14, 2, 64, 151936, 1000000.0),
    ("llama-3.2-1b", 1.24e9, 2048, 8192, 16, 32, 8, 64, 128256, 500000.0),
    ("llama-3.2-3b", 3.21e9, 3072, 8192, 28, 24, 8, 128, 128256, 500000.0),
]


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    return sm.build_random_model("smoke", tmp_path_factory.mktemp("scale") / "smoke")


@pytest.mark.parametrize("name,published,hidden,ffn,layers,heads,kv,hd,vocab,theta", PUBLISHED)
def test_real_shapes(name, published, hidden, ffn, layers, heads, kv, hd, vocab, theta):
    cfg = sm.make_config(name)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.vocab_size, cfg.rope_theta) == (hidden, ffn, layers, heads, kv, vocab, theta)
    assert (getattr(cfg, "head_dim", None) or hidden // heads) == hd
    assert cfg.tie_word_embeddings
    counts = sm.param_counts(cfg)
    assert abs(counts["total"] / published - 1) < 0.01, counts
    assert counts["fp32_bytes"] == 4 * counts["total"]
    assert counts["embedding"] == vocab * hidden and counts["non_embedding"] == counts["total"] - counts["embedding"]


def test_family_specifics():
    llama1b = sm.make_config("llama-3.2-1b")
    assert llama1b.rope_scaling == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8192}
    assert llama1b.model_type == "llama" and sm.make_config("qwen2.5-0.5b").model_type == "qwen2"
    attn = sm.meta_model(sm.make_config("qwen2.5-0.5b")).model.layers[0].self_attn
    assert all(getattr(attn, p).bias is not None for p in ("q_proj", "k_proj", "v_proj")) and attn.o_proj.bias is None
    attn = sm.meta_model(llama1b).model.layers[0].self_attn
    assert attn.q_proj.bias is None


@pytest.mark.parametrize("vocab", [300, 1024, 49152])
def test_padded_tokenizer_has_exactly_vocab_size(vocab):
    tok = sm.padded_tokenizer(vocab)
    assert len(tok) == vocab
    assert sorted(tok.get_vocab().values()) == list(range(vocab))
    if vocab > 384:  # a padding token is one token both ways
        extra = f"<|extra_{vocab - 1}|>"
        assert tok.convert_tokens_to_ids(extra) == vocab - 1
        assert tok(f"a{extra}b", add_special_tokens=False)["input_ids"][1] == vocab - 1
        assert tok.decode([vocab - 1]) == extra


def test_smoke_model_loads_with_its_shapes(smoke_dir):
    from transformers import AutoModelForCausalLM

    from edgeprune.models import load_model

    info = json.loads((smoke_dir / "scale_model.json").read_text())
    assert info["params"] == sm.param_counts(sm.make_config("smoke"))
    _, loading = AutoModelForCausalLM.from_pretrained(str(smoke_dir), output_loading_info=True)
    assert not any(loading.values()), loading  # no missing, unexpected or mismatched weights
    lm = load_model(str(smoke_dir))
    cfg = lm.model.config
    assert cfg.hidden_size == 128 and cfg.num_hidden_layers == 2 and cfg.intermediate_size == 256
    assert len(lm.tokenizer) == cfg.vocab_size == 1024
    assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight
    ids = torch.randint(3, 380, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = lm.model(ids).logits[0]
    assert (logits.argmax(-1) == ids[0]).all()  # the copy structure that keeps quantized argmaxes stable
    assert 20 < logits.max(-1).values.mean() < 60


def test_build_is_deterministic_and_shards_load_alike(smoke_dir, tmp_path):
    from edgeprune.models import load_model

    again = sm.build_random_model("smoke", tmp_path / "again")
    assert (again / "model.safetensors").read_bytes() == (smoke_dir / "model.safetensors").read_bytes()
    sharded = sm.build_random_model("smoke", tmp_path / "sharded", max_shard_bytes=400_000)
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 2 and (sharded / "model.safetensors.index.json").is_file()
    assert not (sharded / "model.safetensors").exists()
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        a = load_model(str(smoke_dir)).model(ids).logits
        b = load_model(str(sharded)).model(ids).logits
    assert torch.equal(a, b)
    assert not list(tmp_path.glob(".*partial"))  # the temporary build directories are gone


def test_cached_model_builds_once(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPRUNE_CACHE", str(tmp_path / "cache"))
    path = sm.cached_model("smoke")
    assert path == tmp_path / "cache" / "scale" / "smoke"
    stamp = (path / "scale_model.json").read_text()
    assert sm.cached_model("smoke") == path and (path / "scale_model.json").read_text() == stamp
    (path / "scale_model.json").unlink()  # an incomplete build is rebuilt
    assert sm.cached_model("smoke") == path and (path / "scale_model.json").is_file()


def test_unknown_name_is_one_line():
    from edgeprune.errors import EdgepruneError

    with pytest.raises(EdgepruneError, match="unknown scale model"):
        sm.make_config("llama-9b")


@pytest.mark.llamacpp
def test_smoke_gguf_in_llamacpp(smoke_dir, tmp_path, llama_cpp):
    """The padded vocabulary survives the GGUF export: llama.cpp tokenizes as HF does and agrees with torch."""
    from edgeprune.artifacts import export_artifact
    from edgeprune.exporters.llamacpp import open_llama
    from edgeprune.models import load_model

    lm = load_model(str(smoke_dir))
    rep = export_artifact(lm.model, lm.tokenizer, "gguf", "q4_0", tmp_path / "smoke.gguf", verify=True)
    assert rep["verification"]["tokenizer_match"] and rep["verification"]["top1_agreement"] >= 0.99
    llm = open_llama(tmp_path / "smoke.gguf", n_ctx=64)
    try:
        assert llm.n_vocab() == 1024
        assert llm.tokenize(b"<|extra_1000|>", add_bos=False, special=True) == [1000]
    finally:
        llm.close()


# ------------------------------------------------------------------------- benchmarks/scale.py
@pytest.fixture(scope="module")
def scale():
    spec = importlib.util.spec_from_file_location("scale_bench", REPO / "benchmarks" / "scale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_run_measured_peak_rss_and_timeout(scale, tmp_path):
    import os

    # A spawner whose past peak is far above its current RSS (pytest after a fit test): the child's
    # ru_maxrss inherits that peak and must not be taken for the child's.
    big = bytearray(1024 * 2**20)
    big[::4096] = b"x" * len(big[::4096])
    del big
    grow = "import time; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.5); print('{\"ok\": 1}')"
    r = scale.run_measured([sys.executable, "-c", grow], dict(os.environ), 60, tmp_path, "grow")
    assert r["exit_code"] == 0 and r["report"] == {"ok": 1}
    assert 300 * 2**20 < r["peak_rss_bytes"] < 600 * 2**20
    child = "import subprocess, sys; subprocess.run([sys.executable, '-c', " + repr(grow) + "]); print('{}')"
    r = scale.run_measured([sys.executable, "-c", child], dict(os.environ), 60, tmp_path, "tree")
    assert r["ru_maxrss_bytes"] > 300 * 2**20  # a grandchild's peak counts
    r = scale.run_measured([sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ), 1, tmp_path, "slow")
    assert r["timed_out"] and r["exit_code"] == -15 and r["wall_s"] < 30


def test_growth_fit(scale):
    rows = [{"model": m, "stage": "prune", "exit_code": 0, "params": p, "tokens": 4096, "wall_s": 10 + 2e-9 * p * 4096,
             "peak_rss_bytes": 5e8 + 3 * p, "rss_ratio": (5e8 + 3 * p) / (4 * p)} for m, p in (("a", 1e8), ("b", 4e8), ("c", 1e9))]
    f = scale.fit_growth(rows)["prune"]
    assert f["time_line"]["s_per_param_token"] == pytest.approx(2e-9) and f["time_line"]["intercept_s"] == pytest.approx(10)
    assert f["rss_line"]["bytes_per_param"] == pytest.approx(3) and f["rss_line"]["intercept_bytes"] == pytest.approx(5e8)
    assert f["rss_ratio_trend"] == "falling"
    wall, rss = scale.predict(f, 2e9, 4096)
    assert rss == pytest.approx(5e8 + 6e9) and wall == pytest.approx(10 + 2e-9 * 2e9 * 4096)
