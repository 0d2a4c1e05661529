"""Bad input, hostile model directories and interruption: the exit-code contract of edgeprune.errors.

Every case asserts the exit code, one line on stderr, no traceback, and that nothing was written
(no output, no `.partial` temporary, the user's own files untouched). Most run the CLI in-process
through `edgeprune.cli.run` (the same function `main` calls) so the whole file stays fast on two
cores; the signal tests and one end-to-end case run the real `edgeprune` in a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeprune.cli import run

TINY_SETTINGS = ["--nsamples", "4", "--seqlen", "32"]  # the cheapest calibration the tiny model allows
EVIL_CODE = 'import pathlib; pathlib.Path(__file__).with_name("EXECUTED").write_text("pwned")\n'


# ------------------------------------------------------------------------------------ helpers
def invoke(capsys, *argv) -> tuple[int, str, str]:
    """Run the CLI in this process; restore pytest's signal handlers afterwards."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    capsys.readouterr()
    try:
        code = run([str(a) for a in argv])
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert "Traceback" not in err
    assert len(lines[0]) <= 320, f"message of {len(lines[0])} characters"
    return lines[0]


def snapshot(root: Path) -> dict:
    """Every path under `root` with its bytes (directories as None): 'nothing changed' is equality."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def partials(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.name.endswith(".partial") or p.name.endswith(".old")]


def write_gguf(path: Path, arch: str = "llama") -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("header only")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def env(tiny_dir, tmp_path_factory):
    """Inputs for every case: good ones (the tiny model, a pruned checkpoint and its plan, text) and
    broken ones (models, plans, text files, artifacts)."""
    root = tmp_path_factory.mktemp("bad_input")
    os.environ["EDGEPRUNE_CACHE"] = str(root / "cache")
    p = {"T": tiny_dir, "root": root}

    text = root / "text.txt"
    text.write_text("The capital of France is Paris. " * 200)
    p["txt"] = text
    (root / "empty.txt").write_text("")
    p["empty_txt"] = root / "empty.txt"
    (root / "binary.txt").write_bytes(bytes(range(256)) * 8)
    p["binary_txt"] = root / "binary.txt"
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me ".encode("latin-1") * 50)
    p["latin1_txt"] = root / "latin1.txt"
    (root / "textdir").mkdir()
    p["textdir"] = root / "textdir"
    (root / "models").mkdir()
    p["models"] = root / "models"

    def model_copy(name, *drop):
        d = root / name
        shutil.copytree(tiny_dir, d)
        for f in drop:
            (d / f).unlink()
        return d

    p["no_tokenizer"] = model_copy("no_tokenizer", "tokenizer.json", "tokenizer_config.json")
    pickles = model_copy("pickles", "model.safetensors")
    (pickles / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    p["pickles"] = pickles
    pt = model_copy("pt_only", "model.safetensors")
    (pt / "weights.pt").write_bytes(b"\x80\x04")
    p["pt_only"] = pt
    p["no_weights"] = model_copy("no_weights", "model.safetensors")
    trunc = model_copy("truncated_weights")
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    p["truncated_weights"] = trunc
    garbage = model_copy("garbage_weights")
    (garbage / "model.safetensors").write_bytes(os.urandom(4096))
    p["garbage_weights"] = garbage

    def edit_config(name, change):
        d = model_copy(name)
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps(change(cfg)))
        return d

    p["no_model_type"] = edit_config("no_model_type", lambda c: {k: v for k, v in c.items() if k != "model_type"})
    evil_type = edit_config("evil_type", lambda c: {**c, "model_type": "evil",
                                                    "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.Evil"}})
    (evil_type / "evil.py").write_text(EVIL_CODE)
    p["evil_type"] = evil_type
    p["config_list"] = edit_config("config_list", lambda c: [c])
    p["gemma3_vlm"] = edit_config("gemma3_vlm", lambda c: {**c, "model_type": "gemma3", "text_config": {"model_type": "gemma3_text"}})
    bad_json = model_copy("bad_json")
    (bad_json / "config.json").write_text("{not json")
    p["bad_json"] = bad_json
    (root / "empty_dir").mkdir()
    p["empty_dir"] = root / "empty_dir"

    (root / "random.gguf").write_bytes(b"GGUF" + os.urandom(200))
    p["random_gguf"] = root / "random.gguf"
    (root / "text.gguf").write_text("not a model")
    p["text_gguf"] = root / "text.gguf"
    p["deci_gguf"] = write_gguf(root / "deci.gguf", "deci")

    # A GGUF whose cached conversion is truncated: the message must name the cache.
    from edgeprune.models import _CONVERSION_VERSION, cache_dir, sha256_file

    cached = write_gguf(root / "cached.gguf")
    target = cache_dir() / "gguf" / f"{sha256_file(cached)[:24]}-v{_CONVERSION_VERSION}"
    shutil.copytree(tiny_dir, target)
    weights = (target / "model.safetensors").read_bytes()
    (target / "model.safetensors").write_bytes(weights[:100])
    p["cached_gguf"] = cached

    # A pruned checkpoint and its plan (the base for the broken plans).
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert run(["prune", str(tiny_dir), "--out", str(root / "P"), *TINY_SETTINGS]) == 0
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
    p["P"] = root / "P"
    plan = json.loads((root / "P" / "plan.json").read_text())

    def bad_plan(name, change):
        data = json.loads(json.dumps(plan))
        change(data)
        path = root / f"{name}.json"
        path.write_text(json.dumps(data))
        p[name] = path

    bad_plan("plan_empty_layers", lambda d: d.update(layers=[]))
    bad_plan("plan_ffn_out_of_range", lambda d: d["layers"][0].update(ffn_keep=[0, 1, 10_000]))
    bad_plan("plan_ffn_negative", lambda d: d["layers"][0].update(ffn_keep=[-1, 0, 1]))
    bad_plan("plan_ffn_duplicate", lambda d: d["layers"][0].update(ffn_keep=[0, 0, 1]))
    bad_plan("plan_ffn_empty", lambda d: d["layers"][0].update(ffn_keep=[]))
    bad_plan("plan_kv_out_of_range", lambda d: d["layers"][0].update(kv_keep=[0, 7]))
    bad_plan("plan_layer_out_of_range", lambda d: d["layers"][-1].update(index=99))
    bad_plan("plan_layer_duplicate", lambda d: d["layers"][1].update(index=d["layers"][0]["index"]))
    bad_plan("plan_ffn_strings", lambda d: d["layers"][0].update(ffn_keep=["a", "b"]))
    bad_plan("plan_bias_not_bool", lambda d: d["layers"][0].update(ffn_bias="yes"))
    bad_plan("plan_version", lambda d: d.update(version=99))
    bad_plan("plan_wrong_model", lambda d: d["base"].update(fingerprint="0" * 64))
    bad_plan("plan_missing_base", lambda d: d.pop("base"))
    (root / "plan_list.json").write_text("[1, 2, 3]")
    p["plan_list"] = root / "plan_list.json"
    (root / "plan_notjson.json").write_text("{layers: ")
    p["plan_notjson"] = root / "plan_notjson.json"
    (root / "plan_binary.json").write_bytes(b"\xff\xfe\x00\x01" * 10)
    p["plan_binary"] = root / "plan_binary.json"

    (root / "fake.gguf").write_bytes(b"GGUF")
    p["fake_gguf"] = root / "fake.gguf"
    (root / "notes.txt").write_text("hello")
    p["notes"] = root / "notes.txt"
    (root / "bad.toml").write_text("this is = = not toml [")
    p["bad_toml"] = root / "bad.toml"
    yield p
    os.environ.pop("EDGEPRUNE_CACHE", None)


@pytest.fixture
def case_dir(tmp_path):
    """A directory for one case's outputs, holding a user's directory and a user's file that
    must survive whatever the case does."""
    user_dir = tmp_path / "mine"
    user_dir.mkdir()
    (user_dir / "thesis.tex").write_text("years of work")
    (tmp_path / "mine.gguf").write_bytes(b"GGUF my own model")
    (tmp_path / "notes.md").write_text("keep me")
    return tmp_path


# --------------------------------------------------------------------------------------- cases
# (id, argv with {placeholders}, exit code, a fragment the one line must contain)
CASES = [
    # eval: text files and numbers
    ("eval-text-missing", "eval {T} --text {root}/nope.txt", 2, "no such file"),
    ("eval-text-dir", "eval {T} --text {textdir}", 2, "is a directory"),
    ("eval-text-binary", "eval {T} --text {binary_txt}", 2, "binary"),
    ("eval-text-latin1", "eval {T} --text {latin1_txt}", 2, "not UTF-8"),
    ("eval-text-empty", "eval {T} --text {empty_txt}", 2, "empty"),
    ("eval-batch-size-0", "eval {T} --text {txt} --batch-size 0", 2, "--batch-size"),
    ("eval-batch-size-neg", "eval {T} --text {txt} --batch-size -1", 2, "--batch-size"),
    ("eval-max-windows-0", "eval {T} --text {txt} --max-windows 0", 2, "--max-windows"),
    ("eval-seqlen-1", "eval {T} --text {txt} --seqlen 1", 2, "--seqlen"),
    ("eval-seqlen-word", "eval {T} --text {txt} --seqlen many", 2, "--seqlen"),
    ("eval-device-toaster", "eval {T} --text {txt} --device toaster", 2, "toaster"),
    ("eval-dtype-float33", "eval {T} --text {txt} --dtype float33", 2, "float33"),
    ("eval-reference-missing", "eval {T} --text {txt} --reference {root}/nope", 2, "not found"),
    # eval: models that must not load (and never run their code)
    ("model-missing-abs", "eval {root}/nope/model --text {txt}", 2, "not found"),
    ("model-missing-dot", "eval ./nope --text {txt}", 2, "not found"),
    ("model-missing-rel", "eval models/nope --text {txt}", 2, "no such file or directory"),
    ("model-no-tokenizer", "eval {no_tokenizer} --text {txt}", 2, "no tokenizer"),
    ("model-pickle-bin", "eval {pickles} --text {txt}", 2, "safetensors only"),
    ("model-pickle-pt", "eval {pt_only} --text {txt}", 2, "safetensors only"),
    ("model-no-weights", "eval {no_weights} --text {txt}", 2, "no *.safetensors"),
    ("model-truncated-weights", "eval {truncated_weights} --text {txt}", 2, "truncated or corrupt"),
    ("model-garbage-weights", "eval {garbage_weights} --text {txt}", 2, "safetensors"),
    ("model-no-model-type", "eval {no_model_type} --text {txt}", 2, "no model_type"),
    ("model-remote-code-type", "eval {evil_type} --text {txt}", 2, "unsupported architecture"),
    ("model-config-list", "eval {config_list} --text {txt}", 2, "not a JSON object"),
    ("model-gemma3-vision", "eval {gemma3_vlm} --text {txt}", 2, "text-only Gemma3ForCausalLM"),
    ("model-config-bad-json", "eval {bad_json} --text {txt}", 2, "not readable JSON"),
    ("model-empty-dir", "eval {empty_dir} --text {txt}", 2, "no config.json"),
    ("model-random-gguf", "eval {random_gguf} --text {txt}", 2, "corrupt GGUF"),
    ("model-text-gguf", "eval {text_gguf} --text {txt}", 2, "not a GGUF"),
    ("model-deci-gguf", "eval {deci_gguf} --text {txt}", 2, "unsupported GGUF architecture"),
    ("model-cache-truncated", "eval {cached_gguf} --text {txt}", 2, "cache"),
    # prune: --out must never destroy anything
    ("prune-shapes-ragged", "prune {T} --out {case}/p --shapes ragged", 2, "--shapes must be one of"),
    ("prune-shapes-uniform-flap", "prune {T} --out {case}/p --shapes uniform --method flap", 2, "--method flap"),
    ("prune-out-user-dir", "prune {T} --out {case}/mine", 2, "already exists"),
    ("prune-out-user-dir-force", "prune {T} --out {case}/mine --force", 2, "not written by edgeprune"),
    ("prune-out-user-file", "prune {T} --out {case}/notes.md", 2, "existing file"),
    ("prune-out-dot", "prune {T} --out .", 2, "current directory"),
    ("prune-out-dotdot", "prune {T} --out ..", 2, "current directory"),
    ("prune-out-home", "prune {T} --out ~", 2, "home directory"),
    ("prune-out-root", "prune {T} --out /", 2, "current directory or one of its parents"),
    ("prune-out-under-file", "prune {T} --out {case}/notes.md/sub", 2, "is a file"),
    ("prune-out-is-input", "prune {T} --out {T}", 2, "overlaps the input"),
    ("prune-out-inside-input", "prune {T} --out {T}/pruned", 2, "overlaps the input"),
    # prune: numbers and names
    ("prune-sparsity-0", "prune {T} --out {case}/o --sparsity 0", 2, "--sparsity"),
    ("prune-sparsity-1.5", "prune {T} --out {case}/o --sparsity 1.5", 2, "--sparsity"),
    ("prune-sparsity-nan", "prune {T} --out {case}/o --sparsity nan", 2, "--sparsity"),
    ("prune-temperature-nan", "prune {T} --out {case}/o --temperature nan", 2, "--temperature"),
    ("prune-temperature-0", "prune {T} --out {case}/o --temperature 0", 2, "--temperature"),
    ("prune-temperature-inf", "prune {T} --out {case}/o --temperature inf", 2, "--temperature"),
    ("prune-min-keep-neg", "prune {T} --out {case}/o --min-keep -1", 2, "--min-keep"),
    ("prune-min-keep-2", "prune {T} --out {case}/o --min-keep 2", 2, "--min-keep"),
    ("prune-align-7", "prune {T} --out {case}/o --align 7", 2, "--align 7"),
    ("prune-align-0", "prune {T} --out {case}/o --align 0", 2, "--align"),
    ("prune-drop-layers-99", "prune {T} --out {case}/o --drop-layers 99", 2, "got 99"),
    ("prune-drop-layers-6", "prune {T} --out {case}/o --drop-layers 6", 2, "between 0 and 5"),
    ("prune-drop-layers-neg", "prune {T} --out {case}/o --drop-layers -1", 2, "--drop-layers"),
    ("prune-nsamples-0", "prune {T} --out {case}/o --nsamples 0", 2, "--nsamples"),
    ("prune-seqlen-1", "prune {T} --out {case}/o --seqlen 1", 2, "--seqlen"),
    ("prune-lora-steps-0", "prune {T} --out {case}/o --lora-steps 0", 2, "--lora-steps"),
    ("prune-method-bogus", "prune {T} --out {case}/o --method bogus", 2, "--method"),
    ("prune-recover-bogus", "prune {T} --out {case}/o --recover bogus", 2, "--recover"),
    ("prune-calib-missing", "prune {T} --out {case}/o --calib {root}/nope.txt", 2, "no such file"),
    ("prune-device-toaster", "prune {T} --out {case}/o --device toaster", 2, "toaster"),
    ("prune-dtype-float33", "prune {T} --out {case}/o --dtype float33", 2, "float33"),
    ("prune-model-missing", "prune {root}/nope --out {case}/o", 2, "not found"),
    ("prune-missing-out", "prune {T}", 2, "--out"),
    # prune --plan: checked against the model before anything runs
    ("plan-missing", "prune {T} --out {case}/o --plan {root}/nope.json", 2, "not found"),
    ("plan-not-json", "prune {T} --out {case}/o --plan {plan_notjson}", 2, "not valid JSON"),
    ("plan-binary", "prune {T} --out {case}/o --plan {plan_binary}", 2, "not a text file"),
    ("plan-list", "prune {T} --out {case}/o --plan {plan_list}", 2, "JSON object"),
    ("plan-empty-layers", "prune {T} --out {case}/o --plan {plan_empty_layers}", 2, "at least one decoder layer"),
    ("plan-ffn-out-of-range", "prune {T} --out {case}/o --plan {plan_ffn_out_of_range}", 2, "outside"),
    ("plan-ffn-negative", "prune {T} --out {case}/o --plan {plan_ffn_negative}", 2, "outside"),
    ("plan-ffn-duplicate", "prune {T} --out {case}/o --plan {plan_ffn_duplicate}", 2, "sorted and unique"),
    ("plan-ffn-empty", "prune {T} --out {case}/o --plan {plan_ffn_empty}", 2, "non-empty"),
    ("plan-kv-out-of-range", "prune {T} --out {case}/o --plan {plan_kv_out_of_range}", 2, "kv_keep"),
    ("plan-layer-out-of-range", "prune {T} --out {case}/o --plan {plan_layer_out_of_range}", 2, "index"),
    ("plan-layer-duplicate", "prune {T} --out {case}/o --plan {plan_layer_duplicate}", 2, "sorted and unique"),
    ("plan-ffn-strings", "prune {T} --out {case}/o --plan {plan_ffn_strings}", 2, "integers"),
    ("plan-bias-not-bool", "prune {T} --out {case}/o --plan {plan_bias_not_bool}", 2, "true or false"),
    ("plan-version", "prune {T} --out {case}/o --plan {plan_version}", 2, "version"),
    ("plan-wrong-model", "prune {T} --out {case}/o --plan {plan_wrong_model}", 2, "made for model"),
    ("plan-missing-base", "prune {T} --out {case}/o --plan {plan_missing_base}", 2, "malformed plan"),
    # export
    ("export-format-tflite", "export {P} --format tflite --out {case}/o", 2, "--format"),
    ("export-gguf-int4", "export {P} --format gguf --dtype int4 --out {case}/o.gguf", 2, "onnx dtype"),
    ("export-onnx-q4_0", "export {P} --format onnx --dtype q4_0 --out {case}/o", 2, "gguf dtype"),
    ("export-dtype-float33", "export {P} --format gguf --dtype float33 --out {case}/o.gguf", 2, "float33"),
    ("export-onnx-out-user-dir", "export {P} --format onnx --out {case}/mine", 2, "already exists"),
    ("export-onnx-out-user-file", "export {P} --format onnx --out {case}/notes.md", 2, "existing file"),
    ("export-gguf-out-user-file", "export {P} --format gguf --out {case}/mine.gguf", 2, "already exists"),
    ("export-gguf-out-user-file-force", "export {P} --format gguf --out {case}/mine.gguf --force", 2, "not written by edgeprune"),
    ("export-gguf-out-dir", "export {P} --format gguf --out {case}/mine", 2, "is a directory"),
    ("export-model-missing", "export {root}/nope --format gguf --out {case}/o.gguf", 2, "not found"),
    # bench / check
    ("bench-missing", "bench {root}/nope.gguf", 2, "no such file"),
    ("bench-not-artifact", "bench {notes}", 2, "not a .gguf"),
    ("bench-dir-without-onnx", "bench {textdir}", 2, "without model.onnx"),
    ("bench-threads-neg", "bench {fake_gguf} --threads -1", 2, "--threads"),
    ("bench-threads-0", "bench {fake_gguf} --threads 0", 2, "--threads"),
    ("bench-repeats-0", "bench {fake_gguf} --repeats 0", 2, "--repeats"),
    ("bench-gen-tokens-0", "bench {fake_gguf} --gen-tokens 0", 2, "--gen-tokens"),
    ("check-max-ms-inf", "check {fake_gguf} --max-ms-per-token inf", 2, "--max-ms-per-token"),
    ("check-max-ms-nan", "check {fake_gguf} --max-ms-per-token nan", 2, "--max-ms-per-token"),
    ("check-max-ms-0", "check {fake_gguf} --max-ms-per-token 0", 2, "--max-ms-per-token"),
    ("check-min-speedup-nan", "check {fake_gguf} --baseline {fake_gguf} --min-speedup nan", 2, "--min-speedup"),
    ("check-baseline-missing", "check {fake_gguf} --baseline {root}/dense.gguf", 2, "--baseline"),
    ("check-speedup-without-baseline", "check {fake_gguf} --min-speedup 1.2", 2, "--baseline"),
    ("check-profile-missing", "check {fake_gguf} --profile no-such-board", 2, "no-such-board"),
    ("check-profile-bad-toml", "check {fake_gguf} --profile {bad_toml}", 2, "TOML"),
    # fit
    ("fit-nsamples-0", "fit --profile ci-cpu --model {T} --out {case}/o --nsamples 0", 2, "--nsamples"),
    ("fit-max-memory-unitless", "fit --profile ci-cpu --model {T} --out {case}/o --max-memory 300", 2, "needs a unit"),
    ("fit-max-memory-half", "fit --profile ci-cpu --model {T} --out {case}/o --max-memory 0.5", 2, "needs a unit"),
    ("fit-max-memory-half-byte", "fit --profile ci-cpu --model {T} --out {case}/o --max-memory 0.5B", 2, "too small"),
    ("fit-max-memory-parsecs", "fit --profile ci-cpu --model {T} --out {case}/o --max-memory 3parsecs", 2, "--max-memory"),
    ("fit-recover-bogus", "fit --profile ci-cpu --model {T} --out {case}/o --recover bogus", 2, "--recover"),
    ("fit-formats-tflite", "fit --profile ci-cpu --model {T} --out {case}/o --formats tflite", 2, "--formats"),
    ("fit-dtype-float33", "fit --profile ci-cpu --model {T} --out {case}/o --dtype float33", 2, "float33"),
    ("fit-min-tok-nan", "fit --profile ci-cpu --model {T} --out {case}/o --min-tokens-per-s nan", 2, "--min-tokens-per-s"),
    ("fit-ttft-neg", "fit --profile ci-cpu --model {T} --out {case}/o --max-ttft-s -1", 2, "--max-ttft-s"),
    ("fit-threads-0", "fit --profile ci-cpu --model {T} --out {case}/o --threads 0", 2, "--threads"),
    ("fit-profile-missing", "fit --profile no-such-board --model {T} --out {case}/o", 2, "no-such-board"),
    ("fit-host-profile-missing", "fit --profile ci-cpu --host-profile nope --model {T} --out {case}/o", 2, "nope"),
    ("fit-out-user-dir", "fit --profile ci-cpu --model {T} --out {case}/mine", 2, "already exists"),
    # profiles and usage
    ("profiles-show-missing", "profiles show no-such-board", 2, "no-such-board"),
    ("profiles-show-bad-toml", "profiles show {bad_toml}", 2, "TOML"),
    ("unknown-command", "frobnicate", 2, "frobnicate"),
    ("unknown-option", "eval {T} --text {txt} --frobnicate", 2, "--frobnicate"),
]


@pytest.mark.parametrize("argv,code,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(env, case_dir, capsys, monkeypatch, argv, code, fragment):
    home = case_dir / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(env["root"])
    before = snapshot(case_dir)
    inputs_before = {k: snapshot(env[k]) for k in ("T", "P")}
    args = argv.format(**{k: v for k, v in env.items()}, case=case_dir).split()
    rc, out, err = invoke(capsys, *args)
    line = assert_one_line(err)
    assert rc == code, line
    assert fragment.lower() in line.lower(), line
    assert out == ""
    assert snapshot(case_dir) == before  # nothing written, the user's files untouched
    assert {k: snapshot(env[k]) for k in ("T", "P")} == inputs_before
    assert not partials(env["root"])
    assert not (env["evil_type"] / "EXECUTED").exists()


def test_cuda_without_gpu_is_bad_input(env, case_dir, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    rc, out, err = invoke(capsys, "eval", env["T"], "--text", env["txt"], "--device", "cuda")
    assert rc == 2 and "no CUDA GPU" in assert_one_line(err)


def test_unwritable_out_is_refused_before_work(env, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        rc, out, err = invoke(capsys, "prune", env["T"], "--out", locked / "o")
    finally:
        locked.chmod(0o700)
    assert rc == 2 and "not writable" in assert_one_line(err)


def test_seqlen_beyond_context_warns(env, capsys, monkeypatch):
    cfg = json.loads((env["T"] / "config.json").read_text())
    short = env["root"] / "short_context"
    if not short.exists():
        shutil.copytree(env["T"], short)
        (short / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 16}))
    rc, out, err = invoke(capsys, "eval", short, "--text", env["txt"], "--seqlen", "24", "--max-windows", "1")
    assert rc == 0, err
    assert "beyond the model's context of 16 tokens" in err
    assert "perplexity" in out


# ------------------------------------------------------------------------ no code from a model
def test_llama_dir_with_auto_map_never_runs_its_code(env, capsys):
    """transformers would import the directory's module with trust_remote_code; edgeprune loads
    the built-in Llama class and the module never runs."""
    d = env["root"] / "auto_map_llama"
    if not d.exists():
        shutil.copytree(env["T"], d)
        cfg = json.loads((d / "config.json").read_text())
        cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.Evil"}
        (d / "config.json").write_text(json.dumps(cfg))
        (d / "evil.py").write_text(EVIL_CODE)
    rc, out, err = invoke(capsys, "eval", d, "--text", env["txt"], "--seqlen", "16", "--max-windows", "1")
    assert rc == 0, err
    assert not (d / "EXECUTED").exists()


def test_load_pruned_never_runs_the_checkpoints_modeling_file(env):
    from edgeprune.checkpoint import REMOTE_CODE
    from edgeprune.models import load_model

    d = env["root"] / "pruned_evil"
    if not d.exists():
        shutil.copytree(env["P"], d)
        (d / REMOTE_CODE).write_text(EVIL_CODE)
    lm = load_model(str(d))
    assert type(lm.model).__module__.startswith("transformers.")
    assert not (d / "EXECUTED").exists()


# --------------------------------------------------------------------- --force and atomic outputs
def test_force_replaces_edgeprunes_own_output_and_nothing_else(env, tmp_path, capsys):
    out = tmp_path / "pruned"
    shutil.copytree(env["P"], out)
    (out / "stale-extra-file").write_text("from an earlier run")
    (tmp_path / "neighbour.txt").write_text("keep")
    rc, _, err = invoke(capsys, "prune", env["T"], "--out", out, "--plan", env["P"] / "plan.json", "--force")
    assert rc == 0, err
    assert not (out / "stale-extra-file").exists()  # the earlier output was replaced as a whole
    assert (out / ".edgeprune").is_file() and (out / "plan.json").is_file()
    assert (tmp_path / "neighbour.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["neighbour.txt", "pruned"]


def test_empty_existing_out_dir_is_used(env, tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    rc, _, err = invoke(capsys, "prune", env["T"], "--out", out, "--plan", env["P"] / "plan.json")
    assert rc == 0, err
    assert (out / "model.safetensors").is_file()


def test_atomic_dir_refuses_to_replace_a_users_directory(tmp_path):
    from edgeprune.errors import EdgepruneError
    from edgeprune.exporters.common import atomic_dir

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "a").write_text("x")
    with pytest.raises(EdgepruneError, match="not written by edgeprune"):
        with atomic_dir(mine) as tmp:
            (tmp / "b").write_text("y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    assert (mine / "a").read_text() == "x"


def test_atomic_file_replacing_a_file_leaves_no_old_copy(tmp_path):
    from edgeprune.exporters.common import atomic_file

    final = tmp_path / "m.gguf"
    final.write_text("v1")
    with atomic_file(final) as tmp:
        tmp.write_text("v2")
    assert final.read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_next_run_removes_temporaries_of_a_killed_run(tmp_path):
    from edgeprune.exporters.common import atomic_dir

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale_dir = tmp_path / f".out.{dead_pid}.abcd.partial"
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"0" * 100)
    stale_file = tmp_path / f".out.{dead_pid}.efgh.old.partial"
    stale_file.write_text("x")
    alive = tmp_path / f".out.{os.getppid()}.ijkl.partial"  # a live process's: left alone
    alive.mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("a")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", alive.name])


def test_a_bug_exits_70_with_please_report(env, capsys, monkeypatch):
    import edgeprune.evaluate

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(edgeprune.evaluate, "load_text", broken)
    rc, out, err = invoke(capsys, "eval", env["T"], "--text", env["txt"])
    line = assert_one_line(err)
    assert rc == 70
    assert "please report" in line and "ZeroDivisionError" in line


def test_a_failed_gate_is_exit_1_not_bad_input(env, capsys, monkeypatch):
    import edgeprune.bench

    fake = {"format": "gguf", "threads": 1, "decode_tok_s": {"median": 10.0, "spread": 0.0}, "prefill_tok_s": {"median": 100.0},
            "ttft_s": {"median": 0.1}, "peak_rss_mb": 50.0}
    monkeypatch.setattr(edgeprune.bench, "bench_artifact", lambda *a, **k: fake)
    rc, out, err = invoke(capsys, "check", env["fake_gguf"], "--max-ms-per-token", "50")
    assert rc == 1
    assert "FAIL max_ms_per_token" in out


# ----------------------------------------------------------------------- the real entry point
def edgeprune_cmd(*args) -> list[str]:
    return [sys.executable, "-c", "from edgeprune.cli import main; main()", *map(str, args)]


def test_real_cli_bad_input_is_one_line(env, tmp_path):
    proc = subprocess.run(edgeprune_cmd("prune", env["T"], "--out", tmp_path / "o", "--device", "toaster"),
                          capture_output=True, text=True, timeout=120, env={**os.environ, "EDGEPRUNE_DEBUG": ""})
    assert proc.returncode == 2
    assert "toaster" in assert_one_line(proc.stderr)
    assert proc.stdout == ""
    assert not (tmp_path / "o").exists()


def _interrupt_when_temporary_appears(cmd, where: Path, name: str, sig: int, timeout: float = 240.0):
    """Start `cmd`; as soon as edgeprune's temporary for `name` exists under `where` (the save or
    export is under way), send `sig`. Returns (returncode, stderr, whether the signal was sent)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sent = False
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if any(p.name.startswith(f".{name}.") and p.name.endswith(".partial") for p in where.iterdir()):
                time.sleep(0.05)  # well inside the write
                proc.send_signal(sig)
                sent = True
                break
            time.sleep(0.005)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err, sent


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_save_leaves_nothing_and_says_so(env, tmp_path, sig):
    out = tmp_path / "pruned"
    cmd = edgeprune_cmd("prune", env["T"], "--out", out, "--plan", env["P"] / "plan.json")
    rc, err, sent = _interrupt_when_temporary_appears(cmd, tmp_path, "pruned", sig)
    assert sent, f"the save finished before it could be interrupted:\n{err}"
    assert rc == 128 + sig, err
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0], err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary


def test_sigterm_mid_onnx_export_leaves_nothing(env, tmp_path):
    out = tmp_path / "onnx"
    cmd = edgeprune_cmd("export", env["P"], "--format", "onnx", "--out", out)
    rc, err, sent = _interrupt_when_temporary_appears(cmd, tmp_path, "onnx", signal.SIGTERM)
    assert sent, err
    assert rc == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1].startswith("interrupted (SIGTERM)")
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv,fragment", [
    (["measure-host", "--rounds", "0", "--quick"], "--rounds"),
    (["measure-host", "--threads", "0", "--quick"], "--threads"),
])
def test_measure_host_values_checked_before_timing(tmp_path, capsys, argv, fragment):
    code, out, err = invoke(capsys, *argv, "--out", str(tmp_path / "h.toml"))
    assert code == 2 and fragment in assert_one_line(err)
    assert not (tmp_path / "h.toml").exists()


def test_profile_context_of_1e17_is_refused(tmp_path, capsys):
    src = (Path(__file__).resolve().parents[1] / "profiles" / "ci-cpu.toml").read_text()
    bad = tmp_path / "huge.toml"
    bad.write_text(src.replace("context = ", "context = 100000000000000000 #", 1))
    code, out, err = invoke(capsys, "profiles", "show", str(bad))
    assert code == 2 and "context" in assert_one_line(err)
