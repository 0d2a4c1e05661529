"""The dense reference that fit's quality report compares every artifact with."""

import numpy as np
import pytest

from edgeprune import shipped


def test_saved_reference_matches_the_in_memory_one(tiny, tmp_path):
    model, tok = tiny
    windows = shipped.excerpt_windows(tok, seqlen=64, n=3)
    in_memory = shipped.dense_reference(model, windows)
    saved = shipped.dense_reference(model, windows, tmp_path)
    assert len(saved) == len(in_memory) == 3 and len(list(tmp_path.glob("window*.npy"))) == 3
    for a, b in zip(in_memory, saved):
        np.testing.assert_array_equal(a, b)
    assert shipped.reference_ppl(saved, windows) == shipped.reference_ppl(in_memory, windows)

    # an artifact scored against either reference gets the same agreement and KL
    noisy = [lp + np.random.default_rng(i).normal(0, 0.5, lp.shape).astype(np.float32) for i, lp in enumerate(in_memory)]
    logits = iter(noisy)
    q_mem = shipped.window_quality(lambda w: next(logits), windows, in_memory)
    logits = iter(noisy)
    q_disk = shipped.window_quality(lambda w: next(logits), windows, saved)
    assert q_mem == q_disk and q_mem["kl_vs_dense"] > 0 and 0 < q_mem["top1_vs_dense"] < 1
    with pytest.raises(IndexError):
        saved[3]


def test_scores_run_each_gguf_content_once(tiny, tmp_path):
    from edgeprune.artifacts import export_artifact
    from edgeprune.exporters.llamacpp_quantize import quantize_gguf
    from edgeprune.imatrix import collect_imatrix

    model, tok = tiny
    f32 = tmp_path / "dense.f32.gguf"
    export_artifact(model, tok, "gguf", "f32", f32, verify=False)
    windows = shipped.excerpt_windows(tok, seqlen=64, n=2)
    imatrix = collect_imatrix(model, windows)
    paths = {}
    for name, dtype, imat in (("q8_0", "q8_0", None), ("q8_0-imatrix", "q8_0", imatrix), ("q4_0", "q4_0", None),
                              ("q4_0-imatrix", "q4_0", imatrix)):
        paths[name] = tmp_path / f"{name}.gguf"
        quantize_gguf(f32, paths[name], dtype, imatrix=imat, tied=True)
    keys = {name: shipped.gguf_content_key(p) for name, p in paths.items()}
    from edgeprune.exporters.gguf import export_gguf

    renamed = tmp_path / "renamed.f32.gguf"  # descriptive metadata only: the same computation
    export_gguf(model, tok, renamed, dtype="f32", verify=False, metadata={"general.name": "renamed", "edgeprune.note": "x"})
    assert renamed.read_bytes() != f32.read_bytes() and shipped.gguf_content_key(renamed) == shipped.gguf_content_key(f32)
    # llama.cpp's q8_0 ignores the importance matrix; q4_0 uses it
    assert keys["q8_0"] == keys["q8_0-imatrix"]
    assert len({keys["q8_0"], keys["q4_0"], keys["q4_0-imatrix"]}) == 3

    refs = {"held": shipped.dense_reference(model, windows[:1]), "text": shipped.dense_reference(model, windows)}
    scores = shipped.Scores({"held": windows[:1], "text": windows}, refs, n_threads=1)
    held = scores.quality("gguf", paths["q8_0"], ("held",))
    assert scores.runs == 1 and held["held"]["kl_vs_dense"] >= 0
    both = scores.quality("gguf", paths["q8_0-imatrix"])  # same content: only the text is new
    assert scores.runs == 2 and both["held"] == held["held"]
    q4 = scores.artifact("gguf", paths["q4_0"])
    assert scores.runs == 4 and q4["excerpt"]["kl_vs_dense"] > both["text"]["kl_vs_dense"]
