"""`prune --offload`: blocks visit an accelerator one at a time while the model stays on the CPU.

No accelerator is needed here: the moves are checked on torch's meta device (tensors without data),
the schedule by recording each visit, and the numbers by running the same passes with the blocks'
device given (a no-op move on the CPU) and not given."""

import contextlib

import pytest
import torch

from edgeprune import calibrate as calibrate_module
from edgeprune import offload
from edgeprune import recover as recover_module
from edgeprune.apply import pruning_in_place
from edgeprune.calibrate import calibrate
from edgeprune.errors import EdgepruneError
from edgeprune.plan import base_description
from edgeprune.prune import make_plan
from edgeprune.recover import recover
from edgeprune.testing import tiny_model
from tests.conftest import run_cli


def test_a_visit_sets_the_tensors_aside_and_puts_the_same_ones_back():
    block = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16))
    block.register_buffer("table", torch.arange(4.0))
    before = {n: t.data_ptr() for n, t in [*block.named_parameters(), *block.named_buffers()]}
    with offload.visiting(block, "meta") as b:
        assert all(t.device.type == "meta" for t in [*b.parameters(), *b.buffers()])
        assert b(torch.zeros(2, 8, device="meta")).device.type == "meta"  # it runs there
    after = {n: t.data_ptr() for n, t in [*block.named_parameters(), *block.named_buffers()]}
    assert after == before  # the very same storage: nothing was copied back (memory-mapped weights stay mapped)
    assert all(t.device.type == "cpu" for t in block.parameters())
    with offload.visiting(block, "cpu") as b, offload.visiting(None, "meta"):  # already there; no block
        assert b is block and {n: t.data_ptr() for n, t in block.named_parameters()} == {n: before[n] for n, _ in block.named_parameters()}


def test_a_kept_visit_brings_back_what_the_block_became():
    block = torch.nn.Linear(4, 3, bias=False)
    with offload.visiting(block, "cpu", keep=True):
        block.bias = torch.nn.Parameter(torch.ones(3))  # e.g. the bias lstsq fits
    assert block.bias.device.type == "cpu"
    ctx = {"position_ids": torch.arange(3)[None], "position_embeddings": (torch.ones(1, 3, 2), torch.zeros(1, 3, 2)),
           "masks": {"sliding_attention": torch.ones(1, 1, 3, 3, dtype=torch.bool), "full_attention": None}}
    moved = offload.to_device(ctx, "meta")
    assert moved["position_embeddings"][1].device.type == "meta" and isinstance(moved["position_embeddings"], tuple)
    assert moved["masks"]["sliding_attention"].device.type == "meta" and moved["masks"]["full_attention"] is None
    assert offload.to_device(ctx, None) is ctx


@contextlib.contextmanager
def _recorded(log):
    real = offload.visiting

    @contextlib.contextmanager
    def visiting(module, device, keep=False):
        log.append(("in", id(module), keep))
        with real(module, device, keep) as m:
            yield m
        log.append(("out", id(module), keep))

    yield visiting


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_calibration_and_lstsq_visit_one_block_at_a_time_and_agree(family, tok, monkeypatch):
    model, _ = tiny_model(family, tok, layers=4, ffn=256, seed=1)
    ids = torch.randint(0, len(tok), (12, 32), generator=torch.Generator().manual_seed(0))
    plain = calibrate(model, ids, imatrix=True)
    log = []
    with _recorded(log) as visiting:
        monkeypatch.setattr(calibrate_module, "visiting", visiting)
        monkeypatch.setattr(recover_module, "visiting", visiting)
        streamed = calibrate(model, ids, imatrix=True, block_device="cpu")
        layers = [id(layer) for layer in model.model.layers]
        # every block goes in and comes out before the next goes in; the final norm (the imatrix of the head) last
        assert log == [e for i in layers for e in (("in", i, False), ("out", i, False))] + \
            [("in", id(model.model.norm), False), ("out", id(model.model.norm), False)]
        for a, b in zip(plain.blocks, streamed.blocks):
            assert a.angular == b.angular and torch.equal(a.ffn.sumsq, b.ffn.sumsq)
        assert all((plain.imatrix[k] == streamed.imatrix[k]).all() for k in plain.imatrix)

        base = base_description(model, f"tiny-{family}", "x")
        plan = make_plan(model, plain, base, 0.5, recover="lstsq", shapes="per-layer")
        ref_model, ref_dense = _pruned_pair(model, plan)
        reference = recover_module.recover(ref_model, ref_dense, plan, plain, ids)["lstsq"]
        log.clear()
        rep = recover(model, None, plan, plain, ids, blocks=pruning_in_place(model, plan), block_device="cpu")["lstsq"]
    # lstsq: a dense block copy and its pruned block visit together, the pruned one kept as refit
    pairs = [(log[i], log[i + 1], log[i + 2], log[i + 3]) for i in range(0, len(log), 4)]
    assert len(pairs) == 4 and all(a[0] == "in" and not a[2] and b[0] == "in" and b[2] and c[0] == "out" and d[0] == "out"
                                   for a, b, c, d in pairs)
    assert [c["ridge"] for b in rep["blocks"] for c in b["consumers"].values()] == \
        [c["ridge"] for b in reference["blocks"] for c in b["consumers"].values()]
    want = ref_model.state_dict()
    for name, t in model.state_dict().items():  # the same refit model as without a block device
        torch.testing.assert_close(t, want[name], rtol=1e-5, atol=1e-6)


def _pruned_pair(model, plan):
    import copy

    from edgeprune.prune import pruned_copy

    dense = copy.deepcopy(model)
    return pruned_copy(dense, plan), dense


def test_offload_needs_an_accelerator(tiny_dir, tmp_path):
    r = run_cli("prune", tiny_dir, "--offload", "--device", "cpu", "--calib", "self", "--out", tmp_path / "o")
    assert r.returncode == 2 and "--offload runs each block on an accelerator" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_offload_refuses_whole_model_work(monkeypatch):
    from edgeprune import cli, models

    monkeypatch.setattr(models, "check_device", lambda device: "cuda")
    assert cli._check_offload(True, "cuda", {"recover": "lstsq"}, None) == "cuda"
    assert cli._check_offload(False, "cuda", {"recover": "lstsq+kd"}, "sensitivity") is None
    with pytest.raises(EdgepruneError, match="trains the whole model"):
        cli._check_offload(True, "cuda", {"recover": "lstsq+kd"}, None)
    with pytest.raises(EdgepruneError, match="sensitivity"):
        cli._check_offload(True, "cuda", {"recover": "lstsq", "allocation": "sensitivity"}, None)
