"""Device profiles: every shipped profile loads; every mistake is one actionable EdgepruneError."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from edgeprune.errors import EdgepruneError
from edgeprune.profiles import (
    builtin_profile_text,
    describe_profile,
    dumps_toml,
    list_profiles,
    load_profile,
    loads_profile,
    parse_bytes,
    parse_gbps,
    parse_gops,
    parse_ms,
    parse_seconds,
    profile_to_dict,
    save_profile,
    write_profile,
)

EXPECTED = {
    "raspberrypi5", "raspberrypi5-4gb", "raspberrypi5-16gb", "rpi4", "orangepi5", "jetson-orin-nano",
    "android-sd8gen3", "mac-m1", "x86-laptop-avx2", "ci-cpu",
}


def test_list_profiles_has_every_shipped_profile():
    assert EXPECTED <= set(list_profiles())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_shipped_profile_loads(name):
    p = load_profile(name)
    assert p.name == name
    assert p.hardware.threads > 0 and p.hardware.ram > 0
    assert p.latency.backend in ("llama.cpp", "onnxruntime")
    assert p.latency.bandwidth_gbps > 0
    assert p.export.default_dtype in p.latency.compute_gops
    assert p.memory.budget <= p.hardware.ram
    assert p.memory_limit <= p.memory.budget
    assert p.provenance.sources, "shipped profiles name their sources"
    assert p.provenance.calibrated or p.provenance.estimates, "estimates are marked"
    assert describe_profile(p).startswith(name)


def test_profile_by_path_and_by_name_agree(tmp_path):
    path = tmp_path / "board.toml"
    path.write_text(builtin_profile_text("raspberrypi5"))
    by_path = load_profile(path)
    by_name = load_profile("raspberrypi5")
    assert profile_to_dict(by_path) == profile_to_dict(by_name)
    assert load_profile(str(path)).name == "raspberrypi5"  # the file's name = wins over its stem


def test_name_defaults_to_file_stem(tmp_path):
    text = re.sub(r'^name = .*$', "", builtin_profile_text("rpi4"), flags=re.M)
    path = tmp_path / "my-board.toml"
    path.write_text(text)
    assert load_profile(path).name == "my-board"


def test_raspberrypi5_values_keep_provenance():
    p = load_profile("raspberrypi5")
    assert p.latency.bandwidth_gbps == 8.7
    assert p.export.dtypes[0] == "q8_0"
    assert p.is_estimate("latency.token_overhead_ms")
    assert not p.is_estimate("latency.bandwidth_gbps")
    assert any("[S11]" in s for s in p.provenance.sources)


# ---------------------------------------------------------------------------------------------
# round trip


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_write_then_load_round_trips(name, tmp_path):
    p = load_profile(name)
    out = write_profile(p, tmp_path / f"{name}.toml")
    q = load_profile(out)
    assert profile_to_dict(q) == profile_to_dict(p)
    # save_profile is the same writer; what it saves is resolved (stands alone, no extends)
    saved = save_profile(p, tmp_path / "out" / f"{name}.toml")
    assert "extends" not in saved.read_text()
    assert replace(load_profile(saved), source="") == replace(p, source="")


def test_writer_escapes_strings(tmp_path):
    from dataclasses import replace

    p = load_profile("rpi4")
    p = replace(p, hardware=replace(p.hardware, description='quote " backslash \\ tab\t newline\n unicode µ'))
    q = load_profile(write_profile(p, tmp_path / "x.toml"))
    assert q.hardware.description == p.hardware.description


def test_dumps_toml_is_read_by_tomllib():
    import tomllib

    data = {"a": 1, "b": 2.5, "c": "x", "d": [1, 2], "t": {"k": True, "sub": {"z": "y"}}}
    assert tomllib.loads(dumps_toml(data)) == data


# ---------------------------------------------------------------------------------------------
# units


@pytest.mark.parametrize("text,expected", [
    ("300MB", 300_000_000), ("2.5GB", 2_500_000_000), ("1.5GiB", 1_610_612_736), ("512 MiB", 536_870_912),
    ("8gb", 8_000_000_000), (2_000_000_000, 2_000_000_000), ("1e9", 1_000_000_000), ("100000KB", 100_000_000),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text,expected", [("8s", 8.0), ("500ms", 0.5), ("1.5 s", 1.5), (2, 2.0), ("2min", 120.0)])
def test_parse_seconds(text, expected):
    assert parse_seconds(text) == pytest.approx(expected)


def test_parse_other_units():
    assert parse_ms("50us") == pytest.approx(0.05)
    assert parse_ms(0.25) == 0.25 and parse_ms(0) == 0.0
    assert parse_ms("0.001s") == pytest.approx(1.0)
    assert parse_gbps("8.7GB/s") == 8.7 and parse_gbps("8700MB/s") == pytest.approx(8.7) and parse_gbps(12) == 12
    assert parse_gops("1.2TOPS") == pytest.approx(1200) and parse_gops("150 GFLOPS") == 150


# ---------------------------------------------------------------------------------------------
# validation errors: one line, names the table/key, says how to fix it


def _mutated(name: str, old: str, new: str) -> str:
    text = builtin_profile_text(name)
    assert re.search(old, text, flags=re.M), old
    return re.sub(old, new, text, count=1, flags=re.M)


def _error(text: str) -> str:
    with pytest.raises(EdgepruneError) as info:
        loads_profile(text, "test.toml")
    msg = str(info.value)
    assert "\n" not in msg
    assert info.value.exit_code == 2
    return msg


def test_unknown_key_suggests_the_closest():
    msg = _error(_mutated("raspberrypi5", r"^bandwidth_gbps = ", "bandwith_gbps = "))
    assert "[latency] unknown key 'bandwith_gbps'" in msg and "did you mean 'bandwidth_gbps'" in msg


def test_key_in_the_wrong_table_says_where_it_belongs():
    text = builtin_profile_text("rpi4").replace("[latency]\n", "[latency]\nthreads = 4\n", 1)
    assert "[latency] unknown key 'threads' (it belongs in [hardware])" in _error(text)


def test_unknown_table_suggests_the_closest():
    msg = _error(_mutated("raspberrypi5", r"^\[targets\]", "[target]"))
    assert "'target'" in msg and "did you mean 'targets'" in msg


def test_missing_table():
    text = builtin_profile_text("rpi4")
    text = re.sub(r"^\[memory\].*?(?=^\[targets\])", "", text, flags=re.M | re.S)
    msg = _error(text)
    assert "missing table [memory]" in msg


def test_missing_required_key():
    msg = _error(_mutated("rpi4", r"^threads = .*$", ""))
    assert "[hardware] missing required key 'threads'" in msg


@pytest.mark.parametrize("old,new,needle", [
    (r'^budget = .*$', 'budget = "8s"', "is a time, expected a memory size"),
    (r'^ttft_max_s = .*$', 'ttft_max_s = "300MB"', "is a memory size, expected a time"),
    (r'^budget = .*$', "budget = 1500", "did you mean '1500MB'"),
    (r'^budget = .*$', 'budget = "1.5G"', "ambiguous"),
    (r'^budget = .*$', 'budget = "1.5 parsecs"', "unknown unit"),
    (r'^ttft_max_s = .*$', "ttft_max_s = 8000", "did you mean '8000ms'"),
    (r'^bandwidth_gbps = .*$', 'bandwidth_gbps = "8.7GB"', "is a memory size, expected a bandwidth"),
    (r'^layer_overhead_ms = .*$', "layer_overhead_ms = 50000", "check the unit"),
])
def test_wrong_units(old, new, needle):
    msg = _error(_mutated("rpi4", old, new))
    assert needle in msg


@pytest.mark.parametrize("old,new,needle", [
    (r'^bandwidth_gbps = .*$', "bandwidth_gbps = -3.7", "[latency] bandwidth_gbps: must be positive"),
    (r'^bandwidth_gbps = .*$', "bandwidth_gbps = 0", "must be positive"),
    (r'^threads = .*$', "threads = 0", "[hardware] threads: must be positive"),
    (r'^threads = .*$', "threads = 2.5", "expected a whole number"),
    (r'^threads = .*$', "threads = true", "expected a whole number"),
    (r'^decode_tok_s_min = .*$', "decode_tok_s_min = -5", "[targets] decode_tok_s_min: must be positive"),
    (r'^ttft_max_s = .*$', "ttft_max_s = 0", "must be positive"),
    (r'^layer_overhead_ms = .*$', "layer_overhead_ms = -0.1", "must be zero or positive"),
    (r'^q4_0 = .*$', "q4_0 = 0", "[latency.compute_gops] q4_0: must be positive"),
    (r'^context = .*$', "context = -2048", "[memory] context: must be positive"),
])
def test_negative_or_zero_numbers(old, new, needle):
    assert needle in _error(_mutated("rpi4", old, new))


def test_unknown_dtype_in_export():
    # q5_k is now an alias of q5_k_m (edgeprune.dtypes), so the unknown name is q7_k
    msg = _error(_mutated("rpi4", r'^dtypes = .*$', 'dtypes = ["q4_0", "q7_k"]'))
    assert "unknown dtype 'q7_k'" in msg and "q4_k_m" in msg


def test_unknown_dtype_in_compute_table():
    msg = _error(_mutated("rpi4", r'^q4_k_m = .*$', "q4_km = 28"))
    assert "[latency.compute_gops] q4_km" in msg and "did you mean 'q4_k_m'" in msg


def test_dtype_names_are_normalized():
    p = loads_profile(_mutated("rpi4", r'^dtypes = .*$', 'dtypes = ["Q4_0", "Q8_0"]'), "x.toml")
    assert p.export.dtypes == ("q4_0", "q8_0")


def test_export_dtype_needs_compute_rate():
    msg = _error(_mutated("orangepi5", r'^dtypes = .*$', 'dtypes = ["q4_0", "f16"]'))
    assert "no rate for exported dtype 'f16'" in msg


def test_format_must_match_backend():
    msg = _error(_mutated("rpi4", r'^format = .*$', 'format = "onnx"'))
    assert "does not match [latency] backend" in msg


def test_onnx_dtype_not_allowed_in_gguf():
    msg = _error(_mutated("rpi4", r'^dtypes = .*$', 'dtypes = ["int4"]'))
    assert "cannot be exported as gguf" in msg


def test_unknown_backend_suggests():
    msg = _error(_mutated("rpi4", r'^backend = .*$', 'backend = "llamacpp"'))
    assert "did you mean 'llama.cpp'" in msg


def test_kquant_default_needs_256_alignment():
    text = _mutated("x86-laptop-avx2", r'^dtypes = .*$', 'dtypes = ["q4_k_m", "q4_0"]')
    msg = _error(text)
    assert "width_multiple = 256" in msg


def test_memory_max_above_budget():
    msg = _error(_mutated("rpi4", r'^memory_max = .*$', 'memory_max = "3GB"'))
    assert "exceeds [memory] budget" in msg


def test_estimates_must_name_real_keys():
    msg = _error(_mutated("rpi4", r'^  "latency.token_overhead_ms",', '  "latency.token_overhead",'))
    assert "did you mean 'latency.token_overhead_ms'" in msg


def test_invalid_toml_is_one_line():
    msg = _error("[hardware\nthreads = 4")
    assert "not valid TOML" in msg


def test_unknown_profile_name_lists_available():
    with pytest.raises(EdgepruneError) as info:
        load_profile("raspberrypi")
    msg = str(info.value)
    assert "unknown profile 'raspberrypi'" in msg and "did you mean 'raspberrypi5'" in msg and "rpi4" in msg


def test_missing_profile_file():
    with pytest.raises(EdgepruneError, match="profile file not found"):
        load_profile("./nope/board.toml")


def test_profiles_package_ships_the_toml_files():
    import edgeprune.profiles as pkg

    here = Path(pkg.__file__).parent
    assert {p.stem for p in here.glob("*.toml")} == set(list_profiles())


# ---------------------------------------------------------------------------------------------
# extends


@pytest.mark.parametrize("name,ram,budget", [
    ("raspberrypi5-4gb", 4_000_000_000, 1_200_000_000),
    ("raspberrypi5-16gb", 16_000_000_000, 6_000_000_000),
])
def test_pi5_variants_resolve_to_the_values_they_had_as_full_files(name, ram, budget):
    text = builtin_profile_text(name)
    assert 'extends = "raspberrypi5"' in text
    assert "[latency" not in text and "[export]" not in text, "variants change only what differs"
    p = load_profile(name)
    gb = ram // 10**9
    assert p.name == name
    assert p.hardware.description == (f"Raspberry Pi 5 Model B {gb} GB, BCM2712 4x Cortex-A76 @ 2.4 GHz, "
                                      "LPDDR4X-4267 (17 GB/s peak), active cooler")
    assert (p.hardware.ram, p.hardware.threads, p.hardware.isa) == (ram, 4, ("neon", "dotprod", "fp16"))
    assert (p.memory.budget, p.memory.context, p.memory.runtime_overhead) == (budget, 2048, 40_000_000)
    assert (p.targets.decode_tok_s_min, p.targets.ttft_max_s, p.targets.prompt_tokens) == (70.0, 2.0, 512)
    assert p.targets.memory_max == budget and p.memory_limit == budget
    c = p.latency
    assert (c.backend, c.bandwidth_gbps, c.kv_dtype, c.prefill_logits) == ("llama.cpp", 8.7, "f16", "last")
    assert (c.layer_overhead_ms, c.token_overhead_ms) == (0.1, 0.3)
    assert (c.prefill_layer_token_overhead_ms, c.prefill_overhead_ms) == (0.01, 5.0)
    assert c.compute_gops == {"q4_0": 150.0, "q8_0": 80.0, "q4_k_m": 150.0, "f16": 40.0, "f32": 20.0}
    assert c.dtype_bandwidth_gbps == {}
    assert (p.export.format, p.export.dtypes, p.export.width_multiple) == ("gguf", ("q8_0", "q5_k_m", "q5_0", "q4_k_m", "iq4_nl", "q4_0"), 32)
    assert p.is_estimate("memory.budget") and p.is_estimate("latency.compute_gops.f16")
    assert not p.is_estimate("latency.bandwidth_gbps")
    # everything else is the 8 GB profile's
    base, mine = profile_to_dict(load_profile("raspberrypi5")), profile_to_dict(p)
    for d in (base, mine):
        del d["name"], d["hardware"]["description"], d["hardware"]["ram"], d["memory"]["budget"]
        del d["targets"]["memory_max"]
    assert mine == base


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_extends_merges_tables_key_by_key(tmp_path):
    _write(tmp_path / "boards", "base.toml", builtin_profile_text("rpi4").replace('name = "rpi4"', 'name = "base"'))
    child = _write(tmp_path / "mine", "child.toml", """
extends = "../boards/base.toml"
[latency]
bandwidth_gbps = "4.2GB/s"
[latency.compute_gops]
q4_0 = 30
[export]
dtypes = ["q8_0"]
""")
    base, p = load_profile("rpi4"), load_profile(child)
    assert p.name == "child", "the base's name is not inherited"
    assert p.latency.bandwidth_gbps == 4.2
    assert p.latency.compute_gops == {**base.latency.compute_gops, "q4_0": 30.0}, "nested tables merge"
    assert p.export.dtypes == ("q8_0",), "lists replace"
    assert p.latency.layer_overhead_ms == base.latency.layer_overhead_ms
    assert p.hardware == base.hardware and p.memory == base.memory and p.targets == base.targets


def test_extends_a_shipped_name_from_anywhere(tmp_path):
    path = _write(tmp_path, "pi.toml", 'extends = "raspberrypi5"\n[targets]\ndecode_tok_s_min = 50\n')
    p = load_profile(path)
    assert p.name == "pi" and p.targets.decode_tok_s_min == 50
    assert p.latency == load_profile("raspberrypi5").latency


def test_extends_chains(tmp_path):
    _write(tmp_path, "a.toml", 'extends = "raspberrypi5-4gb"\n[memory]\nbudget = "1.5GB"\n')
    p = load_profile(_write(tmp_path, "b.toml", 'extends = "a.toml"\n[memory]\ncontext = 1024\n'))
    assert (p.hardware.ram, p.memory.budget, p.memory.context) == (4_000_000_000, 1_500_000_000, 1024)


def test_extends_cycle_is_an_error(tmp_path):
    _write(tmp_path, "a.toml", 'extends = "b.toml"\n')
    b = _write(tmp_path, "b.toml", 'extends = "./a.toml"\n')
    with pytest.raises(EdgepruneError) as info:
        load_profile(b)
    msg = str(info.value)
    assert "cycle" in msg and "a.toml" in msg and "b.toml" in msg and "\n" not in msg
    me = _write(tmp_path, "me.toml", 'extends = "me.toml"\n')
    with pytest.raises(EdgepruneError, match="cycle"):
        load_profile(me)


def test_unknown_extends_names_the_file(tmp_path):
    path = _write(tmp_path, "board.toml", 'extends = "raspberypi5"\n')
    with pytest.raises(EdgepruneError) as info:
        load_profile(path)
    msg = str(info.value)
    assert str(path) in msg and "unknown profile 'raspberypi5'" in msg and "did you mean 'raspberrypi5'" in msg
    path = _write(tmp_path, "other.toml", 'extends = "./missing.toml"\n')
    with pytest.raises(EdgepruneError) as info:
        load_profile(path)
    assert str(path) in str(info.value) and "file not found" in str(info.value)


# ---------------------------------------------------------------------------------------------
# dtypes of the format's menu


def test_any_gguf_dtype_of_the_menu_may_be_exported():
    p = loads_profile(_mutated("rpi4", r'^dtypes = .*$', 'dtypes = ["q4_0", "iq4_nl", "q5_1", "Q6_K", "f32"]'), "x.toml")
    assert p.export.dtypes == ("q4_0", "iq4_nl", "q5_1", "q6_k", "f32")


@pytest.mark.parametrize("old,new,where,right", [
    (r'^dtypes = .*$', 'dtypes = ["q4_0", "int8"]', "[export] dtypes: 'int8'", "use 'q8_0'"),
    (r'^q8_0 = .*$', "int4 = 28", "[latency.compute_gops] int4: 'int4'", "use 'q4_0'"),
])
def test_dtype_of_the_wrong_format_is_one_line_naming_the_right_choice(old, new, where, right):
    msg = _error(_mutated("rpi4", old, new))
    assert msg.startswith("profile test.toml: ")
    assert where in msg and "onnx dtype" in msg and "cannot be exported as gguf" in msg and right in msg


def test_missing_compute_rate_says_which_key_to_add():
    msg = _error(_mutated("orangepi5", r'^dtypes = .*$', 'dtypes = ["q4_0", "f16"]'))
    assert "add 'f16 = <GOPS>' to [latency.compute_gops]" in msg


# ---------------------------------------------------------------------------------------------
# saving, and what the shipped files cite


def test_save_profile_writes_numpy_numbers(tmp_path):
    import numpy as np
    p = load_profile("ci-cpu")
    p = replace(p, latency=replace(p.latency, bandwidth_gbps=np.float64(9.25)),
                hardware=replace(p.hardware, threads=np.int64(2)))
    q = load_profile(save_profile(p, tmp_path / "np.toml"))
    assert q.latency.bandwidth_gbps == 9.25 and q.hardware.threads == 2


_LOCAL = re.compile(r"/work\b|/home/|/tmp/|/Users/|shared/research|devices\.md|[A-Za-z]:\\\\|~/|--memory-max")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_profiles_cite_public_sources_only(name):
    text = builtin_profile_text(name)
    assert not _LOCAL.search(text), _LOCAL.search(text)
    p = load_profile(name)
    listed = {s.split("]")[0] + "]" for s in p.provenance.sources if s.startswith("[S")}
    cited = set(re.findall(r"\[(S\d+b?)[\] ,]", text)) | set(re.findall(r"\bS\d+b?(?=[\],])", text))
    assert {f"[{t}]" for t in cited} <= listed, "every [S#] a profile cites is in its sources"
    assert all(" -- " in s for s in p.provenance.sources if s.startswith("[S")), "each source says where to find it"
