"""fit's search scores a dense mix through llama.cpp only while it can still make a finalist (issue #15)."""

from __future__ import annotations

import itertools
import random
from types import SimpleNamespace

import pytest

from edgeprune import search

DTYPES = ["q8_0", "q5_k_m", "q5_0", "q4_k_m", "iq4_nl", "q4_0"]
MENU = search.mixes(DTYPES, "gguf")


def test_dominance_is_only_what_the_recorded_runs_support():
    assert search.dominates(("q8_0", None), ("q4_0", "q5_0"), "gguf")
    assert search.dominates(("q8_0", "q5_0"), ("q4_k_m", "q5_0"), "gguf")
    assert search.dominates(("q4_k_m", None), ("q4_k_m", "q5_0"), "gguf")
    # a Q5_0 output is fewer bits than llama.cpp's own Q6_K/Q8_0 output rule
    assert not search.dominates(("q8_0", "q5_0"), ("q4_k_m", None), "gguf")
    # nothing between 4- and 6-bit types: Gemma 3's Q4_K_M source requantizes best as q4_k_m
    assert not search.dominates(("q5_k_m", None), ("q4_k_m", None), "gguf")
    assert not search.dominates(("q8_0", None), ("q8_0", None), "gguf")
    assert not search.dominates(("f16", None), ("q4_0", None), "gguf")
    assert not search.dominates(("int8", None), ("fp32", None), "onnx")


def _candidates(structure: dict, dense_ok: set, pruned_ok: dict) -> list[search.Candidate]:
    """Dense candidates (feasible in the mixes of `dense_ok`) and pruned ones: `structure` {sparsity:
    structure KL}, feasible in mix m from sparsity pruned_ok[m] up."""
    out = []
    for m in MENU:
        out.append(search.Candidate(0.0, 0, m[0], None, None, SimpleNamespace(ok=m in dense_ok), m[1], kl_structure=0.0))
        for p, kl in structure.items():
            out.append(search.Candidate(p, 0, m[0], object(), None, SimpleNamespace(ok=p >= pruned_ok.get(m, 9)), m[1], kl_structure=kl))
    return out


def _finalists(cands, quant):
    for c in cands:
        c.kl_quant = quant.get((c.dtype, c.head))
    return [search.best(cands, DTYPES, dense=d) for d in (False, True)]


def test_loose_targets_score_one_mix():
    # every mix meets the targets at every size (scale.py's 1B fit): q8_0 keeps every tensor in the
    # most bits, so once it is scored no other mix can beat it
    quant = {m: 0.01 * (i + 1) for i, m in enumerate(MENU)}
    cands = _candidates({0.05: 0.02, 0.2: 0.1}, set(MENU), {m: 0.05 for m in MENU})
    calls = []
    got, skipped = search.score_mixes(cands, lambda m: calls.append(m) or quant[m], "gguf", MENU)
    assert calls == [("q8_0", None)] and got == {("q8_0", None): 0.01}
    assert len(skipped) == len(MENU) - 1 and "q8_0 keeps every tensor in as many bits" in skipped["q4_0"]


@pytest.mark.parametrize("seed", range(40))
def test_lazy_scoring_finds_the_exhaustive_finalists(seed):
    # random structure KLs and quantization KLs that respect the dominance the search assumes
    rng = random.Random(seed)
    base = {d: rng.uniform(0.001, 0.3) for d in DTYPES}
    base["q8_0"] = min(base.values()) * rng.uniform(0.3, 1.0)
    quant = {}
    for d in DTYPES:
        quant[(d, None)] = base[d]
        quant[(d, "q5_0")] = base[d] + rng.uniform(0.0, 0.05)
    quant[("q8_0", "q5_0")] = min(quant[("q8_0", "q5_0")], *(quant[(d, "q5_0")] for d in DTYPES))
    structure = dict(zip((0.05, 0.1, 0.2, 0.3, 0.4, 0.5), itertools.accumulate(rng.uniform(0.0, 0.2) for _ in range(6))))
    # lower-bit mixes meet the targets with less pruning; some dense mixes meet them outright
    pruned_ok = {m: rng.choice([0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 9]) for m in MENU}
    dense_ok = {m for m in MENU if rng.random() < 0.3}
    cands = _candidates(structure, dense_ok, pruned_ok)
    want = _finalists(cands, quant)
    calls = []
    got, skipped = search.score_mixes(cands, lambda m: calls.append(m) or quant[m], "gguf", MENU)
    assert len(calls) == len(set(calls)) == len(got)
    assert [c and c.label for c in _finalists(cands, got)] == [c and c.label for c in want]
    assert set(got) | {m for m in MENU if search.mix_label(*m) in skipped} == {(c.dtype, c.head) for c in cands if c.check.ok}


def test_kv_groups_join_the_search_under_the_same_budget(tok):
    """--heads: each sparsity also as FFN channels + KV groups from the one parameter budget, where
    that removes a group; such structures are scored like the others (masks on the dense model)."""
    import torch

    from edgeprune.calibrate import calibrate
    from edgeprune.plan import base_description
    from edgeprune.profiles import load_profile
    from edgeprune.testing import tiny_model

    model, _ = tiny_model("llama", tok, layers=4, heads=4, kv_heads=2, ffn=256, seed=1)
    ids = torch.randint(0, len(tok), (8, 32), generator=torch.Generator().manual_seed(0))
    stats = calibrate(model, ids)
    base = base_description(model, "tiny-llama", "x")
    prof = load_profile("ci-cpu")
    menu = [("q8_0", None)]
    plain = search.enumerate_candidates(model, stats, base, prof, menu, prof.targets, 32, sparsities=(0.0, 0.2, 0.4), drops=(0,))
    both = search.enumerate_candidates(model, stats, base, prof, menu, prof.targets, 32, sparsities=(0.0, 0.2, 0.4), drops=(0,),
                                       heads=True)
    assert not any(c.heads for c in plain) and {c.key for c in plain} < {c.key for c in both}
    kv = [c for c in both if c.heads]
    assert kv and all(c.kv_removed >= 1 and "KV groups" in c.label for c in kv)
    ffn_only = {c.sparsity: c for c in both if not c.heads and c.plan is not None}
    for c in kv:  # the same parameter budget as the FFN-only structure at that sparsity (widths round to 32 channels)
        same = ffn_only[c.sparsity].plan.achieved["params_pruned"]
        assert abs(c.plan.achieved["params_pruned"] - same) <= 32 * 3 * 64 * 4
        assert c.to_dict()["kv_groups_removed"] == c.kv_removed and c.to_dict()["heads"]
    for c in both:
        c.check = SimpleNamespace(ok=True)
    keys = search.to_evaluate(both)
    assert {c.key for c in kv} & set(keys) and len(set(keys)) == len(keys)
    held = torch.randint(0, len(tok), (2, 32), generator=torch.Generator().manual_seed(1))
    dense_lp = search.dense_logprobs(model, held)
    kls = search.structure_kls(SimpleNamespace(model=model), keys, dense_lp, held, both)
    assert all(kls[k] > 0 for k in keys if k[0] > 0)
