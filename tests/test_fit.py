"""`edgeprune fit` and `edgeprune check` end to end on a tiny model (real llama.cpp, real search)."""

import dataclasses
import json

import pytest

from edgeprune import latency
from edgeprune.errors import EdgepruneError
from edgeprune.fit import FIT_BUDGET_S, FIT_RESERVE_S, KD_MIN_S, check_recover_time, fit_reserve_s, kd_time_box
from edgeprune.profiles import load_profile, write_profile
from tests.conftest import run_cli

import llama_cpp  # noqa: F401  (a hard dependency: a broken install fails, never skips)


def _profile_with(tmp_path, name, **targets):
    base = load_profile("ci-cpu")
    prof = dataclasses.replace(base, name=name, targets=dataclasses.replace(base.targets, **targets))
    path = tmp_path / f"{name}.toml"
    write_profile(prof, path)
    return path


@pytest.fixture(scope="module")
def tiny_dense_speed(tiny_dir):
    from edgeprune.models import load_model

    lm = load_model(str(tiny_dir))
    prof = load_profile("ci-cpu")
    # the fastest dense q8_0 mix fit tries (output projection in Q5_0): beating it needs pruning
    return latency.predict_for_profile(latency.ModelGeometry.from_model(lm.model), prof, "q8_0", head_dtype="q5_0",
                                       imatrix=True).decode_tok_s


def test_fit_prunes_until_the_target_holds(tiny_dir, tiny_dense_speed, tmp_path):
    # a decode target 3% above what the dense model is predicted to reach: it must prune
    prof = _profile_with(tmp_path, "tight", decode_tok_s_min=tiny_dense_speed * 1.03, ttft_max_s=None, memory_max=None)
    out = tmp_path / "fit"
    # kd is on by default; --recover-time forces a short time box (auto would fill fit's 10 minutes)
    r = run_cli("fit", "--profile", prof, "--model", tiny_dir, "--out", out, "--formats", "gguf", "--dtype", "q8_0",
                "--nsamples", "4", "--seqlen", "32", "--recover-time", "4s", env={"EDGEPRUNE_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["dense"]["q8_0"]["targets"]["ok"] is False and report["dense"]["q8_0-output-q5_0"]["targets"]["ok"] is False
    chosen = report["result"]["chosen"]
    assert chosen["targets"]["ok"] and (chosen["sparsity"] > 0 or chosen["drop_layers"] > 0)
    assert chosen["prediction"]["decode_tok_s"] >= tiny_dense_speed * 1.03
    art = report["result"]["artifacts"]["gguf"]
    assert art["path"] == str(out / f"model.{chosen['mix']}.gguf") and (out / f"model.{chosen['mix']}.gguf").is_file()
    assert art["bench"]["decode_tok_s"]["median"] > 0
    # made by llama.cpp's quantizer with edgeprune's importance matrix, also written for llama-quantize
    assert (out / "imatrix.gguf").is_file() and report["result"]["imatrix"]["tokens"] == 4 * 32
    assert set(art["export"]["type_counts"]) <= {"q8_0", "q5_0", "f32", "f16"}
    # what ships is scored through llama.cpp beside the dense baselines, with greedy answers
    q = report["quality"]["artifacts"]
    assert {"dense q8_0 (llama.cpp default)", "dense q4_0 (llama.cpp default)"} <= set(q)
    shipped_row = q[f"shipped: {chosen['label']}"]
    assert shipped_row["excerpt"]["ppl"] > 1 and 0 <= shipped_row["excerpt"]["top1_vs_dense"] <= 1
    assert len(shipped_row["answers"]) == 20 and shipped_row["factual_prompts"] == 17
    # no dense mix meets this target, so the best pruned candidate is the one finalist scored through llama.cpp
    assert [f["label"] for f in report["finalists"]] == [chosen["label"]] and report["finalists"][0]["held_out_kl"] > 0
    # the shipped GGUF is that finalist exported again: its scores are the finalist's, not run twice
    assert shipped_row["held_out_self"]["kl_vs_dense"] == report["finalists"][0]["held_out_kl"]
    assert shipped_row["excerpt"] == report["finalists"][0]["excerpt"] | {"ppl_ratio_vs_dense_torch": report["finalists"][0]["ppl_ratio_vs_dense_torch"]}
    scored = report["search"]["quantization"]
    assert scored["scored"] and set(scored["scored"]).isdisjoint(scored["not_scored"]) and scored["seconds_per_mix"] > 0
    assert art["export"]["verification"]["top1_agreement"] > 0.5
    # measured with the thread count the host profile's prediction assumes (ci-cpu: 1)
    assert art["bench"]["threads"] == load_profile("ci-cpu").hardware.threads
    assert art["host_prediction"]["profile"] == "ci-cpu" and art["host_prediction"]["decode_tok_s"] > 0
    for name in ("report.md", "frontier.png", "model/widths.png", "model/plan.json"):
        assert (out / name).is_file(), name
    md = (out / "report.md").read_text()
    assert "Chosen" in md and "Quality of what ships, through the runtime" in md
    rec = report["recovery"]  # held-out KL decides which recovery (if any) is kept
    closed = min(("none", "lstsq", "bias"), key=rec["tried"].get)  # distillation runs on top of the best closed form
    kd_name = "kd" if closed == "none" else f"{closed}+kd"
    assert set(rec["tried"]) == {"none", "lstsq", "bias", kd_name} and rec["kept"] == min(rec["tried"], key=rec["tried"].get)
    kd = report["distillation"]
    assert kd["time_box"]["memory"]["ok"] and kd["time_box"]["memory"]["needed_bytes"] > 0
    assert {k: v for k, v in kd["time_box"].items() if k != "memory"} == {"mode": "forced", "seconds": 4.0, "why": rec["distillation"]}
    assert "--recover-time 4s" in rec["distillation"]
    assert kd["steps"] >= 1 and isinstance(kd["kept"], bool)
    plan = json.loads((out / "model" / "plan.json").read_text())
    assert plan["method"].get("recover", "none") == rec["kept"]
    # peak memory by phase, for sizing a fit of a bigger model: never falling, anonymous within RSS
    mem = report["memory"]
    assert list(mem)[:3] == ["load", "calibration", "enumerate"] and "finalists" in mem and "bench" in mem
    peaks = [m["peak_rss_bytes"] for m in mem.values()]
    assert peaks == sorted(peaks) and peaks[0] > 0
    assert all(0 < m["anon_rss_bytes"] <= m["rss_bytes"] <= m["peak_rss_bytes"] for m in mem.values())


def test_fit_impossible_target_exits_3(tiny_dir, tmp_path):
    prof = _profile_with(tmp_path, "impossible", decode_tok_s_min=1e9, ttft_max_s=None, memory_max=None)
    out = tmp_path / "fit"
    r = run_cli("fit", "--profile", prof, "--model", tiny_dir, "--out", out, "--formats", "gguf",
                "--nsamples", "4", "--seqlen", "32", env={"EDGEPRUNE_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 3, r.stderr[-2000:]
    assert "decode_tok_s" in r.stderr and "Closest" in r.stderr and "Traceback" not in r.stderr
    assert json.loads((out / "report.json").read_text())["result"]["ok"] is False
    assert not (out / "model").exists()


def test_fit_quality_floor_exits_3_naming_it(tiny_dir, tiny_dense_speed, tmp_path):
    prof = _profile_with(tmp_path, "tight", decode_tok_s_min=tiny_dense_speed * 1.03, ttft_max_s=None, memory_max=None)
    out = tmp_path / "fit"
    r = run_cli("fit", "--profile", prof, "--model", tiny_dir, "--out", out, "--formats", "gguf", "--dtype", "q8_0",
                "--nsamples", "4", "--seqlen", "32", "--max-quality-loss", "kl:0.0000001", "--recover-time", "2s",
                env={"EDGEPRUNE_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 3, r.stderr[-2000:]
    assert "--max-quality-loss kl:0.0000001" in r.stderr and "Traceback" not in r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["result"]["ok"] is False and all(not f["within_floor"] for f in report["finalists"])
    r = run_cli("fit", "--profile", prof, "--model", tiny_dir, "--out", tmp_path / "y", "--max-quality-loss", "0.9x")
    assert r.returncode == 2 and "--max-quality-loss takes" in r.stderr


def test_fit_bad_inputs(tiny_dir, tmp_path):
    r = run_cli("fit", "--profile", "no-such-board", "--model", tiny_dir, "--out", tmp_path / "x")
    assert r.returncode == 2 and "unknown profile" in r.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\nschema = 1\n[targets]\ndecode_tok_s_min = -3\n')
    r = run_cli("fit", "--profile", bad, "--model", tiny_dir, "--out", tmp_path / "x")
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("fit", "--profile", "ci-cpu", "--model", tiny_dir, "--out", tmp_path / "x", "--max-memory", "lots")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    # --recover-time is kd's time box: refused without kd, or when it is not a duration
    for args, msg in ((["--recover", "lstsq,bias", "--recover-time", "3min"], "add kd to --recover"),
                      (["--recover-time", "soon"], "--recover-time takes a positive duration")):
        r = run_cli("fit", "--profile", "ci-cpu", "--model", tiny_dir, "--out", tmp_path / "z", *args)
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "z").exists()
    # a bad host profile fails before any work, and nothing is written
    r = run_cli("fit", "--profile", "ci-cpu", "--model", tiny_dir, "--out", tmp_path / "y", "--host-profile", tmp_path / "nope.toml")
    assert r.returncode == 2 and "Traceback" not in r.stderr and not (tmp_path / "y").exists()


def test_check_gate_exit_codes(tiny_dir, tmp_path):
    from edgeprune.exporters.gguf import export_gguf
    from edgeprune.models import load_model

    lm = load_model(str(tiny_dir))
    art = tmp_path / "tiny.q8_0.gguf"
    export_gguf(lm.model, lm.tokenizer, art, dtype="q8_0")
    ok = run_cli("check", art, "--max-ms-per-token", "10000", "--repeats", "1", "--json")
    assert ok.returncode == 0, ok.stderr
    rec = json.loads(ok.stdout)
    assert rec["ok"] and rec["gates"][0]["gate"] == "max_ms_per_token"
    slow = run_cli("check", art, "--max-ms-per-token", "0.00001", "--repeats", "1")
    assert slow.returncode == 1 and "FAIL" in slow.stdout
    same = run_cli("check", art, "--baseline", art, "--min-speedup", "100", "--repeats", "1", "--json")
    assert same.returncode == 1 and json.loads(same.stdout)["decode_speedup"] > 0
    for args, msg in ((["--min-speedup", "1.3"], "needs --baseline"), (["--max-ms-per-token", "-1"], "must be a positive")):
        r = run_cli("check", art, *args)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr
    r = run_cli("check", tmp_path / "missing.gguf")
    assert r.returncode == 2 and "no such file" in r.stderr


# ----------------------------------------------------------- kd's time box within fit's 10 minutes
def test_auto_time_box_grants_what_is_left_of_the_budget():
    box = kd_time_box(elapsed_s=280.0, reserve_s=150.0)
    assert FIT_BUDGET_S == 600 and box["mode"] == "auto" and box["seconds"] == pytest.approx(170.0)
    assert box["left_s"] == pytest.approx(170.0) and box["elapsed_s"] == 280.0 and box["reserve_s"] == 150.0
    assert "170 s" in box["why"] and "10-minute budget" in box["why"]
    # just at the minimum it still distills; just under, it skips and says how to force it
    assert kd_time_box(600.0 - 150.0 - KD_MIN_S, 150.0)["seconds"] == pytest.approx(KD_MIN_S)
    skip = kd_time_box(428.0, 150.0)
    assert skip["seconds"] is None and skip["left_s"] == pytest.approx(22.0)
    assert skip["why"].startswith("distillation skipped: 22 s left of fit's 10-minute budget")
    assert "pass --recover-time 3min to distill anyway" in skip["why"] and "\n" not in skip["why"]
    over = kd_time_box(700.0, 150.0)  # already past the budget: nothing negative is granted or printed
    assert over["seconds"] is None and over["why"].startswith("distillation skipped: 0 s left")


def test_forced_time_box_ignores_the_budget():
    box = kd_time_box(elapsed_s=590.0, reserve_s=150.0, forced_s=180.0)
    assert box["mode"] == "forced" and box["seconds"] == 180.0 and "--recover-time 180s" in box["why"]


def test_reserve_scales_with_the_measured_cost_of_one_dense_mix():
    assert fit_reserve_s(2.0) == FIT_RESERVE_S  # a fast model: the constant floor
    assert fit_reserve_s(25.0) == pytest.approx(450.0)  # a slow one: 18 times the same kind of work, measured
    assert fit_reserve_s(2.0, rebuild_s=140.0) == pytest.approx(FIT_RESERVE_S + 140.0)  # lstsq re-run (and rebuilt)
    # a slow model on a slow host leaves distillation no time at all
    assert kd_time_box(elapsed_s=250.0, reserve_s=fit_reserve_s(25.0))["seconds"] is None


def test_recover_time_needs_kd_in_fits_list():
    assert check_recover_time(["lstsq", "bias", "kd"], None) is None and check_recover_time(["kd"], "auto") is None
    assert check_recover_time(["bias", "kd"], 90.0) == 90.0
    assert check_recover_time(["bias"], None) is None  # auto without kd: nothing to time
    with pytest.raises(EdgepruneError, match="add kd to --recover"):
        check_recover_time(["lstsq", "bias"], 180.0)
    with pytest.raises(EdgepruneError, match="--recover-time must be between 0 and 24 hours"):
        check_recover_time(["kd"], 90_000.0)


def test_distillation_is_skipped_when_its_training_state_does_not_fit_memory():
    """A 1B-class student: ~0.7B trained weights need ~8 GiB of gradients and AdamW state."""
    from types import SimpleNamespace

    from edgeprune.fit import kd_memory_check

    plan = SimpleNamespace(achieved={"params_pruned": 960_000_000, "params_embedding": 262_000_000})
    small = kd_memory_check(plan, vocab=128256, tokens_per_step=512, available_bytes=6 * 2**30)
    assert not small["ok"] and small["why"].startswith("distillation skipped: training 698M decoder weights")
    assert small["needed_bytes"] == 12 * 698_000_000 + 16 * 128256 * 512
    assert kd_memory_check(plan, 128256, 512, 40 * 2**30)["ok"]


def test_fit_lets_the_dense_model_go_while_it_builds_finalists(tiny_dir, tiny_dense_speed, tmp_path, monkeypatch):
    """Each finalist is built from a reload pruned in place; the dense model loaded first must be
    gone by then, or a 1B fit holds it beside the finalist (issue #15)."""
    import gc
    import weakref

    from edgeprune import fit

    prof = _profile_with(tmp_path, "tight", decode_tok_s_min=tiny_dense_speed * 1.03, ttft_max_s=None, memory_max=None)
    first, alive, at_quality = [], [], []
    real_load, real_reload, real_quality_table = fit.load_model, fit.reload, fit._quality_table

    def load(*args, **kwargs):
        lm = real_load(*args, **kwargs)
        first.extend(weakref.ref(t) for t in [lm.model, *lm.model.parameters()])  # the weights too: a module may outlive its model
        return lm

    def reload(lm, *args, **kwargs):
        gc.collect()
        alive.append(sum(r() is not None for r in first))
        return real_reload(lm, *args, **kwargs)

    from transformers import PreTrainedModel

    def models_alive():
        import warnings

        gc.collect()
        with warnings.catch_warnings():  # isinstance on every live object wakes torch's deprecated aliases
            warnings.simplefilter("ignore", FutureWarning)
            return [o for o in gc.get_objects() if isinstance(o, PreTrainedModel)]

    before = weakref.WeakSet(models_alive())  # other tests' models (session fixtures) are not fit's

    def quality_table(*args, **kwargs):  # runs GGUFs only: no torch model of fit's may be left by then
        at_quality.append(sum(m not in before for m in models_alive()))
        return real_quality_table(*args, **kwargs)

    monkeypatch.setattr(fit, "load_model", load)
    monkeypatch.setattr(fit, "reload", reload)
    monkeypatch.setattr(fit, "_quality_table", quality_table)
    monkeypatch.setenv("EDGEPRUNE_CACHE", str(tmp_path / "cache"))
    report, code = fit.run_fit(str(tiny_dir), str(prof), tmp_path / "fit", formats=("gguf",), dtype="q8_0", nsamples=4, seqlen=32,
                               recover="lstsq,bias,kd", recover_seconds=2, log=lambda *a: None, prompts=False, bench_rounds=1,
                               bench_repeats=1)
    assert code == 0 and report["result"]["chosen"]["sparsity"] > 0
    assert any(name.endswith("kd") for name in report["recovery"]["tried"]), report["recovery"]
    assert len(alive) >= 3 and not any(alive)  # one reload per recovery trial, the first dense model never alive
    assert at_quality == [0]  # nor any other model (kd's teacher, the losing trials, the shipped one) by the quality table


def test_a_dense_model_that_ships_is_benchmarked_alone(monkeypatch):
    """A pruned choice is benchmarked alternately with the dense model in its mix (a paired speed-up);
    a dense choice is that dense mix itself, so it is benchmarked once, not against itself."""
    from types import SimpleNamespace

    from edgeprune import fit

    calls = []
    monkeypatch.setattr(fit, "bench_interleaved", lambda paths, *a: calls.append(("paired", tuple(paths))) or ({"x": 1}, {"x": 1}))
    monkeypatch.setattr(fit, "paired_ratio", lambda a, b: 1.25)
    monkeypatch.setattr(fit, "bench_artifact", lambda path, **k: calls.append(("alone", path)) or {"x": 1})
    for plan, want in ((object(), [("paired", ("model.gguf", "dense.gguf"))]), (None, [("alone", "model.gguf")])):
        calls.clear()
        art = {"gguf": {"path": "model.gguf"}}
        fit._bench(art, "dense.gguf", "gguf", SimpleNamespace(plan=plan), None, None, 1, 3, 2, lambda *a: None)
        assert calls == want
        assert ("measured_decode_speedup" in art["gguf"]) == (plan is not None)


def test_fit_heads_scores_kv_group_structures_beside_ffn_ones(tiny_dir, tiny_dense_speed, tmp_path):
    prof = _profile_with(tmp_path, "tight", decode_tok_s_min=tiny_dense_speed * 1.03, ttft_max_s=None, memory_max=None)
    out = tmp_path / "fit"
    r = run_cli("fit", "--profile", prof, "--model", tiny_dir, "--out", out, "--formats", "gguf", "--dtype", "q8_0", "--heads",
                "--nsamples", "4", "--seqlen", "32", "--recover", "none", env={"EDGEPRUNE_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["args"]["heads"] is True and report["search"]["kv_groups"].startswith("searched")
    scored = [c for c in report["candidates"] if c["kl_structure"] is not None and c["sparsity"] > 0]
    assert any(c["heads"] and c["kv_groups_removed"] >= 1 for c in scored) and any(not c["heads"] for c in scored)
    chosen = report["result"]["chosen"]
    best = min((c for c in scored if c["targets"]["ok"]), key=lambda c: c["quality_kl"] if c["quality_kl"] is not None else 9e9)
    assert chosen["quality_kl"] <= best["quality_kl"] + 1e-9  # whichever kind scored best is the finalist that shipped
    plan = json.loads((out / "model" / "plan.json").read_text())  # what ships keeps the chosen structure's KV groups
    assert sum(2 - len(lp["kv_keep"]) for lp in plan["layers"]) == chosen["kv_groups_removed"]
