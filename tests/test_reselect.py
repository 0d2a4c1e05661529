"""lstsq_select=obs: the FFN channels that fill each block's width are re-chosen by sequential
structured OBS on the pruned network's inputs (edgeprune/reselect.py, condition.obs_order)."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from edgeprune.apply import pruning_in_place
from edgeprune.calibrate import calibrate
from edgeprune.condition import obs_order
from edgeprune.errors import EdgepruneError
from edgeprune.plan import PrunePlan, base_description
from edgeprune.prune import make_plan, pruned_copy
from edgeprune.recover import check_recover_args, recover
from edgeprune.testing import tiny_model


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def _quadratic(n=7, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(4 * n, n, generator=g, dtype=torch.float64)
    h = a.T @ a + 0.1 * torch.eye(n, dtype=torch.float64)
    return h, torch.randn(d, n, generator=g, dtype=torch.float64)


def _constrained_min(h, w_star, removed):
    """min over W with W[:, removed] = 0 of tr((W - W*) H (W - W*)^T), solved directly on the kept columns."""
    n = h.shape[0]
    keep = [j for j in range(n) if j not in removed]
    gone = sorted(removed)
    # d/dW_K = 0:  (W_K - W*_K) H_KK = W*_P H_PK
    w_k = w_star[:, keep] + w_star[:, gone] @ h[gone][:, keep] @ torch.linalg.inv(h[keep][:, keep])
    w = torch.zeros_like(w_star)
    w[:, keep] = w_k
    diff = w - w_star
    return float(torch.einsum("di,ij,dj->", diff, h, diff))


def test_obs_removes_the_column_whose_exact_constrained_cost_is_least():
    h, w_star = _quadratic()
    costs = [_constrained_min(h, w_star, {j}) for j in range(h.shape[0])]
    first = obs_order(torch.linalg.inv(h), w_star.clone(), 1)
    assert first == [min(range(len(costs)), key=costs.__getitem__)]
    # greedy: each next column is the cheapest given the ones already gone (checked by brute force)
    order = obs_order(torch.linalg.inv(h), w_star.clone(), 4, chunk=2)
    for t in range(1, 4):
        gone = set(order[:t])
        cand = [j for j in range(h.shape[0]) if j not in gone]
        best = min(cand, key=lambda j: _constrained_min(h, w_star, gone | {j}))
        assert order[t] == best
    assert len(set(order)) == 4


def _setup(family, tok, seed=1):
    model, _ = tiny_model(family, tok, layers=4, ffn=256, seed=seed)
    ids = torch.randint(0, len(tok), (16, 48), generator=torch.Generator().manual_seed(0))
    stats = calibrate(model, ids)
    return model, ids, stats, base_description(model, f"tiny-{family}", "x")


@torch.no_grad()
def _kl(dense, model, ids):
    a = F.log_softmax(dense(ids, use_cache=False).logits.double(), -1)
    b = F.log_softmax(model(ids, use_cache=False).logits.double(), -1)
    return float((a.exp() * (a - b)).sum(-1).mean())


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_reselection_keeps_the_widths_updates_the_plan_and_fits_unseen_text_better(family, tok):
    model, ids, stats, base = _setup(family, tok)
    test = torch.randint(0, len(tok), (8, 48), generator=torch.Generator().manual_seed(5))
    kl = {}
    for select in ("plan", "obs"):
        plan = make_plan(model, stats, base, 0.4, recover="lstsq", recover_args={"lstsq_select": select, "lstsq_tune": 0}, shapes="per-layer")
        widths = plan.widths()
        chosen = [list(lp.ffn_keep) for lp in plan.layers]
        pruned = pruned_copy(model, plan)
        rep = recover(pruned, model, plan, stats, ids)["lstsq"]
        kl[select] = _kl(model, pruned, test)
        assert plan.widths() == widths
        down = [b["consumers"]["down_proj"] for b in rep["blocks"]]
        if select == "plan":
            assert [list(lp.ffn_keep) for lp in plan.layers] == chosen and not any("reselected" in c for c in down)
            continue
        changed = [sum(j not in set(old) for j in lp.ffn_keep) for lp, old in zip(plan.layers, chosen)]
        assert [c["reselected"]["changed"] for c in down] == changed and any(changed)
        # the plan describes the model that came out: the dense rows it names are the pruned gate/up rows
        rebuilt = pruned_copy(model, PrunePlan.from_dict(json.loads(plan.to_json())))
        for a, b in zip(rebuilt.model.layers, pruned.model.layers):
            assert torch.equal(a.mlp.gate_proj.weight, b.mlp.gate_proj.weight)
            assert torch.equal(a.mlp.up_proj.weight, b.mlp.up_proj.weight)
            assert a.mlp.down_proj.weight.shape == b.mlp.down_proj.weight.shape
        # the dense model is untouched (its modules were borrowed, not changed)
        fresh, *_ = _setup(family, tok)
        for a, b in zip(fresh.state_dict().values(), model.state_dict().values()):
            assert torch.equal(a, b)
    assert kl["obs"] < kl["plan"]


def test_reselection_in_place_gives_the_same_model_as_on_a_copy(tok):
    model, ids, stats, base = _setup("llama", tok)
    plan = make_plan(model, stats, base, 0.5, recover="lstsq", recover_args={"lstsq_select": "obs", "lstsq_tune": 0}, shapes="per-layer")
    twin = PrunePlan.from_dict(json.loads(plan.to_json()))
    dense = copy.deepcopy(model)
    ref = pruned_copy(dense, twin)
    recover(ref, dense, twin, stats, ids)
    recover(model, None, plan, stats, ids, blocks=pruning_in_place(model, plan), block_device="cpu")
    assert [lp.ffn_keep for lp in plan.layers] == [lp.ffn_keep for lp in twin.layers]
    want = ref.state_dict()
    for name, t in model.state_dict().items():
        torch.testing.assert_close(t, want[name], rtol=1e-5, atol=1e-6)


def test_select_is_checked():
    assert check_recover_args(["lstsq"], {})["lstsq_select"] == "plan"
    with pytest.raises(EdgepruneError, match="lstsq_select must be one of plan, obs"):
        check_recover_args(["lstsq"], {"lstsq_select": "hessian"})
    with pytest.raises(EdgepruneError, match="lstsq_select=obs works on the pruned network.s inputs: it needs lstsq_inputs=pruned"):
        check_recover_args(["lstsq"], {"lstsq_select": "obs", "lstsq_inputs": "dense"})


def test_cli_prune_takes_the_lstsq_options_and_refuses_them_elsewhere(tiny_dir, tmp_path):
    from tests.conftest import run_cli

    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"word{i % 37} and more text {i}" for i in range(400)))
    common = ("--sparsity", "0.3", "--calib", calib, "--nsamples", "8", "--seqlen", "32", "--threads", "1")
    r = run_cli("prune", tiny_dir, *common, "--lstsq-tune", "2", "--out", tmp_path / "t", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["plan"]["method"]["recover_args"]["lstsq_tune"] == 2
    r = run_cli("prune", tiny_dir, *common, "--lstsq-select", "obs", "--lstsq-tune", "0", "--out", tmp_path / "p", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["plan"]["method"]["recover_args"]["lstsq_select"] == "obs"
    # the saved plan names the dense rows the saved checkpoint holds (the re-chosen ones, not the ranking's)
    from safetensors.torch import load_file

    from edgeprune.models import load_model

    saved = PrunePlan.load(tmp_path / "p" / "plan.json")
    weights = load_file(str(tmp_path / "p" / "model.safetensors"))
    dense = load_model(str(tiny_dir)).model
    for lp in saved.layers:
        gate = dense.model.layers[lp.index].mlp.gate_proj.weight.detach()[lp.ffn_keep]
        assert torch.equal(weights[f"model.layers.{lp.index}.mlp.gate_proj.weight"], gate)
    r = run_cli("prune", tiny_dir, *common, "--recover", "bias", "--lstsq-tune", "2", "--out", tmp_path / "q")
    assert r.returncode == 2 and "do not apply to --recover bias" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "q").exists()
    r = run_cli("prune", tiny_dir, *common, "--lstsq-select", "best", "--out", tmp_path / "s")
    assert r.returncode == 2 and "lstsq_select must be one of plan, obs" in r.stderr
