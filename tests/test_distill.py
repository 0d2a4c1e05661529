"""Distillation recovery (`--recover kd`): the dense model teaches the pruned one, kept only when it helps."""

import pytest
import torch

from edgeprune.calibrate import calibrate
from edgeprune.distill import distill, heldout_kl
from edgeprune.errors import EdgepruneError
from edgeprune.plan import base_description
from edgeprune.prune import make_plan, parse_recover, pruned_copy, resolve_options
from edgeprune.testing import tiny_llama
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model, tok = tiny_llama(layers=4, ffn=256, seed=2)
    # text-like data: a few repeated phrases, so there is something to learn in 30 steps
    phrases = torch.randint(0, len(tok), (6, 8), generator=torch.Generator().manual_seed(1))
    rows = [phrases[torch.randint(0, 6, (4,), generator=torch.Generator().manual_seed(i))].reshape(-1) for i in range(16)]
    ids = torch.stack(rows)
    stats = calibrate(model, ids[:12])
    plan = make_plan(model, stats, base_description(model, "tiny", "f" * 64), 0.5, method="uniform", align=8, recover="none")
    return model, ids, plan


def test_distillation_lowers_heldout_kl_and_freezes_the_embedding(setup):
    dense, ids, plan = setup
    student = pruned_copy(dense, plan)
    emb = student.model.embed_tokens.weight.detach().clone()
    before = heldout_kl(student, dense, ids[12:])
    rep = distill(student, dense, ids[:12], ids[12:], seconds=120, lr=1e-3, max_steps=30)
    assert rep["kept"] and rep["steps"] == 30 and rep["heldout_kl_before"] == pytest.approx(before)
    assert rep["heldout_kl_after"] < 0.9 * before
    assert heldout_kl(student, dense, ids[12:]) == pytest.approx(rep["heldout_kl_after"])
    assert torch.equal(student.model.embed_tokens.weight, emb)  # the tied embedding / head is frozen
    assert all(not p.requires_grad or p.grad is None for p in student.parameters())


def test_distillation_that_hurts_is_undone(setup):
    dense, ids, plan = setup
    student = pruned_copy(dense, plan)
    saved = {k: v.clone() for k, v in student.state_dict().items()}
    rep = distill(student, dense, ids[:12], ids[12:], seconds=120, lr=50.0, max_steps=5)  # a step size that diverges
    assert not rep["kept"] and "restored" in rep["note"]
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in saved.items())


@pytest.mark.parametrize("recover,ok", [("kd", True), ("bias+kd", True), ("lstsq+kd", True), ("kd+bias", False), ("lora+kd", False)])
def test_kd_comes_last_once(recover, ok):
    if ok:
        assert parse_recover(recover, "cfsp")[-1] == "kd"
    else:
        with pytest.raises(EdgepruneError, match="lora or kd comes last"):
            parse_recover(recover, "cfsp")


def test_recover_time_needs_kd():
    with pytest.raises(EdgepruneError, match="--recover-time only apply with --recover kd"):
        resolve_options("cfsp", recover="bias", recover_args={"kd_seconds": 60})
    assert resolve_options("cfsp", recover="kd", recover_args={"kd_seconds": 60})["recover_args"]["kd_seconds"] == 60


def test_prune_cli_runs_kd_and_records_it(tiny_dir, tmp_path):
    out = tmp_path / "kd"
    r = run_cli("prune", tiny_dir, "--sparsity", "0.4", "--recover", "bias+kd", "--recover-time", "5s", "--nsamples", "8",
                "--seqlen", "32", "--out", out, env={"EDGEPRUNE_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    report = json.loads((out / "report.json").read_text())
    kd = report["recovery"]["kd"]
    assert kd["steps"] >= 1 and kd["seconds"] < 30 and isinstance(kd["kept"], bool)
    assert json.loads((out / "plan.json").read_text())["method"]["recover_args"]["kd_seconds"] == 5.0
    r = run_cli("prune", tiny_dir, "--sparsity", "0.4", "--recover", "kd", "--recover-time", "soon", "--out", tmp_path / "x")
    assert r.returncode == 2 and "--recover-time" in r.stderr
