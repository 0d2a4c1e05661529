"""`edgeprune fit` and `edgeprune check` end to end on a tiny model (real llama.cpp, real search)."""

import dataclasses
import json

import pytest

from edgeprune import latency
from edgeprune.errors import EdgepruneError
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
    r = run_cli("fit", "--profile", prof, "--model", tiny_dir, "--out", out, "--formats", "gguf", "--dtype", "q8_0",
                "--nsamples", "4", "--seqlen", "32", env={"EDGEPRUNE_CACHE": str(tmp_path / "cache")})
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
    assert art["export"]["verification"]["top1_agreement"] > 0.5
    # measured with the thread count the host profile's prediction assumes (ci-cpu: 1)
    assert art["bench"]["threads"] == load_profile("ci-cpu").hardware.threads
    assert art["host_prediction"]["profile"] == "ci-cpu" and art["host_prediction"]["decode_tok_s"] > 0
    for name in ("report.md", "frontier.png", "model/widths.png", "model/plan.json"):
        assert (out / name).is_file(), name
    md = (out / "report.md").read_text()
    assert "Chosen" in md and "Quality of what ships, through the runtime" in md
    rec = report["recovery"]  # held-out KL decides which recovery (if any) is kept
    assert set(rec["tried"]) == {"none", "lstsq", "bias"} and rec["kept"] == min(rec["tried"], key=rec["tried"].get)
    plan = json.loads((out / "model" / "plan.json").read_text())
    assert plan["method"].get("recover", "none") == rec["kept"]


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
                "--nsamples", "4", "--seqlen", "32", "--max-quality-loss", "kl:0.0000001", env={"EDGEPRUNE_CACHE": str(tmp_path / "cache")})
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
