"""Distillation recovery (`--recover kd`): the dense model teaches the pruned one, kept only when it helps."""

import time

import pytest
import torch

from edgeprune.calibrate import calibrate
from edgeprune.cli import _recover_seconds
from edgeprune.distill import KD_LORA_LR, LORA_TARGETS, LoRALinear, distill, heldout_hidden_mismatch, heldout_kl
from edgeprune.errors import EdgepruneError
from edgeprune.plan import base_description
from edgeprune.prune import make_plan, parse_recover, pruned_copy, resolve_options, with_recovery
from edgeprune.recover import check_recover_args, recover
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


@pytest.fixture(scope="module")
def dropped(setup):
    """The same model, half its FFN and one layer gone: student layer i is not teacher layer i."""
    model, ids, _ = setup
    stats = calibrate(model, ids[:12])
    plan = make_plan(model, stats, base_description(model, "tiny", "f" * 64), 0.5, method="uniform", align=8, recover="none",
                     drop_layers=1)
    layer_map = [lp.index for lp in plan.layers]
    assert len(layer_map) == 3 and layer_map != [0, 1, 2]
    return stats, plan, layer_map


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


@pytest.mark.parametrize("mode", ["full", "hidden", "lora"])
def test_distillation_that_hurts_is_undone(setup, dropped, mode):
    dense, ids, _ = setup
    _, plan, layer_map = dropped
    student = pruned_copy(dense, plan)
    saved = {k: v.clone() for k, v in student.state_dict().items()}
    extra = {"full": {}, "hidden": {"hidden": 1.0, "layer_map": layer_map}, "lora": {"lora_rank": 4}}[mode]
    rep = distill(student, dense, ids[:12], ids[12:], seconds=120, lr=50.0, max_steps=5, **extra)  # a step size that diverges
    assert not rep["kept"] and "restored" in rep["note"] and rep["heldout_kl_after"] > rep["heldout_kl_before"]
    assert student.state_dict().keys() == saved.keys()
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in saved.items())
    assert not any(isinstance(m, LoRALinear) for m in student.modules())


def test_hidden_matching_lowers_the_hidden_mismatch_of_the_mapped_layers(setup, dropped):
    dense, ids, _ = setup
    _, plan, layer_map = dropped
    runs = {}
    for weight in (0.0, 1.0):
        student = pruned_copy(dense, plan)
        before = heldout_hidden_mismatch(student, dense, ids[12:], layer_map)
        rep = distill(student, dense, ids[:12], ids[12:], seconds=120, lr=1e-3, max_steps=30, hidden=weight, layer_map=layer_map)
        assert rep["kept"] and rep["heldout_kl_after"] < 0.5 * rep["heldout_kl_before"]
        runs[weight] = heldout_hidden_mismatch(student, dense, ids[12:], layer_map)
    assert 0 < before
    # the same 30 steps with the hidden term end much closer to the teacher's hidden states of the
    # same original layers than logit KL alone does
    assert runs[1.0] < 0.75 * before and runs[1.0] < 0.75 * runs[0.0]
    assert rep["layer_map"] == layer_map and rep["heldout_hidden_before"] == pytest.approx(before)
    assert rep["heldout_hidden_after"] == pytest.approx(runs[1.0])


def test_hidden_matching_needs_the_layer_map_when_layers_were_dropped(setup, dropped):
    dense, ids, _ = setup
    student = pruned_copy(dense, dropped[1])
    with pytest.raises(EdgepruneError, match="layer_map"):
        distill(student, dense, ids[:12], ids[12:], seconds=10, max_steps=1, hidden=1.0)
    with pytest.raises(EdgepruneError, match="layer_map must give"):
        distill(student, dense, ids[:12], ids[12:], seconds=10, max_steps=1, hidden=1.0, layer_map=[0, 1, 9])


def _linears(model):
    return {f"{i}.{name}": getattr(parent, name) for i, layer in enumerate(model.model.layers)
            for parent in (layer.self_attn, layer.mlp) for name in LORA_TARGETS if hasattr(parent, name)}


def test_lora_distillation_trains_only_adapters_and_merges_them(setup):
    dense, ids, plan = setup
    student = pruned_copy(dense, plan)
    saved = {k: v.clone() for k, v in student.state_dict().items()}
    rank = 4
    rep = distill(student, dense, ids[:12], ids[12:], seconds=120, lr=1e-2, max_steps=30, lora_rank=rank)
    assert rep["kept"] and rep["heldout_kl_after"] < 0.5 * rep["heldout_kl_before"] and rep["trainable"] == "LoRA rank 4"
    assert heldout_kl(student, dense, ids[12:]) == pytest.approx(rep["heldout_kl_after"], rel=1e-3)  # merged = trained
    # a plain model of the same shapes again: no adapter module, the same state-dict keys and shapes
    assert not any(isinstance(m, LoRALinear) for m in student.modules())
    state = student.state_dict()
    assert state.keys() == saved.keys() and all(state[k].shape == v.shape for k, v in saved.items())
    lins = _linears(student)
    assert all(type(lin) is torch.nn.Linear for lin in lins.values())
    assert rep["trainable_params"] == sum(rank * (lin.in_features + lin.out_features) for lin in lins.values())
    moved = 0
    for k, v in saved.items():
        if k.endswith("_proj.weight"):  # only the linear weights moved, each by at most rank-4 (B·A)
            delta = (state[k] - v).double()
            assert torch.linalg.matrix_rank(delta, atol=1e-6 * float(delta.abs().max()) + 1e-12) <= rank, k
            moved += bool(delta.abs().max() > 0)
        else:  # norms, biases, the embedding: frozen
            assert torch.equal(state[k], v), k
    assert moved == len(lins)


def test_checkpoints_fire_on_the_training_clock_and_their_time_is_excluded(setup):
    dense, ids, plan = setup
    student = pruned_copy(dense, plan)
    w0 = student.model.layers[0].mlp.down_proj.weight.detach().clone()
    seen = []

    def on_checkpoint(elapsed, steps, model):
        assert model is student and not torch.is_grad_enabled()
        seen.append((elapsed, steps, model.model.layers[0].mlp.down_proj.weight.detach().clone()))
        time.sleep(1.0)  # slower than the whole time box would allow, were it counted

    rep = distill(student, dense, ids[:12], ids[12:], seconds=1.5, lr=1e-3, checkpoints=[1.0, 0.3, 60.0], on_checkpoint=on_checkpoint)
    assert len(seen) == 2  # in time order; 60 s lies past the time box: never reached
    # each fires after the first step that ends past it (on a loaded CPU one step may pass both)
    assert seen[0][0] >= 0.3 and seen[1][0] >= 1.0 and 1 <= seen[0][1] <= seen[1][1] <= rep["steps"]
    assert [c["at"] for c in rep["checkpoints"]] == [0.3, 1.0] and [c["steps"] for c in rep["checkpoints"]] == [seen[0][1], seen[1][1]]
    # training went on to 1.5 s of its own clock after 2 s asleep in the callbacks: counted, they
    # would have ended the 1.5 s time box at the first checkpoint
    assert rep["checkpoint_seconds"] >= 2.0 and rep["training_seconds"] >= 1.5 and rep["seconds"] >= rep["training_seconds"] + 2.0
    assert not torch.equal(seen[0][2], w0)  # the callback sees the student as it trains
    with pytest.raises(EdgepruneError, match="on_checkpoint"):
        distill(student, dense, ids[:12], ids[12:], seconds=1, checkpoints=[0.5])


def test_progress_shows_steps_and_loss_to_a_callback_that_takes_them(setup):
    dense, ids, plan = setup
    plain, detailed = [], []
    distill(pruned_copy(dense, plan), dense, ids[:12], ids[12:], seconds=60, max_steps=3, progress=lambda *a: plain.append(a))
    distill(pruned_copy(dense, plan), dense, ids[:12], ids[12:], seconds=60, max_steps=3,
            progress=lambda label, done, total, detail=None: detailed.append((label, done, total, detail)))
    assert len(plain) == 3 and all(a[0] == "distillation" and len(a) == 3 and a[2] == 60 for a in plain)
    assert [d[3].split(",")[0] for d in detailed] == ["step 1", "step 2", "step 3"] and all("loss " in d[3] for d in detailed)
    assert {d[0] for d in detailed} == {"distillation"}  # one bar: ui.progress keys its bars by label


def test_recover_passes_the_plans_layer_indices_and_kd_args(setup, dropped):
    dense, ids, _ = setup
    stats, plan, layer_map = dropped
    plan = with_recovery(plan, "kd", {"kd_seconds": 2, "kd_hidden": 0.5, "kd_lora_rank": 2})
    assert plan.method["recover_args"]["kd_lr"] == KD_LORA_LR  # adapters get IG-LoRA's step size unless told otherwise
    student = pruned_copy(dense, plan)
    rep = recover(student, dense, plan, stats, ids)["kd"]
    assert rep["layer_map"] == layer_map and rep["hidden_weight"] == 0.5 and rep["trainable"] == "LoRA rank 2" and rep["steps"] >= 1
    assert not any(isinstance(m, LoRALinear) for m in student.modules())


def test_kd_args_defaults_and_one_line_errors():
    args = check_recover_args(["kd"], {})
    assert args["kd_hidden"] == 0.0 and args["kd_lora_rank"] == 0 and args["kd_lr"] == 5e-5
    assert check_recover_args(["kd"], {"kd_lora_rank": 8, "kd_lr": 1e-3})["kd_lr"] == 1e-3
    for bad, msg in (({"kd_hidden": -0.1}, "kd_hidden must be a number >= 0"), ({"kd_hidden": "lots"}, "kd_hidden must be"),
                     ({"kd_hidden": float("nan")}, "kd_hidden must be"), ({"kd_lora_rank": -1}, "kd_lora_rank must be an integer >= 0"),
                     ({"kd_lora_rank": 2.5}, "kd_lora_rank must be"), ({"kd_lora_rank": True}, "kd_lora_rank must be"),
                     ({"kd_lr": 0}, "kd_lr must be a positive number"), ({"kd_batch": 0}, "kd_batch must be")):
        with pytest.raises(EdgepruneError, match=msg) as exc:
            check_recover_args(["kd"], bad)
        assert "\n" not in str(exc.value)
    with pytest.raises(EdgepruneError, match="--kd-hidden only apply with --recover kd"):
        resolve_options("cfsp", recover="bias", recover_args={"kd_hidden": 1.0})


@pytest.mark.parametrize("text,seconds", [("5m", 300.0), ("5min", 300.0), ("90s", 90.0), ("300", 300.0), ("2.5 min", 150.0), ("1h", 3600.0)])
def test_recover_time_forms(text, seconds):
    assert _recover_seconds(text) == seconds


@pytest.mark.parametrize("text", ["soon", "0", "-3", "5ms", "5 parsecs", ""])
def test_recover_time_refuses_what_is_not_a_duration(text):
    with pytest.raises(EdgepruneError, match="--recover-time takes a positive duration like 5m"):
        _recover_seconds(text)


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
    r = run_cli("prune", tiny_dir, "--sparsity", "0.4", "--recover", "bias+kd", "--recover-time", "0.1m", "--nsamples", "8",
                "--seqlen", "32", "--out", out, env={"EDGEPRUNE_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    report = json.loads((out / "report.json").read_text())
    kd = report["recovery"]["kd"]
    assert kd["steps"] >= 1 and kd["seconds"] < 30 and isinstance(kd["kept"], bool)
    assert json.loads((out / "plan.json").read_text())["method"]["recover_args"]["kd_seconds"] == 6.0
    r = run_cli("prune", tiny_dir, "--sparsity", "0.4", "--recover", "kd", "--recover-time", "soon", "--out", tmp_path / "x")
    assert r.returncode == 2 and "--recover-time" in r.stderr
