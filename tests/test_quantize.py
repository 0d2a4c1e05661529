"""llama.cpp quantization: every GGUF dtype of the menu, the mix rules, importance matrices, overrides.

Tiny random Llamas at two widths: 64 wide (every row falls back from K-quants, one FFN width of
100 falls back to F16) and 256 wide (K-quant rows fit, 4 query heads
per KV head). llama.cpp and torch run on one thread: the test machines are small and shared.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeprune import dtypes, mix
from edgeprune.arch import layer_shapes
from edgeprune.errors import EdgepruneError
from edgeprune.exporters import gguf as G
from edgeprune.exporters import llamacpp as L
from edgeprune.exporters.common import verification_windows
from edgeprune.exporters.llamacpp_quantize import quantize_gguf, read_tensor_types
from edgeprune.imatrix import collect_imatrix, read_imatrix_gguf, write_imatrix_gguf
from edgeprune.testing import slice_layers, tiny_llama

THREADS = 1


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixtures shared by the GGUF tests: conftest.py


def narrow_model(tok):
    """64 wide, 8 layers (so n/8 = 1), tied, per-layer shapes (deci): layer 2 FFN 100 (rows of
    100 fit no block: F16), layer 5 two query heads on one KV head and FFN 96."""
    model, _ = tiny_llama(tok, layers=8)
    plan = {2: ([0, 1, 2, 3], [0, 1], 100, False, False), 5: ([0, 1], [0], 96, False, False)}
    return slice_layers(model, plan)


def wide_model(tok):
    """256 wide, 16 layers (n/16 = 1), 8 query heads on 2 KV heads, untied output."""
    model, _ = tiny_llama(tok, hidden=256, layers=16, heads=8, kv_heads=2, ffn=256, tie=False, init_std=0.04)
    return model


def uneven_model(tok, seed=0):
    """64 wide with log-normal RMSNorm gains: some input columns are driven far harder than others,
    which is what an importance matrix is for."""
    model, _ = tiny_llama(tok, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.mul_(torch.exp(0.7 * torch.randn(norm.weight.shape, generator=g)))
    return model


def geometry(model):
    return list(G.weight_geometry(model, layer_shapes(model)))


def ones_imatrix(model):
    # a valid imatrix changes the mix rules; its values do not matter for which types are written
    return {name: np.ones(row, dtype=np.float32) for name, _, _, row in geometry(model)}


def written_weights(report_or_path):
    """{name: storage} of the 2-D weights, from an export report or a GGUF file."""
    if isinstance(report_or_path, dict):
        types = report_or_path["tensor_types"]
    else:
        types = {n: t for n, (t, _) in read_tensor_types(report_or_path).items()}
    return {n: t for n, t in types.items() if n.endswith(".weight") and "norm" not in n and n != "rope_freqs.weight"}


@pytest.fixture(scope="module")
def f32_files(llama_cpp, tok, tmp_path_factory):
    """One F32 GGUF per width, quantized many times below."""
    out = {}
    for width, build in (("narrow", narrow_model), ("wide", wide_model)):
        model = build(tok)
        path = tmp_path_factory.mktemp(width) / "f32.gguf"
        G.export_gguf(model, tok, path, verify=False)
        out[width] = (model, path)
    return out


# ------------------------------------------------------------------------------------------------
# the mix rules against llama.cpp


@pytest.mark.parametrize("dtype", dtypes.GGUF_DTYPES)
@pytest.mark.parametrize("width", ["narrow", "wide"])
def test_mix_prediction_matches_llamacpp(f32_files, tok, tmp_path, dtype, width):
    model, f32 = f32_files[width]
    tied = width == "narrow"
    for imatrix in (None, ones_imatrix(model)):
        if dtypes.get(dtype).quantized:
            path = tmp_path / f"{dtype}.gguf"
            quantize_gguf(f32, path, dtype, imatrix=imatrix, tied=tied, n_threads=THREADS)
        else:
            path = tmp_path / f"{dtype}.gguf"
            G.export_gguf(model, tok, path, dtype=dtype, verify=False)
        predicted = mix.tensor_types(dtype, geometry(model), tied=tied, imatrix=imatrix is not None)
        assert predicted == written_weights(path), f"{dtype} {width} imatrix={imatrix is not None}"


def test_mix_rules_are_exercised(f32_files):
    # the comparison above is only as good as the cases it covers: these are the interesting ones
    narrow, wide = geometry(f32_files["narrow"][0]), geometry(f32_files["wide"][0])
    assert mix.tensor_types("q4_k_m", narrow, tied=True)["blk.0.attn_q.weight"] == "q5_0"  # Q4_K -> Q5_0
    assert mix.tensor_types("q4_0", narrow, tied=True)["blk.2.ffn_down.weight"] == "f16"  # rows of 100
    assert mix.tensor_types("q4_0", narrow, tied=True)["token_embd.weight"] == "q8_0"
    w = mix.tensor_types("q4_k_m", wide, tied=False)
    assert w["output.weight"] == "q6_k" and w["token_embd.weight"] == "q4_k"
    assert {w[f"blk.{i}.ffn_down.weight"] for i in range(16)} == {"q4_k", "q6_k"}
    assert mix.tensor_types("iq4_nl", wide, tied=False)["blk.7.attn_v.weight"] == "q5_k"  # 4 q heads per KV head
    q3 = mix.tensor_types("q3_k_m", wide, tied=False)
    assert (q3["blk.0.ffn_down.weight"], q3["blk.1.ffn_down.weight"], q3["blk.3.attn_output.weight"]) == ("q5_k", "q4_k", "q4_k")
    assert mix.tensor_types("q4_0", wide, tied=False, imatrix=True)["blk.1.ffn_down.weight"] == "q4_1"


def test_mix_overrides_match_llamacpp(f32_files, tmp_path):
    # an overridden attn_v / ffn_down does not advance llama.cpp's counters: later layers shift
    model, f32 = f32_files["wide"]
    overrides = {"blk.0.ffn_down.weight": "q8_0", r"blk\.1\.attn_v": "Q4_0", "output": "q5_k", "token_embd": "iq4_nl"}
    quantize_gguf(f32, tmp_path / "o.gguf", "q4_k_m", overrides=overrides, tied=False, n_threads=THREADS)
    written = written_weights(tmp_path / "o.gguf")
    predicted = mix.tensor_types("q4_k_m", geometry(model), tied=False, overrides=overrides)
    assert predicted == written
    assert (written["blk.0.ffn_down.weight"], written["blk.1.attn_v.weight"], written["output.weight"], written["token_embd.weight"]) == (
        "q8_0", "q4_0", "q5_k", "iq4_nl")
    without = mix.tensor_types("q4_k_m", geometry(model), tied=False)
    # the counter shift is real: layer 2 is not a more-bits layer of 16, but is counted as layer 1
    assert (without["blk.2.ffn_down.weight"], without["blk.2.attn_v.weight"]) == ("q4_k", "q4_k")
    assert (written["blk.2.ffn_down.weight"], written["blk.2.attn_v.weight"]) == ("q6_k", "q6_k")


def test_mix_bytes_counts_what_is_written(f32_files, tmp_path):
    for width, tied in (("narrow", True), ("wide", False)):
        model, f32 = f32_files[width]
        for dtype in ("q4_k_m", "q3_k_m", "q8_0"):
            quantize_gguf(f32, tmp_path / "m.gguf", dtype, tied=tied, n_threads=THREADS)
            types = read_tensor_types(tmp_path / "m.gguf")
            real = sum(types[name][1] for name, *_ in geometry(model))
            roles = [(name.split(".")[-2], None if name.count(".") == 1 else int(name.split(".")[1]), rows, row)
                     for name, _, rows, row in geometry(model)]  # the role/layer spelling gives the same answer
            assert mix.mix_bytes(dtype, geometry(model), tied=tied) == mix.mix_bytes(dtype, roles, tied=tied) == real


# ------------------------------------------------------------------------------------------------
# exports of every dtype


@pytest.mark.parametrize("dtype", [d for d in dtypes.GGUF_DTYPES if d != "f32"])
def test_every_dtype_exports_and_verifies(llama_cpp, tok, windows, tmp_path, dtype):
    model = narrow_model(tok)
    report = G.export_gguf(model, tok, tmp_path / "m.gguf", dtype=dtype, verify_windows=windows, n_threads=THREADS)
    v = report["verification"]
    assert report["dtype"] == dtype and v["min_top1"] == L.MIN_TOP1_LOSSY[dtype] and v["top1_agreement"] >= v["min_top1"]
    assert v["tokenizer_match"] and 0 <= v["mean_kl"] < 0.1
    assert sum(report["type_counts"].values()) == report["tensor_count"] == len(report["tensor_types"])
    assert sum(report["bytes_by_type"].values()) < report["bytes"] == (tmp_path / "m.gguf").stat().st_size
    assert written_weights(report) == mix.tensor_types(dtype, geometry(model), tied=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no F32 intermediate left


def test_wrong_format_dtype_is_bad_input(tok, tmp_path):
    model, _ = tiny_llama(tok)
    with pytest.raises(EdgepruneError, match=r"'int4' is an onnx dtype, not a gguf one: for gguf use q4_0") as exc:
        G.export_gguf(model, tok, tmp_path / "m.gguf", dtype="int4")
    assert exc.value.exit_code == 2 and not list(tmp_path.iterdir())
    with pytest.raises(EdgepruneError, match="need a quantized GGUF dtype"):
        G.export_gguf(model, tok, tmp_path / "m.gguf", dtype="f16", overrides={"output": "q8_0"})
    with pytest.raises(EdgepruneError, match="unknown GGUF tensor type 'int8'"):
        G.export_gguf(model, tok, tmp_path / "m.gguf", dtype="q4_0", overrides={"output": "int8"})
    with pytest.raises(EdgepruneError, match=r"imatrix entry 'blk\.0\.ffn_down\.weight' has shape \(64,\), but the weight's rows have 192"):
        G.export_gguf(model, tok, tmp_path / "m.gguf", dtype="q4_0", imatrix={"blk.0.ffn_down.weight": np.ones(64, np.float32)})


def test_overrides_honoured_in_export(llama_cpp, tok, windows, tmp_path):
    model, _ = tiny_llama(tok)  # tied: "output" is token_embd.weight
    report = G.export_gguf(model, tok, tmp_path / "m.gguf", dtype="q4_0", verify_windows=windows, n_threads=THREADS,
                           overrides={"output": "f16", r"blk\.0\.ffn_down": "q8_0"})
    t = report["tensor_types"]
    assert t["token_embd.weight"] == "f16" and t["blk.0.ffn_down.weight"] == "q8_0" and t["blk.1.ffn_down.weight"] == "q4_0"
    assert report["overrides"] == {"output": "f16", r"blk\.0\.ffn_down": "q8_0"}


# ------------------------------------------------------------------------------------------------
# importance matrix


def test_collect_imatrix_names_and_values(tok, windows):
    model = narrow_model(tok)
    im = collect_imatrix(model, windows, batch_size=1)
    expected = {name for name, *_ in geometry(model)}  # tied: the output projection is token_embd
    assert set(im) == expected
    rows = {name: row for name, _, _, row in geometry(model)}
    assert all(v.shape == (rows[n],) and v.dtype == np.float32 and (v >= 0).all() for n, v in im.items())
    # q, k and v read the same normed hidden states; the mean is over every token
    assert np.allclose(im["blk.0.attn_q.weight"], im["blk.0.attn_v.weight"])
    h = model.model.layers[0].input_layernorm(model.model.embed_tokens(torch.as_tensor(windows))).detach().double()
    assert np.allclose(im["blk.0.attn_q.weight"], (h * h).mean((0, 1)).numpy(), rtol=1e-4)


def test_imatrix_file_round_trip(tok, windows, tmp_path):
    from gguf import GGUFReader

    model, _ = tiny_llama(tok)
    im = collect_imatrix(model, windows)
    write_imatrix_gguf(tmp_path / "im.gguf", im, windows.size, "wikitext-2 valid excerpt", chunk_count=2, chunk_size=128)
    back = read_imatrix_gguf(tmp_path / "im.gguf")
    assert back.imatrix.keys() == im.keys() and all(np.allclose(back.imatrix[n], im[n], rtol=1e-6) for n in im)
    assert set(back.counts.values()) == {windows.size}
    assert (back.datasets, back.chunk_count, back.chunk_size) == (["wikitext-2 valid excerpt"], 2, 128)
    reader = GGUFReader(str(tmp_path / "im.gguf"))  # llama.cpp's layout: sums [ne0 = row, ne1 = 1], counts [1, 1]
    t = {x.name: x for x in reader.tensors}
    assert list(t["blk.0.ffn_down.weight.in_sum2"].shape) == [192, 1] and list(t["blk.0.ffn_down.weight.counts"].shape) == [1, 1]
    assert reader.fields["general.type"].contents() == "imatrix" and "general.architecture" not in reader.fields
    G.export_gguf(model, tok, tmp_path / "model.gguf", verify=False)
    with pytest.raises(EdgepruneError, match="not an imatrix GGUF"):
        read_imatrix_gguf(tmp_path / "model.gguf")


@pytest.mark.parametrize("dtype", ["q4_0", "iq4_nl"])
def test_imatrix_lowers_quantization_error(llama_cpp, tok, tmp_path, dtype):
    from gguf import GGUFReader

    from edgeprune.evaluate import compare_logits, torch_logits_fn

    w = verification_windows(tok, seqlen=128, n=4)
    calib, held_out = w[:2], w[2:]
    model = uneven_model(tok)
    im = collect_imatrix(model, calib)
    ref = torch_logits_fn(model)
    kl, data = {}, {}
    for name, imatrix in (("plain", None), ("imatrix", im)):
        path = tmp_path / f"{name}.gguf"
        report = G.export_gguf(model, tok, path, dtype=dtype, verify=False, imatrix=imatrix, n_threads=THREADS)
        assert report["imatrix_entries"] == (len(im) if imatrix else 0)
        kl[name] = compare_logits(ref, L.llamacpp_logits_fn(path, n_ctx=128, n_threads=THREADS), held_out)["mean_kl"]
        data[name] = {t.name: np.asarray(t.data).tobytes() for t in GGUFReader(str(path)).tensors}
    assert data["plain"]["blk.0.attn_q.weight"] != data["imatrix"]["blk.0.attn_q.weight"]  # other blocks written
    assert data["plain"]["blk.0.attn_norm.weight"] == data["imatrix"]["blk.0.attn_norm.weight"]
    assert kl["imatrix"] < 0.9 * kl["plain"], kl


def test_export_cli_takes_an_imatrix_file_and_an_output_type(tiny_dir, tmp_path):
    """`edgeprune export --imatrix FILE --output-type q5_0`: the file fit writes (or llama.cpp's) is
    used by llama.cpp's quantizer, and the output projection gets the asked type."""
    from edgeprune.models import load_model
    from tests.conftest import run_cli

    lm = load_model(str(tiny_dir))
    ids = torch.randint(0, lm.model.config.vocab_size, (4, 32))
    imat = collect_imatrix(lm.model, ids)
    write_imatrix_gguf(tmp_path / "imatrix.gguf", imat, int(ids.numel()), "random", 4, 32)
    out = tmp_path / "m.gguf"
    r = run_cli("export", tiny_dir, "--format", "gguf", "--dtype", "q8_0", "--imatrix", tmp_path / "imatrix.gguf",
                "--output-type", "q5_0", "--out", out, "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    types = read_tensor_types(out)
    head = "token_embd.weight" if lm.model.config.tie_word_embeddings else "output.weight"
    assert types[head][0] == "q5_0" and types["blk.0.attn_q.weight"][0] == "q8_0"
    r = run_cli("export", tiny_dir, "--format", "gguf", "--dtype", "f16", "--output-type", "q5_0", "--out", tmp_path / "x.gguf")
    assert r.returncode == 2 and "apply to quantized GGUF dtypes" in r.stderr
    r = run_cli("export", tiny_dir, "--format", "gguf", "--dtype", "q4_0", "--imatrix", tmp_path / "nope.gguf", "--out", tmp_path / "y.gguf")
    assert r.returncode == 2 and "no such file" in r.stderr


@pytest.mark.parametrize("family,tie", [("llama", True), ("gemma3", False), ("qwen3", True)])
def test_calibration_pass_collects_the_same_imatrix(tok, family, tie):
    # fit takes the dense importance matrix from its calibration pass instead of a second forward pass
    from edgeprune.calibrate import calibrate
    from edgeprune.testing import tiny_model

    model, _ = tiny_model(family, tok, tie=tie)
    ids = torch.randint(0, model.config.vocab_size, (6, 24), generator=torch.Generator().manual_seed(0))
    want = collect_imatrix(model, ids)
    got = calibrate(model, ids, imatrix=True).imatrix
    assert set(got) == set(want) and ("token_embd.weight" in got) == tie and ("output.weight" in got) == (not tie)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-7, err_msg=name)
    assert calibrate(model, ids).imatrix is None
