"""The sensitivity allocation: measured per-block KL, the exact budgeted choice, plans and the CLI."""

import copy
import itertools
import json

import numpy as np
import pytest
import torch

from edgeprune import arch, sensitivity
from edgeprune.calibrate import calibrate
from edgeprune.errors import EdgepruneError
from edgeprune.methods import _best_first
from edgeprune.plan import base_description
from edgeprune.prune import make_plan, pruned_copy, resolve_options
from edgeprune.testing import tiny_model
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def setup():
    model, tok = tiny_model("llama", layers=4, ffn=256, seed=2)
    ids = torch.randint(0, len(tok), (6, 32), generator=torch.Generator().manual_seed(0))
    stats = calibrate(model, ids, gram=True)
    return model, ids, stats, base_description(model, "tiny", "f" * 64)


@torch.no_grad()
def _kl_full(dense, model, ids):
    lp = torch.log_softmax(dense(ids, use_cache=False).logits.float(), -1)
    lq = torch.log_softmax(model(ids, use_cache=False).logits.float(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def _narrowed(model, widths, orders):
    """A real pruned copy: block i keeps orders[i][:widths[i]] (rows of gate/up, columns of down)."""
    pruned = copy.deepcopy(model)
    for i, w in widths.items():
        mlp = arch.layers(pruned)[i].mlp
        keep = torch.tensor(sorted(orders[i][:w]))
        with torch.no_grad():
            mlp.gate_proj.weight.data = mlp.gate_proj.weight.data[keep]
            mlp.up_proj.weight.data = mlp.up_proj.weight.data[keep]
            mlp.down_proj.weight.data = mlp.down_proj.weight.data[:, keep]
    return pruned


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_measured_cost_is_the_kl_change_of_a_real_pruned_network(family):
    """c_l(w) = KL(network with block l at w, the others at their base widths) - KL(base network),
    checked against physically pruned copies."""
    model, tok = tiny_model(family, layers=3, ffn=128, seed=4)
    ids = torch.randint(0, len(tok), (2, 24), generator=torch.Generator().manual_seed(1))
    stats = calibrate(model, ids)
    kept = [0, 1, 2]
    orders = {i: _best_first("activation", arch.layers(model)[i], stats.blocks[i], 0, i, 32) for i in kept}
    base = {0: 64, 1: 96, 2: 64}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    m = sensitivity.measure(model, ids, kept, orders, base, align=16, lo=16, step=0.25)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # left as it was
    assert m["step"] == 32 and m["widths"] == {0: [32, 96], 1: [64, 128], 2: [32, 96]}
    base_kl = _kl_full(model, _narrowed(model, base, orders), ids)
    assert m["base_kl"] == pytest.approx(base_kl, rel=1e-3, abs=1e-6)
    for i in kept:
        for w, c in zip(m["widths"][i], m["kl"][i]):
            real = _kl_full(model, _narrowed(model, {**base, i: w}, orders), ids) - base_kl
            assert c == pytest.approx(real, rel=1e-3, abs=1e-5)


def test_cost_curve_is_interpolated_and_non_increasing():
    first, c = sensitivity.cost_curve([64, 192], [0.5, 0.1], w0=128, align=32)
    assert first == 64 and len(c) == 5
    assert c[2] == 0.0 and c[0] == 0.5 and c[1] == pytest.approx(0.25)
    assert list(c[3:]) == [0.0, 0.0]  # a positive cost above w0 (noise) is flattened: wider never costs more
    first, c = sensitivity.cost_curve([64, 192], [0.5, -0.2], w0=128, align=32)
    assert c[-1] == pytest.approx(-0.2) and np.all(np.diff(c) <= 1e-12)


def test_budgeted_choice_is_the_exact_optimum():
    rng = np.random.default_rng(0)
    align = 32
    curves = [(32, np.sort(rng.random(4))[::-1] * s) for s in (1.0, 3.0, 0.2)] + [(64, np.array([0.4, 0.0, -0.1]))]
    for budget in (160, 256, 384, 448):
        widths = sensitivity.allocate_widths(curves, align, budget)
        assert sum(widths) == budget
        options = [range(f, f + align * len(c), align) for f, c in curves]
        assert all(w in o for w, o in zip(widths, options))
        cost = sum(c[(w - f) // align] for (f, c), w in zip(curves, widths))
        brute = min(sum(c[(w - f) // align] for (f, c), w in zip(curves, ws))
                    for ws in itertools.product(*options) if sum(ws) == budget)
        assert cost == pytest.approx(brute)
    with pytest.raises(EdgepruneError, match="cannot be split"):
        sensitivity.allocate_widths(curves, align, 64)


def test_an_insensitive_block_gives_its_channels_to_the_others(setup):
    """A block whose FFN barely reaches the output (down_proj scaled by 1e-3) gives up a trust-region
    step of channels to the others; the total stays CFSP's."""
    model, ids, _, base = setup
    model = copy.deepcopy(model)
    with torch.no_grad():
        arch.layers(model)[2].mlp.down_proj.weight.mul_(1e-3)
    stats = calibrate(model, ids)
    cfsp = make_plan(model, stats, base, 0.25, method="cfsp", align=32, recover="none")
    plan = make_plan(model, stats, base, 0.25, method="cfsp", allocation="sensitivity", align=32, ids=ids, recover="none")
    widths, cfsp_widths = [len(lp.ffn_keep) for lp in plan.layers], [len(lp.ffn_keep) for lp in cfsp.layers]
    assert sum(widths) == sum(cfsp_widths) == 0.75 * 4 * 256
    rec = plan.method["sensitivity"]
    assert rec["base_widths"] == cfsp_widths
    assert widths[2] == cfsp_widths[2] - 32  # 0.125 x 256: the lower end of its trust region
    assert plan.method["allocation"] == "sensitivity"
    assert rec["rows"] == 2 and rec["tokens"] == 64 and set(rec["kl"]) == {"0", "1", "2", "3"}
    assert abs(rec["kl"]["2"][0][1]) < min(abs(rec["kl"][k][0][1]) for k in ("0", "1", "3"))
    pruned = pruned_copy(model, plan)  # the plan prunes like any other: the shapes are the planned widths
    assert [s.ffn for s in arch.layer_shapes(pruned)] == widths


def test_sensitivity_is_measured_once_per_structure(setup):
    model, ids, _, base = setup
    stats = calibrate(model, ids)
    first = make_plan(model, stats, base, 0.2, allocation="sensitivity", align=32, ids=ids, recover="none")
    again = make_plan(model, stats, base, 0.2, allocation="sensitivity", align=32, ids=ids, recover="none")
    assert len(stats._sensitivity) == 1 and first.to_json() == again.to_json()
    plan = make_plan(model, stats, base, 0.5, allocation="sensitivity", align=32, ids=ids, recover="none")
    assert len(stats._sensitivity) == 2
    assert sum(len(lp.ffn_keep) for lp in plan.layers) == 0.5 * 4 * 256


def test_sensitivity_errors(setup):
    model, _, stats, base = setup
    with pytest.raises(EdgepruneError, match="pass ids"):
        make_plan(model, stats, base, 0.3, allocation="sensitivity")
    with pytest.raises(EdgepruneError, match="itself the allocation"):
        resolve_options("uniform", allocation="sensitivity")
    with pytest.raises(EdgepruneError, match="--method cfsp takes --allocation"):
        resolve_options("cfsp", allocation="global")
    assert resolve_options("fasp", allocation="sensitivity")["allocation"] == "sensitivity"


def test_cli_prune_with_sensitivity_allocation(tiny_dir, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"word{i % 37} and more text {i}" for i in range(400)))
    out = tmp_path / "p"
    r = run_cli("prune", tiny_dir, "--sparsity", "0.3", "--allocation", "sensitivity", "--calib", calib, "--nsamples", "4",
                "--seqlen", "32", "--align", "32", "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["plan"]["method"]["allocation"] == "sensitivity"
    assert report["plan"]["method"]["sensitivity"]["tokens"] == 64
    widths = [s["ffn"] for s in report["layer_shapes"]]
    assert sum(widths) == pytest.approx(0.7 * 6 * 256, abs=32)
