"""lstsq_tune: after the refit, gradient steps on each pruned block's FFN towards the dense block
output (edgeprune/blocktune.py), kept only when the held-out rows say it helped."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from edgeprune import blocktune
from edgeprune.apply import pruning_in_place
from edgeprune.calibrate import calibrate
from edgeprune.errors import EdgepruneError
from edgeprune.plan import PrunePlan, base_description
from edgeprune.prune import make_plan, pruned_copy
from edgeprune.recover import LSTSQ_TUNE_EPOCHS, check_recover_args, recover
from edgeprune.testing import tiny_model


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def _setup(family, tok):
    model, _ = tiny_model(family, tok, layers=4, ffn=256, seed=1)
    ids = torch.randint(0, len(tok), (16, 48), generator=torch.Generator().manual_seed(0))
    return model, ids, calibrate(model, ids), base_description(model, f"tiny-{family}", "x")


@torch.no_grad()
def _kl(dense, model, ids):
    a = F.log_softmax(dense(ids, use_cache=False).logits.double(), -1)
    b = F.log_softmax(model(ids, use_cache=False).logits.double(), -1)
    return float((a.exp() * (a - b)).sum(-1).mean())


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: the FFN output goes through its post-FFN norm
def test_tuning_lowers_each_blocks_heldout_error_and_the_models_kl(family, tok):
    model, ids, stats, base = _setup(family, tok)
    test = torch.randint(0, len(tok), (8, 48), generator=torch.Generator().manual_seed(5))
    kl = {}
    for epochs in (0, 5):
        plan = make_plan(model, stats, base, 0.4, recover="lstsq", recover_args={"lstsq_tune": epochs}, shapes="per-layer")
        pruned = pruned_copy(model, plan)
        rep = recover(pruned, model, plan, stats, ids)["lstsq"]
        kl[epochs] = _kl(model, pruned, test)
        tuned = [b["tune"] for b in rep["blocks"] if "tune" in b]
        assert len(tuned) == (len(rep["blocks"]) if epochs else 0)
        for t in tuned:
            assert len(t["heldout_by_epoch"]) == epochs
            assert t["heldout_after"] == min([t["heldout_before"], *t["heldout_by_epoch"]])
            assert t["kept"] == (t["heldout_after"] < t["heldout_before"])
        assert not epochs or any(t["kept"] for t in tuned)
    assert kl[5] < kl[0]


def test_a_tuning_that_never_helps_leaves_the_refit_weights(tok, monkeypatch):
    model, ids, stats, base = _setup("llama", tok)
    monkeypatch.setattr(blocktune, "TUNE_LR", 10.0)  # steps far too big: every epoch is worse on held-out rows
    plans = [make_plan(model, stats, base, 0.4, recover="lstsq", recover_args={"lstsq_tune": e}, shapes="per-layer") for e in (0, 2)]
    models = [pruned_copy(model, p) for p in plans]
    reps = [recover(m, model, p, stats, ids)["lstsq"] for m, p in zip(models, plans)]
    assert all(not b["tune"]["kept"] for b in reps[1]["blocks"])
    for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        assert torch.equal(a, b), name
    assert all(p.grad is None for p in models[1].parameters())


def test_a_large_block_sees_fewer_tokens(tok, monkeypatch):
    """TUNE_WORK bounds parameters x tokens per block (a 1B model's FFN gets about one epoch, not four)."""
    model, ids, stats, base = _setup("llama", tok)
    plan = make_plan(model, stats, base, 0.4, recover="lstsq", recover_args={"lstsq_tune": 4}, shapes="per-layer")
    fit_tokens = 12 * 48  # every 4th of the 16 rows is held out
    full = recover(pruned_copy(model, plan), model, plan, stats, ids)["lstsq"]
    assert all(b["tune"]["tokens"] == 4 * fit_tokens and len(b["tune"]["heldout_by_epoch"]) == 4 for b in full["blocks"])
    params = {b["layer"]: 3 * 64 * lp_w + 64 for b, lp_w in zip(full["blocks"], plan.widths())}
    monkeypatch.setattr(blocktune, "TUNE_WORK", 1.5 * fit_tokens * max(params.values()))
    capped = recover(pruned_copy(model, plan), model, plan, stats, ids)["lstsq"]
    for b in capped["blocks"]:
        want = min(4 * fit_tokens, int(blocktune.TUNE_WORK / params[b["layer"]]))
        assert b["tune"]["tokens"] == want and len(b["tune"]["heldout_by_epoch"]) == -(-want // fit_tokens)


def test_tuning_in_place_gives_the_same_model_as_on_a_copy(tok):
    model, ids, stats, base = _setup("llama", tok)
    plan = make_plan(model, stats, base, 0.5, recover="lstsq", recover_args={"lstsq_tune": 2}, shapes="per-layer")
    twin = PrunePlan.from_dict(json.loads(plan.to_json()))
    dense = copy.deepcopy(model)
    ref = pruned_copy(dense, twin)
    recover(ref, dense, twin, stats, ids)
    recover(model, None, plan, stats, ids, blocks=pruning_in_place(model, plan))
    want = ref.state_dict()
    for name, t in model.state_dict().items():
        torch.testing.assert_close(t, want[name], rtol=1e-5, atol=1e-6)


def test_token_weights_are_relative_to_each_tokens_size():
    h = torch.tensor([[[30.0, -40.0], [0.3, 0.4]]])  # two tokens 100x apart in size
    w = blocktune.token_weights(h)
    err = torch.tensor([[[3.0, 0.0], [0.03, 0.0]]])  # the same 10% error on each
    per_token = err.double().pow(2).sum(-1) * w
    torch.testing.assert_close(per_token[0, 0], per_token[0, 1], rtol=1e-2, atol=0)  # up to the tiny floor on a token's size


def test_tune_is_checked():
    assert check_recover_args(["lstsq"], {})["lstsq_tune"] == LSTSQ_TUNE_EPOCHS == 4  # on by default
    for bad in (-1, 1.5, True, 101):
        with pytest.raises(EdgepruneError, match="lstsq_tune must be a whole number of epochs"):
            check_recover_args(["lstsq"], {"lstsq_tune": bad})
    with pytest.raises(EdgepruneError, match="lstsq_tune=2 works on the pruned network.s inputs"):
        check_recover_args(["lstsq"], {"lstsq_tune": 2, "lstsq_inputs": "dense"})
