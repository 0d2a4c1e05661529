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
