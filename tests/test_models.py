"""Loading models and refusing bad input with one line and a non-zero exit."""

import json

import pytest
import torch

from edgeprune.errors import EdgepruneError
from edgeprune.models import load_model
from tests.conftest import run_cli


def test_loads_hf_directory(tiny_dir):
    lm = load_model(str(tiny_dir))
    assert lm.model.config.num_hidden_layers == 6
    assert len(lm.fingerprint) == 64
    ids = lm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert lm.model(ids).logits.shape == (1, ids.shape[1], len(lm.tokenizer))


def test_reload_reads_the_same_weights_again(tiny_dir, tmp_path):
    """fit lets the dense model go while it builds finalists and reads it back (issue #15)."""
    from edgeprune.models import reload
    from edgeprune.pipeline import calibration_pass, prune_and_save

    lm = load_model(str(tiny_dir))
    again = reload(lm)
    assert again is not lm.model and lm.weights == str(tiny_dir.resolve())
    want = lm.model.state_dict()
    assert all(torch.equal(t, want[n]) for n, t in again.state_dict().items()) and not again.training
    _, stats, _ = calibration_pass(lm, "self", nsamples=4, seqlen=16)
    prune_and_save(lm, stats, tmp_path / "p", sparsity=0.3, recover="none")
    pruned = load_model(str(tmp_path / "p"))  # an edgeprune checkpoint: per-layer shapes rebuilt again
    assert pruned.weights == str((tmp_path / "p").resolve())
    want = pruned.model.state_dict()
    assert all(torch.equal(t, want[n]) for n, t in reload(pruned).state_dict().items())
    lm.weights = None
    with pytest.raises(EdgepruneError, match="cannot be reloaded"):
        reload(lm)


def test_missing_path_is_one_line_error():
    with pytest.raises(EdgepruneError, match="model not found"):
        load_model("/no/such/model.gguf")
    r = run_cli("eval", "/no/such/model.gguf", "--text", __file__)
    assert r.returncode == 2
    assert "model not found" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_non_gguf_renamed_gguf(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 this is a zip, not a GGUF" * 10)
    with pytest.raises(EdgepruneError, match="not a GGUF file"):
        load_model(str(fake))
    r = run_cli("prune", fake, "--out", tmp_path / "out")
    assert r.returncode == 2 and "not a GGUF file" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_truncated_gguf_is_corrupt(tmp_path):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 20)
    with pytest.raises(EdgepruneError, match="corrupt GGUF"):
        load_model(str(bad))


def test_gpt2_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(EdgepruneError, match="unsupported architecture 'gpt2'"):
        load_model(str(tmp_path / "gpt2"))
    r = run_cli("eval", tmp_path / "gpt2", "--text", __file__)
    assert r.returncode == 2 and "unsupported architecture 'gpt2'" in r.stderr and "Traceback" not in r.stderr


def test_directory_without_config(tmp_path):
    with pytest.raises(EdgepruneError, match="no config.json"):
        load_model(str(tmp_path))


def test_eval_cli_json(tiny_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The capital of France is Paris.\r\n" * 200)
    r = run_cli("eval", tiny_dir, "--text", text, "--seqlen", "32", "--max-windows", "3", "--reference", tiny_dir, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["windows"] == 3 and res["scored_tokens"] == 3 * 31
    assert res["perplexity"] > 1
    assert res["reference"]["top1_agreement"] == 1.0 and res["reference"]["mean_kl"] < 1e-9
    assert "non-overlapping 32-token windows" in res["protocol"]


def test_empty_eval_text(tiny_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    r = run_cli("eval", tiny_dir, "--text", empty)
    assert r.returncode == 2 and "empty" in r.stderr and "Traceback" not in r.stderr


def test_unlanded_or_unknown_verb_exits_2():
    r = run_cli("frobnicate")
    assert r.returncode == 2
