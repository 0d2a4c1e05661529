"""lstsq on the pruned network's own inputs (sequential error feedback) with a held-out ridge:
never worse on held-out rows, better where refitting helps, unchanged where it cannot."""

import json

import pytest
import torch
import torch.nn.functional as F

from edgeprune import arch
from edgeprune.calibrate import calibrate, embed, rotary, run_block
from edgeprune.errors import EdgepruneError
from edgeprune.plan import base_description
from edgeprune.prune import make_plan, pruned_copy, with_recovery
from edgeprune import recover as recover_module
from edgeprune.recover import _Normal, check_recover_args, dual_is_cheaper, heldout_split, lstsq_solution, needs, recover
from edgeprune.testing import tiny_model

FAMILIES = ("llama", "qwen3", "gemma3")


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def _ids(tok, rows, seqlen, seed=0):
    return torch.randint(0, len(tok), (rows, seqlen), generator=torch.Generator().manual_seed(seed))


def _setup(family, tok, rows=16, seqlen=48, ffn=256, layers=4, seed=1):
    model, _ = tiny_model(family, tok, layers=layers, ffn=ffn, seed=seed)
    ids = _ids(tok, rows, seqlen)
    stats = calibrate(model, ids)
    return model, ids, stats, base_description(model, f"tiny-{family}", "x")


def _plan(model, stats, base, p, heads=False, drop=0, recover="lstsq", recover_args=None, method="cfsp"):
    # the refit alone: the block-wise tuning that follows it by default is tests/test_blocktune.py's
    recover_args = {"lstsq_tune": 0, **(recover_args or {})} if "lstsq" in recover else recover_args
    return make_plan(model, stats, base, p, method=method, heads=heads, target="linear" if heads else "ffn", drop_layers=drop,
                     recover=recover, recover_args=recover_args, shapes="per-layer")


@torch.no_grad()
def _kl(dense, model, ids):
    a = F.log_softmax(dense(ids, use_cache=False).logits.double(), -1)
    b = F.log_softmax(model(ids, use_cache=False).logits.double(), -1)
    return float((a.exp() * (a - b)).sum(-1).mean())


@torch.no_grad()
def _heldout_block_errors(dense, plain, restored, plan, ids):
    """Independently of the report: per refit block l, the held-out error of the dense block output
    for block l of `restored` and of `plain` (its weights before the refit), both run on the inputs
    the restored blocks 0..l-1 give."""
    _, held, mask = heldout_split(*ids.shape)
    h_d = embed(dense, ids[held])
    h_p = h_d.clone()
    pos = rotary(dense, ids.shape[1], h_d[:1])
    kept = {lp.index: i for i, lp in enumerate(plan.layers)}
    out = {}
    for li, dl in enumerate(arch.layers(dense)):
        h_d = run_block(dl, h_d, pos)
        if li not in kept:
            continue
        rl, pl = arch.layers(restored)[kept[li]], arch.layers(plain)[kept[li]]
        after = run_block(rl, h_p, pos)
        before = run_block(pl, h_p, pos)
        err = lambda x: float((x.double() - h_d.double()).pow(2).sum(-1)[mask].sum())  # noqa: E731
        out[li] = (err(before), err(after))
        h_p = after
    return out


# ------------------------------------------------------------------------------- never regresses
@pytest.mark.parametrize("family,heads,drop", [("llama", True, 0), ("qwen3", True, 1), ("gemma3", True, 0), ("llama", False, 1)])
def test_heldout_block_error_never_rises(family, heads, drop, tok):
    model, ids, stats, base = _setup(family, tok)
    plan = _plan(model, stats, base, 0.5, heads=heads, drop=drop)
    plain = pruned_copy(model, with_recovery(plan, "none"))
    restored = pruned_copy(model, plan)
    rep = recover(restored, model, plan, stats, ids)["lstsq"]
    json.dumps(rep)  # goes into report.json as it is
    assert rep["inputs"] == "pruned" and rep["blocks"] and rep["consumers"] == rep["refit"] + rep["unchanged"]
    if heads:
        assert any("o_proj" in b["consumers"] for b in rep["blocks"])
    for b in rep["blocks"]:
        assert b["heldout_after"] <= b["heldout_before"]
        chain = list(b["consumers"].values())
        for c in chain:
            assert c["heldout_after"] <= c["heldout_before"]
            assert c["heldout_after"] == pytest.approx(min([c["heldout_before"]] + list(c["heldout_by_ridge"].values())), rel=1e-9)
            assert c["ridge"] == "unchanged" or c["heldout_after"] < c["heldout_before"]
            assert c["target"] == ("layer" if family == "gemma3" else "block")  # Gemma 3's post-norms: the layer's own output
    # the same guarantee measured on the models themselves, not taken from the report
    errs = _heldout_block_errors(model, plain, restored, plan, ids)
    for b in rep["blocks"]:
        before, after = errs[b["layer"]]
        assert after <= before * (1 + 1e-5)
    assert sum(a for _, a in errs.values()) < sum(bf for bf, _ in errs.values())  # with 16 rows it does help here


def test_blocks_after_a_dropped_layer_see_the_pruned_stream(tok):
    model, ids, stats, base = _setup("llama", tok, layers=5)
    plan = _plan(model, stats, base, 0.4, drop=1)
    assert plan.dropped_layers
    restored = pruned_copy(model, plan)
    rep = recover(restored, model, plan, stats, ids)["lstsq"]
    assert [b["layer"] for b in rep["blocks"]] == [lp.index for lp in plan.layers if len(lp.ffn_keep) < 256]


# ----------------------------------------------------------------------------------- it helps
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_refit_lowers_kl_to_dense_when_half_the_ffn_is_gone(family, tok):
    model, ids, stats, base = _setup(family, tok, rows=32, seqlen=64)
    plan = _plan(model, stats, base, 0.5)
    plain = pruned_copy(model, with_recovery(plan, "none"))
    restored = pruned_copy(model, plan)
    rep = recover(restored, model, plan, stats, ids)["lstsq"]
    assert not rep["cannot_help"] and rep["refit"] >= 1 and "refit" in rep["summary"]
    test = _ids(tok, 8, 64, seed=7)  # text neither fit nor held out
    assert _kl(model, restored, test) < 0.9 * _kl(model, plain, test)


# --------------------------------------------------------------------------- too few tokens
def test_few_tokens_for_wide_layers_keep_the_weights(tok):
    """48 fit tokens for 256-column down_projs: no small ridge (an overfit) is ever chosen, most stay unchanged."""
    model, ids, stats, base = _setup("llama", tok, rows=4, seqlen=16, ffn=512)
    plan = _plan(model, stats, base, 0.5, method="uniform")
    plain = pruned_copy(model, with_recovery(plan, "none"))
    restored = pruned_copy(model, plan)
    rep = recover(restored, model, plan, stats, ids)["lstsq"]
    ridges = [c["ridge"] for b in rep["blocks"] for c in b["consumers"].values()]
    assert rep["fit_tokens"] == 48 and all(c["columns"] >= 256 for b in rep["blocks"] for c in b["consumers"].values())
    assert all(r == "unchanged" or r >= 0.1 for r in ridges), ridges
    assert sum(r == "unchanged" for r in ridges) >= len(ridges) / 2, ridges
    for b, (pl, rl) in zip(plan.layers, zip(arch.layers(plain), arch.layers(restored))):
        rec = next((x for x in rep["blocks"] if x["layer"] == b.index), None)
        if rec and rec["consumers"]["down_proj"]["ridge"] == "unchanged":  # the infinite-ridge path: bit for bit
            assert torch.equal(pl.mlp.down_proj.weight, rl.mlp.down_proj.weight)
            assert pl.mlp.down_proj.bias is None and not rl.mlp.down_proj.bias.any()  # the plan's bias, left at zero


def test_cannot_help_when_plain_removal_is_exact(tok):
    """Pruned channels that were dead (zero down_proj columns): removal loses nothing, no ridge can win."""
    model, ids, stats, base = _setup("llama", tok)
    plan = _plan(model, stats, base, 0.5)
    with torch.no_grad():
        for lp in plan.layers:
            dead = sorted(set(range(256)) - set(lp.ffn_keep))
            model.model.layers[lp.index].mlp.down_proj.weight[:, dead] = 0
    plain = pruned_copy(model, with_recovery(plan, "none"))
    restored = pruned_copy(model, plan)
    rep = recover(restored, model, plan, stats, ids)["lstsq"]
    assert rep["cannot_help"] and rep["refit"] == 0 and rep["unchanged"] == rep["consumers"] > 0
    assert rep["summary"].startswith("lstsq cannot help here:")
    assert all(c["ridge"] == "unchanged" for b in rep["blocks"] for c in b["consumers"].values())
    a, b = plain.state_dict(), restored.state_dict()
    for n, t in b.items():  # every weight as plain removal left it; the plan's biases are still zero
        assert torch.equal(a[n], t) if n in a else (n.endswith("down_proj.bias") and not t.any()), n


def test_a_huge_ridge_is_the_kept_weights_and_zero_is_least_squares():
    g = torch.Generator().manual_seed(0)
    x, w0 = torch.randn(400, 12, generator=g, dtype=torch.float64) + 0.3, torch.randn(5, 12, generator=g, dtype=torch.float64)
    y = x @ torch.randn(12, 5, generator=g, dtype=torch.float64) + 0.7
    def equations():
        eq = _Normal(12, 5, "cpu")
        eq.add(x[:200], y[:200])
        eq.add(x[200:], y[200:])
        return eq

    eq = equations()
    (_, w_big, b_big), (_, w0_, b0_) = eq.solutions(w0, [1e12, 0.0], intercept=True)
    with pytest.raises(RuntimeError, match="centred in place"):  # the intercept centred the sums: they are used up
        next(eq.solutions(w0, [0.0], intercept=True))
    eq = equations()
    torch.testing.assert_close(w_big, w0, rtol=0, atol=1e-8)
    xa = torch.cat([x, torch.ones(400, 1, dtype=torch.float64)], 1)
    ref = torch.linalg.lstsq(xa, y).solution.T
    torch.testing.assert_close(torch.cat([w0_, b0_[:, None]], 1), ref, rtol=1e-8, atol=1e-8)
    (_, w_ni, b_ni), = eq.solutions(w0, [0.0], intercept=False)
    assert b_ni is None
    torch.testing.assert_close(w_ni, torch.linalg.lstsq(x, y).solution.T, rtol=1e-8, atol=1e-8)


# ------------------------------------------------------------------ the T x T (dual) form
@pytest.mark.parametrize("intercept", [True, False])
def test_dual_form_is_the_primal_solution(intercept):
    """Fewer fit tokens than kept columns (a 1B model's down_proj on fit's 3k tokens): the T x T system
    gives the K x K system's solution for every ridge, the least-squares one nearest W0 included."""
    g = torch.Generator().manual_seed(3)
    t, k, d = 40, 120, 6
    x = torch.randn(t, k, generator=g, dtype=torch.float64) @ torch.randn(k, k, generator=g, dtype=torch.float64) / 10 + 0.4
    y, w0 = torch.randn(t, d, generator=g, dtype=torch.float64) + 1.0, torch.randn(d, k, generator=g, dtype=torch.float64)
    ridges = [1e-3, 1e-2, 0.1, 1.0, 0.0]
    forms = []
    for tokens in (None, t):
        eq = _Normal(k, d, "cpu", tokens=tokens, ridges=len(ridges))
        for i in range(0, t, 16):
            eq.add(x[i : i + 16], y[i : i + 16])
        forms.append((eq.dual, list(eq.solutions(w0, ridges, intercept))))
    (primal_is_dual, primal), (dual_is_dual, dual) = forms
    assert not primal_is_dual and dual_is_dual
    for (r, wp, bp), (_, wd, bd) in zip(primal, dual):
        torch.testing.assert_close(wd, wp, rtol=1e-9, atol=1e-9)
        if intercept:
            torch.testing.assert_close(bd, bp, rtol=1e-9, atol=1e-9)
        else:
            assert bp is None and bd is None
        if r == 0.0:  # underdetermined: it fits the fit rows exactly, and moves W0 only within the rows' span
            pred = x @ wd.T + (bd if intercept else 0)
            torch.testing.assert_close(pred, y, rtol=1e-7, atol=1e-7)
            xc = x - x.mean(0) if intercept else x
            moved = (wd - w0).T
            torch.testing.assert_close(xc.T @ torch.linalg.lstsq(xc.T, moved).solution, moved, rtol=1e-7, atol=1e-7)


def test_dual_form_only_where_it_is_cheaper():
    assert dual_is_cheaper(3072, 7776, 2048, 4)  # Llama-3.2-1B down_proj at 20 % on fit's 32 x 128 tokens
    assert not dual_is_cheaper(3072, 1216, 576, 4)  # SmolLM2-135M: more tokens than columns
    assert not dual_is_cheaper(4096, 4096, 2048, 4)
    with pytest.raises(RuntimeError, match="sized for"):
        _Normal(8, 2, "cpu", tokens=3).add(torch.zeros(4, 8), torch.zeros(4, 2))


def test_lstsq_refits_the_same_model_in_either_form(tok, monkeypatch):
    """Either form forced (each is exact for any token count; the cost decides which runs)."""
    model, ids, stats, base = _setup("llama", tok)
    plan = _plan(model, stats, base, 0.5)
    results = []
    for dual in (True, False):
        monkeypatch.setattr(recover_module, "dual_is_cheaper", lambda *a, dual=dual, **k: dual)
        restored = pruned_copy(model, plan)
        rep = recover(restored, model, plan, stats, ids)["lstsq"]
        results.append(([c["ridge"] for b in rep["blocks"] for c in b["consumers"].values()], restored.state_dict()))
    (ridges_dual, sd_dual), (ridges_primal, sd_primal) = results
    assert ridges_dual == ridges_primal and any(r != "unchanged" for r in ridges_dual), ridges_dual
    for n, t in sd_dual.items():
        torch.testing.assert_close(t, sd_primal[n], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- plumbing
def test_heldout_split():
    fit, held, mask = heldout_split(8, 10)
    assert held.tolist() == [3, 7] and fit[[3, 7]].sum() == 0 and fit.sum() == 60 and mask.all()
    fit, held, mask = heldout_split(3, 10)
    assert held.tolist() == [2] and fit.sum() == 20
    fit, held, mask = heldout_split(1, 16)  # one row: its last quarter of positions
    assert held.tolist() == [0] and fit[0, :12].all() and not fit[0, 12:].any() and (mask == ~fit).all()


def test_lstsq_declares_it_needs_the_ids_not_the_dense_gram():
    assert needs("lstsq") == {"stats": True, "gram": False, "ids": True}
    assert needs("lstsq+kd")["ids"] and needs("mask")["gram"] and not needs("bias")["ids"]
    args = check_recover_args(["lstsq"], {})
    assert args["lstsq_ridge"] == "auto" and args["lstsq_inputs"] == "pruned" and args["lstsq_target"] == "block"
    assert check_recover_args(["lstsq"], {"lstsq_ridge": [0.1, 1]})["lstsq_ridge"] == [0.1, 1.0]
    for bad in ({"lstsq_ridge": -1}, {"lstsq_ridge": "big"}, {"lstsq_ridge": []}, {"lstsq_inputs": "both"}, {"lstsq_target": "x"}):
        with pytest.raises(EdgepruneError):
            check_recover_args(["lstsq"], bad)


def test_lstsq_without_ids_says_so(tok):
    model, ids, stats, base = _setup("llama", tok, rows=4, seqlen=16)
    plan = _plan(model, stats, base, 0.5)
    with pytest.raises(EdgepruneError, match="calibration token ids"):
        recover(pruned_copy(model, plan), model, plan, stats, None)


def test_dense_inputs_variant_is_the_one_pass_fasp_solve(tok):
    """lstsq_inputs="dense" keeps the old one-pass solve (making its own Gram pass when needed)."""
    model, ids, stats, base = _setup("llama", tok, rows=8, seqlen=32)
    plan = _plan(model, stats, base, 0.5, recover_args={"lstsq_inputs": "dense", "lstsq_ridge": 0.05})
    restored = pruned_copy(model, plan)
    rep = recover(restored, model, plan, stats, ids)["lstsq"]  # stats without Gram: recover makes them
    gram = calibrate(model, ids, gram=True)
    lp = plan.layers[1]
    w = model.model.layers[lp.index].mlp.down_proj.weight.detach()
    want, delta = lstsq_solution(w, gram.blocks[lp.index].ffn, torch.tensor(lp.ffn_keep), ridge=0.05)
    torch.testing.assert_close(restored.model.layers[1].mlp.down_proj.weight, want.float(), rtol=1e-5, atol=1e-6)
    assert rep["consumers"] == sum(len(x.ffn_keep) < 256 for x in plan.layers)


def test_a_fixed_ridge_still_competes_with_unchanged(tok):
    """A fixed ridge grid of one value still competes with "unchanged" per consumer."""
    model, ids, stats, base = _setup("qwen3", tok, rows=8, seqlen=32)
    plan = _plan(model, stats, base, 0.5, recover_args={"lstsq_ridge": 0.001})
    rep = recover(pruned_copy(model, plan), model, plan, stats, ids)["lstsq"]
    assert rep["ridge_grid"] == [0.001]
    assert all(c["ridge"] in ("unchanged", 0.001) and set(c["heldout_by_ridge"]) == {"0.001"}
               for b in rep["blocks"] for c in b["consumers"].values())
