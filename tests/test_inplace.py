"""Pruning in place (the CLI's prune, issue #15): the dense model itself becomes the pruned one, block
by block, with one dense block copied at a time; the result must equal pruning a copy."""

import copy

import pytest
import torch

from edgeprune import arch
from edgeprune.apply import pruning_in_place
from edgeprune.calibrate import calibrate
from edgeprune.errors import EdgepruneError
from edgeprune.plan import base_description
from edgeprune.prune import make_plan, pruned_copy
from edgeprune.recover import recover
from edgeprune.testing import tiny_model


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


CASES = [  # family, recovery, heads, dropped layers
    ("llama", "lstsq", True, 1),
    ("qwen3", "lstsq", False, 0),
    ("gemma3", "lstsq", True, 0),
    ("llama", "bias", True, 0),
    ("llama", "mask", False, 1),
]


@pytest.mark.parametrize("family,recovery,heads,drop", CASES)
def test_in_place_equals_pruned_copy(family, recovery, heads, drop):
    model, tok = tiny_model(family, layers=4, ffn=256, seed=3)
    ids = torch.randint(0, len(tok), (8, 40), generator=torch.Generator().manual_seed(0))
    stats = calibrate(model, ids, gram=recovery == "mask")
    args = {"lstsq_intercept": False} if family != "llama" and recovery == "lstsq" else None
    plan = make_plan(model, stats, base_description(model, "tiny", "x"), 0.4, heads=heads, target="linear" if heads else "ffn",
                     drop_layers=drop, recover=recovery, recover_args=args, shapes="per-layer")
    reference = pruned_copy(model, plan)
    rep_copy = recover(reference, model, plan, stats, ids)
    blocks = pruning_in_place(model, plan)
    seen = []
    rep_inplace = recover(model, None, plan, stats, ids, blocks=(seen.append(b[0]) or b for b in blocks))
    assert seen == list(range(plan.base["num_layers"]))  # every dense block, in order, dropped ones too
    assert arch.layer_shapes(model) == arch.layer_shapes(reference)
    assert len(arch.layers(model)) == len(plan.layers) == model.config.num_hidden_layers
    for (n, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), n
    if recovery == "lstsq":
        assert rep_inplace[recovery]["refit"] == rep_copy[recovery]["refit"] > 0
    with torch.no_grad():
        assert torch.equal(model(ids[:2]).logits, reference(ids[:2]).logits)


def test_in_place_refuses_kd_and_missing_blocks():
    model, tok = tiny_model("llama", layers=2, ffn=128)
    ids = torch.randint(0, len(tok), (4, 16), generator=torch.Generator().manual_seed(0))
    stats = calibrate(model, ids)
    plan = make_plan(model, stats, base_description(model, "tiny", "x"), 0.3, recover="lstsq+kd",
                     recover_args={"kd_seconds": 1}, shapes="per-layer")
    with pytest.raises(EdgepruneError, match="in place"):
        recover(model, None, plan, stats, ids, blocks=pruning_in_place(model, plan))
    plan = make_plan(model, stats, base_description(model, "tiny", "x"), 0.3, recover="lstsq", shapes="per-layer")
    with pytest.raises(EdgepruneError, match="in place"):
        recover(model, None, plan, stats, ids)


def test_in_place_copies_one_block_at_a_time(monkeypatch):
    """The only deep copies are single decoder blocks, never the model."""
    model, tok = tiny_model("llama", layers=3, ffn=128)
    ids = torch.randint(0, len(tok), (4, 16), generator=torch.Generator().manual_seed(0))
    stats = calibrate(model, ids)
    plan = make_plan(model, stats, base_description(model, "tiny", "x"), 0.3, recover="lstsq", shapes="per-layer")
    copied = []
    real = copy.deepcopy
    monkeypatch.setattr(copy, "deepcopy", lambda x, *a: copied.append(type(x).__name__) or real(x, *a))
    recover(model, None, plan, stats, ids, blocks=pruning_in_place(model, plan))
    layer_cls = type(arch.layers(model)[0]).__name__
    assert copied and set(copied) == {layer_cls}


@pytest.mark.parametrize("family,heads,drop", [("llama", True, 1), ("qwen2", True, 0), ("gemma3", True, 1), ("qwen3", False, 1)])
def test_masked_model_computes_the_pruned_model(family, heads, drop):
    """fit scores candidates through apply.masked instead of pruned copies: same logits."""
    from edgeprune.apply import masked

    model, tok = tiny_model(family, layers=4, ffn=256, seed=5)
    ids = torch.randint(0, len(tok), (4, 40), generator=torch.Generator().manual_seed(1))
    stats = calibrate(model, ids)
    plan = make_plan(model, stats, base_description(model, "tiny", "x"), 0.4, heads=heads, target="linear" if heads else "ffn",
                     drop_layers=drop, recover="none", shapes="per-layer")
    reference = pruned_copy(model, plan)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with torch.no_grad():
        want = reference(ids).logits
        with masked(model, plan) as m:
            got = m(ids).logits
        dense_after = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert len(arch.layers(model)) == 4 and all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    assert not torch.allclose(dense_after, want)  # the mask is gone afterwards


def _mapped_rss(path) -> int:
    """Resident bytes of this process's mappings of `path` (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        first = line.split(maxsplit=1)[0]
        if "-" in first and not first.endswith(":"):  # a mapping's header line
            inside = line.rstrip().endswith(str(path))
        elif inside and first == "Rss:":
            total += int(line.split()[1]) * 1024
    return total


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="madvise page release is Linux-only")
def test_in_place_gives_back_the_mapped_dense_pages(tmp_path):
    """transformers maps safetensors weights; pruning in place must not keep the dense pages resident
    beside the pruned ones (issue #15: a 1B prune held both, 8.7 GB for a 4.9 GB model)."""
    from edgeprune.models import load_model
    from edgeprune.testing import save_tiny_llama

    path = save_tiny_llama(tmp_path / "m", layers=4, ffn=1024, hidden=256, heads=4, kv_heads=2)
    lm = load_model(str(path))
    model = lm.model
    weights = path / "model.safetensors"
    ids = torch.randint(0, len(lm.tokenizer), (4, 32), generator=torch.Generator().manual_seed(0))
    stats = calibrate(model, ids)  # touches every weight: all of them resident
    before = _mapped_rss(weights)
    plan = make_plan(model, stats, base_description(model, "tiny", "x"), 0.5, drop_layers=1, recover="lstsq", shapes="per-layer")
    kept = {lp.index: len(lp.ffn_keep) for lp in plan.layers}
    replaced = [i for i in range(4) if kept.get(i, 0) < 1024]  # CFSP may leave a block whole
    assert len(replaced) >= 2
    mlp_bytes = sum(p.numel() * 4 for i in replaced for p in arch.layers(model)[i].mlp.parameters())
    assert before >= mlp_bytes
    reference = pruned_copy(model, plan)
    recover(reference, model, plan, stats, ids)
    recover(model, None, plan, stats, ids, blocks=pruning_in_place(model, plan))
    # the pruned FFNs and the dropped layer were replaced: their mapped pages are no longer resident
    assert before - _mapped_rss(weights) >= 0.9 * mlp_bytes
    for (n, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), n  # what stayed mapped (embeddings, norms) reads back right
    with torch.no_grad():
        assert torch.equal(model(ids[:2]).logits, reference(ids[:2]).logits)


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="madvise is Linux-only")
def test_page_out_keeps_every_value(tmp_path):
    """Paging out weights still in use reads them back unchanged, including ones changed in place."""
    from edgeprune import mapped
    from edgeprune.models import load_model
    from edgeprune.testing import save_tiny_llama

    path = save_tiny_llama(tmp_path / "m", layers=2, ffn=1024, hidden=256, heads=4, kv_heads=2)
    lm = load_model(str(path))
    ids = torch.randint(0, len(lm.tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = lm.model(ids).logits
        up = arch.layers(lm.model)[0].mlp.up_proj.weight
        up.mul_(2.0)  # a private mapping's own change (exact, undone below): must survive the page-out
        changed = up.clone()
        resident = _mapped_rss(path / "model.safetensors")
        assert mapped.page_out(lm.model.parameters()) > 0
        assert _mapped_rss(path / "model.safetensors") < resident / 2
        assert torch.equal(up, changed)
        up.div_(2.0)
        assert torch.equal(lm.model(ids).logits, want)  # the clean pages came back from the file
