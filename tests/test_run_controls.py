"""What long runs expose to their user (issue #15): an ETA on every progress line, a thread count,
and the device torch finds."""

import json

import torch

from edgeprune import ui
from edgeprune.models import check_device

from tests.conftest import run_cli


def test_eta_from_the_rate_so_far():
    assert ui.eta(10.0, 2, 8) == " (10s, ~30s left)"
    assert ui.eta(5.0, 8, 8) == " (5s)"
    assert ui.eta(0.0, 0, 8) == ""


def test_plain_progress_lines_carry_an_eta(capsys, monkeypatch):
    clock = iter([0.0, 10.0, 20.0, 30.0, 40.0])
    monkeypatch.setattr(ui.time, "monotonic", lambda: next(clock))
    with ui.progress() as bar:  # not a terminal under pytest: one line per quarter
        for i in range(1, 5):
            bar("calibration pass", i, 4)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[1].strip() == "calibration pass: 2/4 (10s, ~20s left)"
    assert lines[-1].strip() == "calibration pass: 4/4 (30s)"


def test_auto_device_is_what_torch_finds():
    want = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert check_device("auto") == want
    assert check_device("cpu") == "cpu"


def test_prune_threads_reach_torch_and_the_report(tiny_dir, tmp_path):
    out = tmp_path / "p"
    r = run_cli("prune", tiny_dir, "--sparsity", "0.3", "--nsamples", "4", "--seqlen", "16", "--threads", "1",
                "--out", out, "--json", env={"EDGEPRUNE_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["host"]["torch_threads"] == 1
    assert report["recovery"]["lstsq"]["consumers"] > 0  # the default recovery ran, in place
    r = run_cli("prune", tiny_dir, "--sparsity", "0.3", "--threads", "0", "--out", tmp_path / "q")
    assert r.returncode == 2 and "--threads" in r.stderr
