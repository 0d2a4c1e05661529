"""Calibration data: self-generated, files, and their errors."""

import json

import pytest
import torch

from edgeprune.data import calibration_ids, nucleus, windows_from_text
from edgeprune.errors import EdgepruneError
from tests.conftest import run_cli


def test_self_generated_is_seeded(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPRUNE_CACHE", str(tmp_path))
    model, tok = tiny
    a, desc, _ = calibration_ids(model, tok, "self", nsamples=3, seqlen=12, seed=1)
    b, _, _ = calibration_ids(model, tok, "self", nsamples=3, seqlen=12, seed=1, fingerprint="f" * 64)
    c, _, _ = calibration_ids(model, tok, "self", nsamples=3, seqlen=12, seed=1, fingerprint="f" * 64)  # from cache
    d, _, _ = calibration_ids(model, tok, "self", nsamples=3, seqlen=12, seed=2)
    assert a.shape == (3, 12) and torch.equal(a, b) and torch.equal(b, c)
    assert not torch.equal(a, d)
    assert (a[:, 0] == tok.bos_token_id).all()
    assert desc["tokens"] == 36 and desc["kind"].startswith("self-generated")


def test_text_and_jsonl_files(tiny, tmp_path):
    _, tok = tiny
    txt = tmp_path / "c.txt"
    txt.write_text("The tower is 324 metres tall. " * 50)
    ids, desc, _ = calibration_ids(None, tok, str(txt), nsamples=4, seqlen=16, seed=0)
    assert ids.shape == (4, 16) and desc["kind"] == "file c.txt"
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps({"text": "Paris is the capital of France. " * 10}) for _ in range(5)))
    ids2, _, _ = calibration_ids(None, tok, str(jl), nsamples=2, seqlen=16, seed=0)
    assert ids2.shape == (2, 16)


@pytest.mark.parametrize("content,match", [("", "empty"), ("{not json}\n", "is not JSON"), ('{"txt": 1}\n', "no string 'text'")])
def test_bad_jsonl(tiny, tmp_path, content, match):
    _, tok = tiny
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(EdgepruneError, match=match):
        calibration_ids(None, tok, str(f), nsamples=2, seqlen=16)


def test_text_too_short(tiny):
    _, tok = tiny
    with pytest.raises(EdgepruneError, match="fewer than one"):
        windows_from_text(tok, "tiny", 2, 64, 0)


def test_empty_calibration_file_cli(tiny_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    r = run_cli("prune", tiny_dir, "--calib", empty, "--out", tmp_path / "out")
    assert r.returncode == 2 and "calibration file is empty" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("temperature", [0.05, 0.3, 2.0])
def test_nucleus_draws_what_a_full_sort_draws(temperature):
    """Sorting only the top candidates when they hold the top-p mass (peaked rows), the whole row
    otherwise (flat ones): the same distribution, and the same draws from the same generator."""
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(24, 5000, generator=g) / temperature, -1)
    ordered, order = probs.sort(-1, descending=True)
    want = ordered * (ordered.cumsum(-1) - ordered < 0.95)
    got, got_order = nucleus(probs, first=64)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    a = torch.multinomial(got / got.sum(-1, keepdim=True), 1, generator=torch.Generator().manual_seed(5))
    b = torch.multinomial(want / want.sum(-1, keepdim=True), 1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(got_order.gather(-1, a), order.gather(-1, b))
