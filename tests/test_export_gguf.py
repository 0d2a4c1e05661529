"""GGUF export: uniform -> llama, per-layer shapes -> deci, quantized types, refusals, atomicity, bench.

The quantizer itself (every dtype, mix rules, imatrix, overrides) is tests/test_quantize.py.

Everything runs on the tiny random Llama (seconds); one integration test exports the real SmolLM2.
Verification windows are kept short and llama.cpp/torch run on one thread: the test machines are
small and shared, and spinning thread pools are much slower than one thread there.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from edgeprune.arch import layer_shapes
from edgeprune.errors import EdgepruneError, VerificationError
from edgeprune.exporters import gguf as G
from edgeprune.exporters import llamacpp as L
from edgeprune.exporters.common import verification_windows
from edgeprune.testing import slice_layers, tiny_llama, tiny_tokenizer

THREADS = 1


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixtures shared by the GGUF tests: conftest.py


def export(model, tok, path, windows, **kw):
    return G.export_gguf(model, tok, path, verify_windows=windows, n_threads=THREADS, **kw)


def read_gguf(path):
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    return fields, {t.name: t for t in reader.tensors}


def pruned_tiny(tok, down_bias=False, o_bias=False):
    """4 -> 3 layers; per-layer query heads 4/2/2, KV heads 2/1/2, FFN widths 192/128/96."""
    model, _ = tiny_llama(tok)
    plan = {1: ([0, 1], [0], 128, down_bias, False), 2: ([0, 2], [0, 1], 96, False, o_bias)}
    return slice_layers(model, plan, drop=[3])


# ------------------------------------------------------------------------------------------------
# pure-python parts (no llama.cpp needed)


def test_rope_permute_pairs_halves():
    # one head of dim 4: HF rows [x0, x1 | y0, y1] rotate (x_i, y_i) -> llama.cpp wants x0 y0 x1 y1
    w = np.arange(8, dtype=np.float32).reshape(8, 1)  # two heads
    assert G.rope_permute(w, 2).ravel().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_arch_choice(tok):
    model, _ = tiny_llama(tok)
    assert G.choose_arch(layer_shapes(model)) == "llama"
    assert G.choose_arch(layer_shapes(pruned_tiny(tok))) == "deci"


def test_kquant_short_rows_fall_back(llama_cpp, tok, windows, tmp_path):
    # rows of 64 do not split into K-quant super-blocks of 256: llama.cpp uses its fallback types
    model, _ = tiny_llama(tok)  # hidden 64, FFN 192
    report = export(model, tok, tmp_path / "m.gguf", windows, dtype="q4_k_m")
    t = report["tensor_types"]
    assert t["blk.0.attn_k.weight"] == "q5_0" and t["blk.0.ffn_down.weight"] == "q5_0"  # Q4_K -> Q5_0
    assert t["blk.3.attn_v.weight"] == "q8_0"  # a more-bits layer: Q6_K -> Q8_0
    assert t["token_embd.weight"] == "q8_0" and t["blk.0.attn_norm.weight"] == "f32"
    assert "q4_k" not in report["type_counts"] and report["verification"]["top1_agreement"] >= L.MIN_TOP1_LOSSY["q4_k_m"]


def test_rows_fitting_no_block_fall_back_to_f16(llama_cpp, tok, windows, tmp_path):
    model, _ = tiny_llama(tok)
    slice_layers(model, {2: ([0, 1, 2, 3], [0, 1], 100, False, False)})
    report = export(model, tok, tmp_path / "m.gguf", windows, dtype="q4_0")
    assert report["tensor_types"]["blk.2.ffn_down.weight"] == "f16"  # rows of 100: not even blocks of 32
    assert report["tensor_types"]["blk.2.ffn_up.weight"] == "q4_0"


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_refuses_unsupported_shapes(tok, tmp_path):
    model, _ = tiny_llama(tok)
    slice_layers(model, {1: ([0, 1, 2, 3], [0, 1], 0, False, False)})
    with pytest.raises(EdgepruneError, match="layer 1 has FFN width 0"):
        G.export_gguf(model, tok, tmp_path / "m.gguf")
    with pytest.raises(EdgepruneError, match="unknown gguf dtype 'q2_k'"):
        G.export_gguf(model, tok, tmp_path / "m.gguf", dtype="q2_k")


def test_write_metadata_and_tied_embeddings(tok, tmp_path):
    model = pruned_tiny(tok)
    path = tmp_path / "m.gguf"
    G.export_gguf(model, tok, path, verify=False, metadata={"edgeprune.plan": '{"x": 1}'})
    fields, tensors = read_gguf(path)
    assert fields["general.architecture"] == "deci"
    assert fields["deci.feed_forward_length"] == [192, 128, 96]
    assert fields["deci.attention.head_count"] == [4, 2, 2]
    assert fields["deci.attention.head_count_kv"] == [2, 1, 2]
    assert fields["deci.block_count"] == 3
    assert fields["deci.attention.key_length"] == fields["deci.rope.dimension_count"] == 16
    assert fields["edgeprune.plan"] == '{"x": 1}'
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert tuple(tensors["blk.1.attn_k.weight"].shape) == (64, 16)  # ne0 = in, ne1 = one KV head


# ------------------------------------------------------------------------------------------------
# through llama.cpp


def test_uniform_f32_is_llama_and_matches(llama_cpp, tok, windows, tmp_path):
    model, _ = tiny_llama(tok)
    report = export(model, tok, tmp_path / "m.gguf", windows)
    v = report["verification"]
    assert report["arch"] == "llama" and report["bytes"] == (tmp_path / "m.gguf").stat().st_size
    assert v["top1_agreement"] >= 0.995 and v["greedy_match"] == 32 and v["tokenizer_match"]
    assert v["max_abs_logit_diff"] < 0.05
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temp files left


def test_untied_output_exported(llama_cpp, tok, windows, tmp_path):
    model, _ = tiny_llama(tok, tie=False)
    report = export(model, tok, tmp_path / "m.gguf", windows)
    assert report["verification"]["top1_agreement"] >= 0.995
    assert "output.weight" in read_gguf(tmp_path / "m.gguf")[1]


def test_pruned_f32_is_deci_and_matches(llama_cpp, tok, windows, tmp_path):
    model = pruned_tiny(tok)
    report = export(model, tok, tmp_path / "m.gguf", windows)
    v = report["verification"]
    assert report["arch"] == "deci"
    assert v["top1_agreement"] >= 0.995 and v["greedy_match"] == 32


@pytest.mark.parametrize("uniform", [True, False], ids=["llama", "deci"])
def test_flap_biases_exported_and_verified(llama_cpp, tok, windows, tmp_path, uniform):
    # llama.cpp's llama and deci graphs both take optional attn_output.bias and ffn_down.bias
    model, _ = tiny_llama(tok)
    if uniform:
        slice_layers(model, {1: ([0, 1, 2, 3], [0, 1], 192, True, True)})
    else:
        model = pruned_tiny(tok, down_bias=True, o_bias=True)
    report = export(model, tok, tmp_path / "m.gguf", windows)
    assert report["arch"] == ("llama" if uniform else "deci")
    assert report["verification"]["top1_agreement"] >= 0.995
    tensors = read_gguf(tmp_path / "m.gguf")[1]
    assert "blk.1.ffn_down.bias" in tensors and ("blk.1.attn_output.bias" if uniform else "blk.2.attn_output.bias") in tensors


def test_dropped_bias_would_be_caught(llama_cpp, tok, windows, tmp_path, monkeypatch):
    # the check above is meaningful: a file without the compensation biases fails verification
    model = pruned_tiny(tok, down_bias=True, o_bias=True)
    real = G.gguf_tensors
    monkeypatch.setattr(G, "gguf_tensors", lambda m, s, *rest: ((n, a) for n, a in real(m, s, *rest) if not n.endswith(".bias")))
    with pytest.raises(VerificationError, match="mean KL"):
        export(model, tok, tmp_path / "m.gguf", windows)


@pytest.mark.parametrize("dtype", ["f16", "q8_0", "q4_0"])
def test_lossy_types_report(llama_cpp, tok, windows, tmp_path, dtype):
    model = pruned_tiny(tok)
    report = export(model, tok, tmp_path / "m.gguf", windows, dtype=dtype)
    v = report["verification"]
    assert report["dtype"] == dtype and v["top1_agreement"] >= L.MIN_TOP1_LOSSY[dtype]
    assert 0 <= v["mean_kl"] < 0.1 and v["min_top1"] == L.MIN_TOP1_LOSSY[dtype]


def test_kquant_success(llama_cpp, tmp_path):
    tok = tiny_tokenizer()
    model, _ = tiny_llama(tok, hidden=256, layers=2, heads=4, kv_heads=2, ffn=512, init_std=0.04)
    with torch.no_grad():  # logits scale with sqrt(hidden): keep them as peaked as the 64-wide model's
        model.model.embed_tokens.weight.mul_(0.5)
    windows = verification_windows(tok, seqlen=64, n=2)
    report = export(model, tok, tmp_path / "m.gguf", windows, dtype="q4_k_m")
    assert report["verification"]["top1_agreement"] >= L.MIN_TOP1_LOSSY["q4_k_m"]
    assert report["tensor_types"]["blk.0.attn_q.weight"] == "q4_k" and report["tensor_types"]["blk.1.ffn_down.weight"] == "q6_k"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # the F32 intermediate is gone


@pytest.mark.parametrize("rope", ["linear", "llama3"])
def test_rope_scaling(llama_cpp, tok, windows, tmp_path, monkeypatch, rope):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model, _ = tiny_llama(tok)
    model.config.rope_scaling = {"rope_type": rope, "factor": 4.0}
    if rope == "llama3":  # a short original context so the 128-token windows feel every band
        model.config.rope_scaling.update(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
    model.model.rotary_emb = LlamaRotaryEmbedding(config=model.config)
    v = export(model, tok, tmp_path / "m.gguf", windows)["verification"]
    assert v["top1_agreement"] >= 0.995 and v["mean_kl"] < 1e-6
    if rope == "llama3":  # the frequency factors are what makes it match (the tiny model is barely
        # position-sensitive, so compare KL instead of expecting the verification to fail)
        from edgeprune.evaluate import compare_logits, torch_logits_fn

        real = G.gguf_tensors
        monkeypatch.setattr(G, "gguf_tensors", lambda m, s, *rest: ((n, a) for n, a in real(m, s, *rest) if n != "rope_freqs.weight"))
        export(model, tok, tmp_path / "m2.gguf", windows, verify=False)
        fn = L.llamacpp_logits_fn(tmp_path / "m2.gguf", n_ctx=128, n_threads=THREADS)
        assert compare_logits(torch_logits_fn(model), fn, windows)["mean_kl"] > 100 * v["mean_kl"]


def test_unloadable_file_is_one_line_error(llama_cpp, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(EdgepruneError, match="llama.cpp cannot load"):
        L.llamacpp_logits_fn(bad, n_ctx=16, n_threads=THREADS)


def spm_tokenizer():
    """A Llama-2-style tokenizer: '▁' for spaces, byte-fallback <0xXX> tokens, BOS added."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from edgeprune.testing import _CORPUS

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_sentencepiece_style_tokenizer(llama_cpp, tmp_path):
    tok = spm_tokenizer()
    model, _ = tiny_llama(tok)
    report = export(model, tok, tmp_path / "m.gguf", verification_windows(tok, seqlen=128, n=2))
    assert report["verification"]["tokenizer_match"] and report["verification"]["top1_agreement"] >= 0.995
    from gguf import GGUFReader

    fields = GGUFReader(str(tmp_path / "m.gguf")).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama" and fields["tokenizer.ggml.add_bos_token"].contents() is True


def gpt2_tokenizer():
    """Byte-level BPE without digit splitting, so it learns multi-digit tokens ("200")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from edgeprune.testing import _CORPUS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def test_wrong_pre_tokenizer_is_caught(llama_cpp, tmp_path):
    tok = gpt2_tokenizer()
    model, _ = tiny_llama(tok)
    windows = verification_windows(tok, seqlen=128, n=2)
    assert export(model, tok, tmp_path / "ok.gguf", windows)["verification"]["tokenizer_match"]  # detected: gpt-2
    # smollm splits digits one by one: "200" would become three tokens in llama.cpp
    with pytest.raises(VerificationError, match="llama.cpp tokenizes differently from the HF tokenizer"):
        export(model, tok, tmp_path / "m.gguf", windows, metadata={"tokenizer.ggml.pre": "smollm"})
    assert not (tmp_path / "m.gguf").exists()


def test_verification_failure_leaves_no_file(llama_cpp, tok, windows, tmp_path, monkeypatch):
    model, _ = tiny_llama(tok)
    real = G.gguf_tensors

    def corrupt(model, shapes, *rest):  # the file gets a different ffn_down than the torch model has
        for name, arr in real(model, shapes, *rest):
            yield name, (arr * 3.0 if name == "blk.1.ffn_down.weight" else arr)

    monkeypatch.setattr(G, "gguf_tensors", corrupt)
    with pytest.raises(VerificationError, match="F32 GGUF disagrees with torch: top-1"):
        export(model, tok, tmp_path / "m.gguf", windows)
    assert list(tmp_path.iterdir()) == []


def test_logits_fn_and_bench(llama_cpp, tok, windows, tmp_path):
    model = pruned_tiny(tok)
    path = tmp_path / "m.gguf"
    export(model, tok, path, windows, dtype="q8_0", verify=False)
    fn = L.llamacpp_logits_fn(path, n_ctx=128, n_threads=THREADS)
    logits = fn(windows[0])
    assert logits.shape == (128, len(tok)) and logits.dtype == np.float32
    assert np.array_equal(fn(windows[0]), logits)  # the KV cache is reset between calls
    # the CLI form the bench command uses: one JSON line from a torch-free process
    out = subprocess.run(
        [sys.executable, "-m", "edgeprune.exporters.llamacpp", "bench", str(path), "--threads", "1",
         "--prompt-tokens", "32", "--gen-tokens", "8", "--repeats", "2"],
        capture_output=True, text=True, check=True,
    ).stdout
    r = json.loads(out.strip().splitlines()[-1])
    assert r["arch"] == "deci" and r["file_bytes"] == path.stat().st_size
    for key in ("prefill_tok_s", "decode_tok_s", "ttft_s"):
        assert r[key]["median"] > 0 and r[key]["repeats"] == 2
    assert r["peak_rss_mb"] > 0


def test_bench_interleaved_pools_rounds_and_pairs(llama_cpp, tok, windows, tmp_path):
    from edgeprune.bench import bench_interleaved, paired_ratio

    paths = []
    for name in ("a", "b"):
        model = pruned_tiny(tok)
        paths.append(tmp_path / f"{name}.gguf")
        export(model, tok, paths[-1], windows, dtype="q8_0", verify=False)
    a, b = bench_interleaved(paths, threads=1, rounds=3, repeats=2, prompt_tokens=16, gen_tokens=4)
    for r in (a, b):
        assert r["rounds"] == 3 and len(r["decode_round_medians"]) == 3
        assert len(r["decode_tok_s"]["samples"]) == 6 and r["decode_tok_s"]["median"] > 0
        assert r["prefill_tok_s"]["repeats"] == 6
    # the same model measured back to back: the paired ratio is the median of per-round ratios
    ratios = sorted(x / y for x, y in zip(a["decode_round_medians"], b["decode_round_medians"]))
    assert paired_ratio(a, b) == ratios[1]
    assert paired_ratio(a, a) == 1.0


def test_bench_module_does_not_import_torch():
    code = "import sys, edgeprune.exporters.llamacpp, edgeprune.exporters.gguf; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_bench_missing_file_is_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "edgeprune.exporters.llamacpp", "bench", str(tmp_path / "nope.gguf")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: GGUF file not found") and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------------------
# the real model


@pytest.mark.integration
def test_smollm2_f32_export_generates_paris(llama_cpp, smollm2, tmp_path):
    loaded = smollm2
    tok = loaded.tokenizer
    windows = verification_windows(tok, seqlen=128, n=2)
    report = export(loaded.model, tok, tmp_path / "smol.gguf", windows)
    assert report["verification"]["top1_agreement"] >= 0.995 and report["verification"]["greedy_match"] == 32
    llm = L.open_llama(tmp_path / "smol.gguf", n_ctx=64, n_threads=THREADS)
    prompt = tok("The capital of France is", add_special_tokens=False)["input_ids"]
    text = tok.decode(L.llamacpp_greedy(llm, prompt, 6))
    assert "Paris" in text, text
