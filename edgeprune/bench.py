"""Benchmark an exported artifact in a fresh process, so its peak RSS is the runtime's, not torch's."""

from __future__ import annotations

import json
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
    module = {"gguf": "edgeprune.exporters.gguf", "onnx": "edgeprune.exporters.onnx"}[fmt]
    cmd = [sys.executable, "-m", module, "bench", str(path), "--prompt-tokens", str(prompt_tokens),
           "--gen-tokens", str(gen_tokens), "--repeats", str(repeats)]
    if threads:
        cmd += ["--threads", str(threads)]
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
