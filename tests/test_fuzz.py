"""Property tests of the three readers of user files: GGUF (and safetensors) headers, device
profiles and prune plans. Whatever the bytes or values, the answer is a valid object or an
EdgepruneError (one line, exit 2) -- never another exception, which the CLI reports as a bug."""

from __future__ import annotations

import copy
import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeprune.errors import EdgepruneError

FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)


def _scratch(data: bytes, suffix: str) -> Path:
    f = tempfile.NamedTemporaryFile(suffix=suffix, delete=False)
    f.write(data)
    f.close()
    return Path(f.name)


# ------------------------------------------------------------------------------------- GGUF
@pytest.fixture(scope="module")
def valid_gguf(tmp_path_factory) -> bytes:
    import gguf
    import numpy as np

    path = tmp_path_factory.mktemp("gguf") / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("fuzz")
    w.add_block_count(2)
    w.add_context_length(64)
    w.add_feed_forward_length(32)
    w.add_tensor("token_embd.weight", np.arange(64, dtype=np.float32).reshape(8, 8))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def _gguf_outcome(data: bytes):
    from edgeprune.models import _check_gguf, peek_geometry

    path = _scratch(data, ".gguf")
    try:
        assert isinstance(peek_geometry(str(path)), dict)  # a preview never raises
        try:
            return _check_gguf(path)
        except EdgepruneError as exc:
            assert "\n" not in str(exc)
            return exc
    finally:
        path.unlink()


def test_valid_gguf_header_reads_as_llama(valid_gguf):
    from edgeprune.models import peek_geometry

    assert _gguf_outcome(valid_gguf) == "llama"
    path = _scratch(valid_gguf, ".gguf")
    try:
        assert peek_geometry(str(path)) == {"num_layers": 2, "ffn": 32, "context": 64}
    finally:
        path.unlink()


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_are_refused_as_not_gguf(data):
    assert isinstance(_gguf_outcome(data), EdgepruneError)


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_after_the_magic_are_refused(data):
    assert isinstance(_gguf_outcome(b"GGUF" + data), EdgepruneError)


@FUZZ
@given(st.data())
def test_truncated_gguf_is_refused(valid_gguf, data):
    cut = data.draw(st.integers(0, len(valid_gguf) - 1))
    outcome = _gguf_outcome(valid_gguf[:cut])
    # A cut inside the tensor data still has a readable header; the header itself never is.
    assert outcome == "llama" or isinstance(outcome, EdgepruneError)


@FUZZ
@given(st.data())
def test_mutated_gguf_is_llama_or_refused(valid_gguf, data):
    buf = bytearray(valid_gguf)
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] = data.draw(st.integers(0, 255))
    outcome = _gguf_outcome(bytes(buf))
    assert isinstance(outcome, EdgepruneError) or isinstance(outcome, str)


# -------------------------------------------------------------------------------- safetensors
@pytest.fixture(scope="module")
def valid_safetensors(tmp_path_factory) -> bytes:
    import torch
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("st") / "w.safetensors"
    save_file({"a": torch.arange(12, dtype=torch.float32), "b": torch.ones(3, 3)}, str(path))
    return path.read_bytes()


@FUZZ
@given(st.data())
def test_truncated_or_random_safetensors_is_refused(valid_safetensors, data):
    from edgeprune.models import check_safetensors

    blob = data.draw(st.one_of(st.binary(max_size=256),
                               st.integers(0, len(valid_safetensors) - 1).map(lambda n: valid_safetensors[:n])))
    path = _scratch(blob, ".safetensors")
    try:
        with pytest.raises(EdgepruneError):
            check_safetensors(path)
    finally:
        path.unlink()


def test_intact_safetensors_passes(valid_safetensors):
    from edgeprune.models import check_safetensors

    path = _scratch(valid_safetensors, ".safetensors")
    try:
        check_safetensors(path)
    finally:
        path.unlink()


# ----------------------------------------------------------------------------------- profiles
@pytest.fixture(scope="module")
def profile_tables() -> dict:
    import tomllib

    from edgeprune.profiles import builtin_profile_text

    return tomllib.loads(builtin_profile_text("ci-cpu"))


def _profile_outcome(load):
    from edgeprune.profiles import Profile

    try:
        result = load()
    except EdgepruneError as exc:
        assert "\n" not in str(exc).strip() or len(str(exc)) < 2000
        return exc
    assert isinstance(result, Profile)
    assert result.memory.context > 0 and result.memory.budget > 0
    assert all(math.isfinite(v) and v > 0 for v in (result.latency.bandwidth_gbps,))
    return result


toml_ish = st.lists(st.sampled_from([
    "[hardware]", "[latency]", "[memory]", "[targets]", "[export]", "name = ", "budget = ", "context = ", "threads = ",
    '"4GB"', "1e17", "nan", "inf", "-1", "0", "[", "]", "=", '"', "\n", "dtypes = [", '"q8_0"', "format = ", '"gguf"',
    "extends = ", '"ci-cpu"', "schema = 1", "# comment", "x.y = 2",
]) | st.text(max_size=8), max_size=40).map("".join)


@FUZZ
@given(toml_ish)
def test_random_toml_text_is_a_profile_or_refused(text):
    from edgeprune.profiles import loads_profile

    _profile_outcome(lambda: loads_profile(text, "<fuzz>", default_name="fuzz"))


@FUZZ
@given(st.data())
def test_random_values_in_a_valid_profile_are_a_profile_or_refused(profile_tables, data):
    from edgeprune.profiles import parse_profile

    tables = copy.deepcopy(profile_tables)
    for _ in range(data.draw(st.integers(1, 3))):
        section = data.draw(st.sampled_from(sorted(k for k, v in tables.items() if isinstance(v, dict))))
        keys = sorted(tables[section]) + ["unknown_key"]
        key = data.draw(st.sampled_from(keys))
        tables[section][key] = data.draw(json_values)
    _profile_outcome(lambda: parse_profile(tables, "<fuzz>", default_name="fuzz"))


# --------------------------------------------------------------------------------------- plans
@pytest.fixture(scope="module")
def tiny_model():
    from edgeprune.testing import tiny_llama

    model, _ = tiny_llama(layers=3, ffn=64)
    return model


@pytest.fixture(scope="module")
def valid_plan(tiny_model) -> dict:
    from dataclasses import asdict

    from edgeprune.plan import LayerPlan, PrunePlan, base_description

    cfg = tiny_model.config
    layers = [LayerPlan(i, list(range(0, cfg.intermediate_size, 2)), list(range(cfg.num_key_value_heads))) for i in (0, 2)]
    plan = PrunePlan(base=base_description(tiny_model, "tiny", "f" * 64), method={"recover": "none"}, calibration={},
                     layers=layers, dropped_layers=[1])
    return json.loads(json.dumps(asdict(plan)))


def _plan_outcome(data, model):
    """from_dict, then the checks the CLI runs against the model, then (if they pass) the pruning
    itself: EdgepruneError at some step, or a pruned model whose forward pass works."""
    import torch

    from edgeprune.apply import apply_plan, check_plan, model_geometry
    from edgeprune.plan import PrunePlan

    try:
        plan = PrunePlan.from_dict(data)
        check_plan(plan)
        check_plan(plan, model_geometry(model))
    except EdgepruneError as exc:
        return exc
    pruned = copy.deepcopy(model)
    apply_plan(pruned, plan)
    with torch.no_grad():
        logits = pruned(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()
    return plan


@FUZZ
@given(json_values)
def test_random_json_is_a_plan_or_refused(tiny_model, data):
    assert isinstance(_plan_outcome(data, tiny_model), EdgepruneError)  # random JSON is never a whole plan


@FUZZ
@given(st.data())
def test_mutated_plan_is_applied_or_refused(tiny_model, valid_plan, data):
    from edgeprune.plan import PrunePlan

    plan = copy.deepcopy(valid_plan)
    indices = st.lists(st.integers(-3, 80), max_size=6)
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from(["layer", "top", "base"]))
        layer_dicts = [lp for lp in plan.get("layers") or [] if isinstance(lp, dict)] if isinstance(plan.get("layers"), list) else []
        if where == "layer" and layer_dicts:
            lp = data.draw(st.sampled_from(layer_dicts))
            key = data.draw(st.sampled_from(["index", "ffn_keep", "kv_keep", "ffn_bias", "attn_out_bias", "extra"]))
            lp[key] = data.draw(st.one_of(indices, st.integers(-3, 5), json_values))
        elif where == "top":
            key = data.draw(st.sampled_from(["layers", "dropped_layers", "method", "calibration", "achieved", "version"]))
            plan[key] = data.draw(st.one_of(indices, json_values))
        else:
            key = data.draw(st.sampled_from(["num_layers", "ffn", "kv_heads", "heads", "fingerprint"]))
            if isinstance(plan.get("base"), dict):
                plan["base"][key] = data.draw(st.one_of(st.integers(-2, 100), json_values))
    outcome = _plan_outcome(plan, tiny_model)
    assert isinstance(outcome, (EdgepruneError, PrunePlan))


def test_the_unmutated_plan_applies(tiny_model, valid_plan):
    from edgeprune.plan import PrunePlan

    assert isinstance(_plan_outcome(valid_plan, tiny_model), PrunePlan)
