"""Benchmark an exported artifact in a fresh process, so its peak RSS is the runtime's, not torch's."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from edgeprune.errors import EdgepruneError


def artifact_format(path: str | Path) -> str:
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if path.is_dir() and (path / "model.onnx").is_file() or path.suffix == ".onnx" and path.is_file():
        return "onnx"
    if not path.exists():
        raise EdgepruneError(f"artifact not found: {path}")
    raise EdgepruneError(f"{path} is neither a .gguf file nor an ONNX export directory (with model.onnx)")


def bench_artifact(path: str | Path, threads: int | None = None, prompt_tokens: int = 128, gen_tokens: int = 64,
                   repeats: int = 3, timeout: float = 1800) -> dict:
    fmt = artifact_format(path)
    module = {"gguf": "edgeprune.exporters.llamacpp", "onnx": "edgeprune.exporters.onnx"}[fmt]
    cmd = [sys.executable, "-m", module, "bench", str(path), "--prompt-tokens", str(prompt_tokens),
           "--gen-tokens", str(gen_tokens), "--repeats", str(repeats)]
    if threads:
        cmd += ["--threads", str(threads)]
    # flush pending writes first: writeback of a file just exported competes with the measurement
    os.sync()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if res.returncode:
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise EdgepruneError(f"benchmark of {path} failed: {last.removeprefix('error: ')}", exit_code=res.returncode if res.returncode == 2 else 1)
    result = json.loads(res.stdout.strip().splitlines()[-1])
    result["format"] = fmt
    return result


def median(result: dict, key: str) -> float:
    v = result[key]
    return v["median"] if isinstance(v, dict) else float(v)


def bench_interleaved(paths, threads: int | None = None, rounds: int = 3, repeats: int = 2, **kwargs) -> list[dict]:
    """Benchmark several artifacts in alternating order, `rounds` times, each run a fresh process.

    On a shared machine throughput drifts by tens of percent over minutes; interleaving makes the
    drift hit every artifact alike. Each result pools the samples of all rounds (median of all) and
    keeps each round's decode median in `decode_round_medians`, for `paired_ratio`.
    """
    runs: list[list[dict]] = [[] for _ in paths]
    for r in range(rounds):
        order = range(len(paths)) if r % 2 == 0 else reversed(range(len(paths)))  # nobody always goes first
        for i in order:
            runs[i].append(bench_artifact(paths[i], threads, repeats=repeats, **kwargs))
    return [_pool(rs) for rs in runs]


def _pool(runs: list[dict]) -> dict:
    from edgeprune.exporters.common import summarize

    out = dict(runs[0])
    for key in ("prefill_tok_s", "decode_tok_s", "ttft_s"):
        out[key] = summarize([x for b in runs for x in b[key]["samples"]])
    out["decode_round_medians"] = [b["decode_tok_s"]["median"] for b in runs]
    out["peak_rss_mb"] = max(b["peak_rss_mb"] for b in runs)
    out["rounds"] = len(runs)
    return out


def paired_ratio(a: dict, b: dict, key: str = "decode_round_medians") -> float:
    """Median over rounds of a/b, each round's pair measured back to back (cancels slow drift)."""
    return statistics.median(x / y for x, y in zip(a[key], b[key]))
