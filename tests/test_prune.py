"""Calibration statistics, CFSP allocation, plans, physical pruning and reloadable checkpoints."""

import json

import numpy as np
import pytest
import torch

from edgeprune import allocate, arch
from edgeprune.calibrate import calibrate, embed, rotary, run_block
from edgeprune.checkpoint import load_pruned, save_pruned
from edgeprune.errors import EdgepruneError
from edgeprune.importance import FFN_SCORES, ffn_scores
from edgeprune.plan import PrunePlan, base_description
from edgeprune.prune import make_plan, pruned_copy
from edgeprune.testing import tiny_llama
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def setup():
    model, tok = tiny_llama(layers=6, ffn=256, seed=1)
    ids = torch.randint(0, len(tok), (6, 24), generator=torch.Generator().manual_seed(0))
    stats = calibrate(model, ids, gram=True)
    return model, tok, ids, stats, base_description(model, "tiny", "f" * 64)


def test_blockwise_pass_equals_full_forward(setup):
    model, _, ids, _, _ = setup
    h = embed(model, ids)
    pos = rotary(model, ids.shape[1], h[:1])
    for layer in model.model.layers:
        h = run_block(layer, h, pos)
    full = model(ids, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(model.model.norm(h), full)


def test_channel_statistics_are_exact(setup):
    model, _, ids, stats, _ = setup
    captured = []
    hook = model.model.layers[2].mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(ids)
    hook.remove()
    x = torch.cat(captured).double()
    ch = stats.blocks[2].ffn
    torch.testing.assert_close(ch.norm, x.norm(dim=0))
    torch.testing.assert_close(ch.var, x.var(dim=0, unbiased=False))
    torch.testing.assert_close(ch.gram, x.T @ x, rtol=1e-4, atol=1e-4)
    assert ch.tokens == ids.numel()
    b = stats.blocks[0]
    assert 0 <= b.angular <= 1 and 0 <= b.one_minus_cos <= 2


def test_cfsp_ratios_mean_and_bounds():
    d = [0.5, 0.19, 0.08, 0.07, 0.09, 0.1, 0.2]
    k = allocate.cfsp_keep_ratios(d, 0.7, temperature=20)
    assert abs(k.mean() - 0.7) < 1e-9 and k.max() <= 1.0 + 1e-12
    assert k[0] == k.max() and k[3] == k.min()  # more important blocks keep more
    flat = allocate.cfsp_keep_ratios(d, 0.7, temperature=0.0)
    np.testing.assert_allclose(flat, 0.7)
    clamped = allocate.cfsp_keep_ratios(d, 0.1, temperature=200, min_keep=0.05)
    assert clamped.min() >= 0.05


def test_round_widths_hits_budget_in_aligned_steps():
    ratios = np.array([1.0, 0.9, 0.5, 0.4, 0.45, 0.7])
    widths = allocate.round_widths(ratios, 1536, 32, budget=int(0.66 * 1536 * 6))
    assert all(w % 32 == 0 and 32 <= w <= 1536 for w in widths)
    assert abs(sum(widths) - int(0.66 * 1536 * 6)) <= 16
    with pytest.raises(EdgepruneError, match="must divide"):
        allocate.round_widths(ratios, 1536, 100, budget=1000)
    with pytest.raises(EdgepruneError, match="below the minimum"):
        allocate.round_widths(ratios, 1536, 256, budget=300)


@pytest.mark.parametrize("score", FFN_SCORES)
def test_every_score_ranks_every_channel(setup, score):
    model, _, _, stats, _ = setup
    s = ffn_scores(score, model.model.layers[1], stats.blocks[1], seed=0, layer_index=1)
    assert s.shape == (256,) and torch.isfinite(s).all()


def test_activation_score_is_channel_norm_and_cfsp_uses_weights(setup):
    model, _, _, stats, _ = setup
    layer, block = model.model.layers[1], stats.blocks[1]
    assert torch.equal(ffn_scores("activation", layer, block), block.ffn.norm)
    assert not torch.allclose(ffn_scores("cfsp", layer, block) / block.ffn.norm, torch.full((256,), 3.0, dtype=torch.float64))


def test_plan_budget_and_determinism(setup):
    model, _, _, stats, base = setup
    plan = make_plan(model, stats, base, 0.5, align=32)
    assert sum(plan.widths()) == pytest.approx(0.5 * 256 * 6, abs=16)
    assert plan.achieved["ffn_sparsity"] == pytest.approx(0.5, abs=0.02)
    again = make_plan(model, stats, base, 0.5, align=32)
    assert plan.to_json() == again.to_json()
    assert json.loads(plan.to_json())["version"] == 1
    uniform = make_plan(model, stats, base, 0.5, method="uniform", align=32)
    assert len(set(uniform.widths())) == 1


def test_drop_layers_keeps_total_budget(setup):
    model, _, _, stats, base = setup
    plan = make_plan(model, stats, base, 0.5, drop_layers=1, align=32)
    influence = [b.one_minus_cos for b in stats.blocks]
    assert plan.dropped_layers == [1 + int(np.argmin(influence[1:]))]
    d, n = model.config.hidden_size, 256
    attn = sum(p.numel() for p in model.model.layers[0].self_attn.parameters())
    removed = attn + 3 * d * (n * 6 - sum(plan.widths()))
    assert removed == pytest.approx(0.5 * 3 * d * n * 6, abs=3 * d * 16)


@pytest.mark.parametrize("kwargs,match", [
    ({"sparsity": 0.0}, r"\(0, 0.95\)"),
    ({"sparsity": 0.97}, r"\(0, 0.95\)"),
    ({"sparsity": 0.3, "drop_layers": 6}, "drop-layers must be between"),
    ({"sparsity": 0.05, "drop_layers": 3}, "already removes more"),
    ({"sparsity": 0.3, "score": "nope"}, "--score must be one of"),
])
def test_bad_prune_arguments(setup, kwargs, match):
    model, _, _, stats, base = setup
    with pytest.raises(EdgepruneError, match=match):
        make_plan(model, stats, base, **kwargs)


def test_pruned_checkpoint_reloads_with_identical_logits(setup, tmp_path):
    model, tok, ids, stats, base = setup
    plan = make_plan(model, stats, base, 0.4, drop_layers=1, align=32)
    pruned = pruned_copy(model, plan)
    assert [s.ffn for s in arch.layer_shapes(pruned)] == plan.widths()
    assert model.config.num_hidden_layers == 6  # the dense model is untouched
    save_pruned(pruned, tok, plan, tmp_path)
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))
    reloaded = load_pruned(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(ids).logits, pruned(ids).logits, rtol=0, atol=0)
    assert reloaded.plan.to_json() == plan.to_json()

    from transformers import AutoModelForCausalLM  # the route for plain transformers users

    plain = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, pruned(ids).logits, rtol=0, atol=0)


def test_pruned_model_decodes_with_cache(setup):
    model, _, ids, stats, base = setup
    plan = make_plan(model, stats, base, 0.5, drop_layers=2, align=32)
    pruned = pruned_copy(model, plan)
    with torch.no_grad():
        full = pruned(ids[:1]).logits[0, -1]
        out = pruned(ids[:1, :-1], use_cache=True)
        step = pruned(ids[:1, -1:], past_key_values=out.past_key_values, use_cache=True).logits[0, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)


def test_plan_for_another_model_is_refused(setup):
    model, _, _, stats, base = setup
    plan = make_plan(model, stats, base, 0.3)
    with pytest.raises(EdgepruneError, match="made for model"):
        plan.check_base({**base, "fingerprint": "0" * 64})


def test_prune_cli_writes_everything_and_reapplies_plan(tiny_dir, tmp_path):
    out = tmp_path / "p"
    r = run_cli("prune", tiny_dir, "--sparsity", "0.4", "--drop-layers", "1", "--nsamples", "4", "--seqlen", "16",
                "--out", out, env={"EDGEPRUNE_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    for name in ("model.safetensors", "config.json", "plan.json", "report.json", "widths.png", "modeling_edgeprune.py"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["plan"]["achieved"]["layers_kept"] == 5 and report["timings"]["calibration_pass_s"] > 0
    again = tmp_path / "again"
    r = run_cli("prune", tiny_dir, "--plan", out / "plan.json", "--out", again)
    assert r.returncode == 0, r.stderr
    assert (again / "plan.json").read_bytes() == (out / "plan.json").read_bytes()
    r = run_cli("prune", tiny_dir, "--sparsity", "0.4", "--nsamples", "4", "--seqlen", "16", "--seed", "0",
                "--out", tmp_path / "third", env={"EDGEPRUNE_CACHE": str(tmp_path / "cache2")})
    r2 = run_cli("prune", tiny_dir, "--sparsity", "0.4", "--nsamples", "4", "--seqlen", "16", "--seed", "0",
                 "--out", tmp_path / "fourth", env={"EDGEPRUNE_CACHE": str(tmp_path / "cache3")})
    assert (tmp_path / "third" / "plan.json").read_bytes() == (tmp_path / "fourth" / "plan.json").read_bytes()


def test_prune_cli_bad_inputs(tiny_dir, tmp_path):
    for args, msg in ((["--sparsity", "1.2"], "(0, 0.95)"), (["--drop-layers", "9"], "drop-layers must be between")):
        r = run_cli("prune", tiny_dir, *args, "--nsamples", "2", "--seqlen", "16", "--out", tmp_path / "x",
                    env={"EDGEPRUNE_CACHE": str(tmp_path / "c")})
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr
        assert not (tmp_path / "x").exists()
    other = tmp_path / "other.json"
    plan = json.loads(PrunePlan(base={"id": "x", "fingerprint": "0" * 64, "num_layers": 6, "hidden": 64, "ffn": 256,
                                      "heads": 4, "kv_heads": 2, "head_dim": 16, "vocab": 1},
                                method={}, calibration={}, layers=[]).to_json())
    other.write_text(json.dumps(plan))
    r = run_cli("prune", tiny_dir, "--plan", other, "--out", tmp_path / "y")
    assert r.returncode == 2 and "made for model" in r.stderr
