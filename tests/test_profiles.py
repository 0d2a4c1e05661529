"""Device profiles: every shipped profile loads; every mistake is one actionable EdgepruneError."""

from __future__ import annotations

import re
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
    msg = _error(_mutated("rpi4", r'^dtypes = .*$', 'dtypes = ["q4_0", "q5_k"]'))
    assert "unknown dtype 'q5_k'" in msg and "q4_k_m" in msg


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
