"""What every exporter shares: atomic outputs, verification windows and thresholds, bench statistics.

An export is written under a temporary name beside its destination, verified against the torch
model, and only then renamed into place; on any failure the temporary file is removed, so an
interrupted or rejected export never leaves a half-written model under the final name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import tempfile
from importlib import resources
from pathlib import Path

import numpy as np

# Thresholds for unquantized artifacts (F32 GGUF, fp32 ONNX): the brief's numbers.
MIN_TOP1_EXACT = 0.995
GREEDY_TOKENS = 32


def verification_text() -> str:
    """A WikiText-2 validation excerpt shipped in the wheel (never the test split)."""
    return resources.files("edgeprune").joinpath("data/wikitext2_valid_excerpt.txt").read_text(encoding="utf-8")


def verification_windows(tokenizer, seqlen: int = 256, n: int = 4) -> np.ndarray:
    from edgeprune.evaluate import token_windows

    return token_windows(tokenizer, verification_text(), seqlen, max_windows=n).numpy()


def torch_greedy(model, prompt, n_new: int) -> list[int]:
    """Greedy continuation in torch with its KV cache: exactly `n_new` tokens, EOS ignored (the
    reference both exporters compare the runtime's own cached decoding with)."""
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(prompt, dtype=np.int64), device=device)[None], use_cache=True)
        tokens: list[int] = []
        while True:
            tokens.append(int(out.logits[0, -1].argmax()))
            if len(tokens) == n_new:
                return tokens
            step = torch.tensor([[tokens[-1]]], device=device)
            out = model(step, past_key_values=out.past_key_values, use_cache=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _public(path: Path, mode: int) -> None:
    """mkstemp/mkdtemp create owner-only entries; give the final output the usual umask modes."""
    os.chmod(path, mode & ~_umask())


@contextlib.contextmanager
def atomic_file(final: Path):
    """Yield a temporary path next to `final`; rename it into place only if the block succeeds.

    The temporary is registered with edgeprune.outputs, so a SIGTERM/SIGINT (or the next run,
    after a SIGKILL) removes it."""
    from edgeprune import outputs

    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = outputs.temp_file(final)
    try:
        yield tmp
        _public(tmp, 0o666)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
        outputs.unregister(tmp)


@contextlib.contextmanager
def atomic_dir(final: Path, kind: str = "output"):
    """Yield a temporary directory next to `final`; swap it into place only if the block succeeds.

    The result carries edgeprune's `.edgeprune` marker. An existing `final` is replaced only when
    it is empty or edgeprune's own earlier output (a non-empty directory of the user's is never
    deleted), and only after the new one is complete."""
    from edgeprune import outputs
    from edgeprune.errors import EdgepruneError

    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = outputs.temp_dir(final)
    old = None
    try:
        yield tmp
        outputs.write_marker(tmp, kind)
        _public(tmp, 0o777)
        for child in tmp.rglob("*"):
            _public(child, 0o777 if child.is_dir() else 0o666)
        if final.exists() or final.is_symlink():
            if not final.is_dir():
                raise EdgepruneError(f"{final} is a file: edgeprune writes a directory there and will not replace the file")
            if any(final.iterdir()) and not outputs.is_edgeprune_output(final):
                raise EdgepruneError(f"{final} exists and was not written by edgeprune: not replacing it")
            old = outputs.register(Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.{os.getpid()}.", suffix=".old.partial")))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        outputs.unregister(tmp)
        if old is not None:
            moved = old / final.name
            if moved.exists() and not final.exists():  # interrupted between the two renames: put it back
                os.replace(moved, final)
            shutil.rmtree(old, ignore_errors=True)
            outputs.unregister(old)


def summarize(samples: list[float]) -> dict:
    """Median and spread of repeated measurements (spread = (max - min) / median)."""
    med = statistics.median(samples)
    return {
        "median": med,
        "min": min(samples),
        "max": max(samples),
        "spread": (max(samples) - min(samples)) / med if med else 0.0,
        "repeats": len(samples),
        "samples": list(samples),
    }


def peak_rss_mb() -> float:
    """Peak resident set size of this process, in MiB.

    Linux: VmHWM of this address space. ru_maxrss would be wrong here: it survives exec, so a
    benchmark subprocess started from a big parent (fit, with the model loaded) reports the parent's peak."""
    import resource
    import sys

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def bench_main(prog: str, bench_fn, argv: list[str] | None = None) -> int:
    """`python -m edgeprune.exporters.<format> bench ARTIFACT ...`: one JSON line on stdout.

    Both runtimes' modules use this torch-free entry point, so `edgeprune bench` can measure the
    runtime alone in a fresh process (clean peak RSS)."""
    import argparse
    import json
    import sys

    from edgeprune.errors import EdgepruneError

    parser = argparse.ArgumentParser(prog=prog, description="benchmark an exported artifact; prints one JSON line")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="prefill/decode tokens/s, time to first token, peak RSS")
    bench.add_argument("artifact")
    bench.add_argument("--threads", type=int, default=None)
    bench.add_argument("--prompt-tokens", type=int, default=128)
    bench.add_argument("--gen-tokens", type=int, default=64)
    bench.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        result = bench_fn(args.artifact, args.threads, args.prompt_tokens, args.gen_tokens, args.repeats)
    except EdgepruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(result))
    return 0
