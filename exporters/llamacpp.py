"""The llama.cpp side of GGUF export: loading, logits, greedy decoding, verification, benchmark.

`export_gguf` (exporters/gguf.py) writes the file and calls `verify_gguf` here before the file
appears under its name; llama.cpp's quantizer is driven from exporters/llamacpp_quantize.py.

This module imports neither torch nor llama_cpp at import time: `python -m
edgeprune.exporters.llamacpp bench FILE` measures llama.cpp in a process whose memory is
llama.cpp's alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import time
from pathlib import Path

import numpy as np

from edgeprune.errors import EdgepruneError, VerificationError
from edgeprune.exporters.common import (
    GREEDY_TOKENS,
    MIN_TOP1_EXACT,
    peak_rss_mb,
    summarize,
    torch_greedy,
    verification_text,
    verification_windows,
)

# Sanity floors on top-1 agreement with torch for lossy dtypes: they catch a broken file, not a
# quality loss (the tensor layout is already proven by the F32 path). Dense SmolLM2-135M measured
# top-1 / mean KL on the 4 x 256 verification windows: f16 0.998 / 5e-6, q8_0 0.956 / 4e-3,
# q4_0 0.690 / 0.33 -- a 135M model loses a lot at 4 bits, and a pruned one may lose more, hence
# the low 4-bit floors; q3_k_m is mostly Q4_0/Q4_K there (576-wide rows fall back from Q3_K).
MIN_TOP1_LOSSY = {
    "f16": 0.95, "q8_0": 0.85, "q6_k": 0.80, "q5_k_m": 0.70, "q5_1": 0.70, "q5_0": 0.70,
    "q4_k_m": 0.50, "q4_1": 0.50, "q4_0": 0.50, "iq4_nl": 0.50, "q3_k_m": 0.35,
}

# F32 files differ from torch only by summation order: mean KL is ~1e-6 (SmolLM2 6e-7), while a
# dropped FLAP bias or a mis-permuted head gives 1e-1 and more. Checked with top-1 and greedy.
MAX_KL_EXACT = 1e-3

GREEDY_PROMPT = 16  # tokens of verification window 0 used as the greedy prompt


def resolve_threads(n: int | None) -> int:
    """Requested threads, else the cores this process may run on."""
    if n:
        return n
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


_LOG_WARN, _LOG_ERROR, _LOG_CONT = 3, 4, 5  # ggml_log_level (DEBUG=1, INFO=2 come before them)


@contextlib.contextmanager
def llamacpp_log():
    """Collect llama.cpp's warnings/errors (instead of printing them) for our one-line errors."""
    import llama_cpp

    lines: list[str] = []
    keep = [False]  # whether the message being continued (level CONT) is one we collect

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        if level != _LOG_CONT:
            keep[0] = level in (_LOG_WARN, _LOG_ERROR)
        if keep[0]:
            lines.append(" ".join(text.decode("utf-8", "replace").split()))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        from llama_cpp._logger import llama_log_callback  # llama-cpp-python's own logger

        llama_cpp.llama_log_set(llama_log_callback, ctypes.c_void_p(0))


def extra_buffers_ok() -> bool:
    """Whether llama.cpp may put weights in its extra CPU buffer types (AMX tiles, repacked Q4_0).

    llama-cpp-python 0.3.36 built natively on a Xeon with AMX segfaults in llama_decode on every
    quantized GGUF (SmolLM2's Q4_1 included) with them, and runs correctly without; so they are off
    where the CPU reports AMX. EDGEPRUNE_LLAMACPP_EXTRA_BUFFERS=1 or 0 overrides the check."""
    forced = os.environ.get("EDGEPRUNE_LLAMACPP_EXTRA_BUFFERS")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return "amx_int8" not in f.read()
    except OSError:
        return True


@contextlib.contextmanager
def _model_params(use_extra_bufts: bool):
    """llama_cpp.Llama takes no use_extra_bufts argument: patch the defaults it starts from."""
    import llama_cpp.llama as llama_py

    if use_extra_bufts:
        yield
        return
    original = llama_py.llama_cpp.llama_model_default_params

    def defaults():
        params = original()
        params.use_extra_bufts = False
        return params

    llama_py.llama_cpp.llama_model_default_params = defaults
    try:
        yield
    finally:
        llama_py.llama_cpp.llama_model_default_params = original


def open_llama(path, n_ctx: int = 512, n_threads: int | None = None, logits_all: bool = True, n_batch: int | None = None):
    """A llama_cpp.Llama on `path` (CPU), or a one-line EdgepruneError saying why llama.cpp refused it."""
    try:
        import llama_cpp
    except ImportError:
        raise EdgepruneError("llama.cpp is needed here: pip install llama-cpp-python") from None
    threads = resolve_threads(n_threads)
    n_batch = n_batch or n_ctx
    with llamacpp_log() as log, _model_params(extra_buffers_ok()):
        try:
            return llama_cpp.Llama(
                model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_threads=threads,
                n_threads_batch=threads, logits_all=logits_all, n_gpu_layers=0, verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            # the first complaint is the cause; "error loading model" carries the loader's reason
            reasons = [ln for ln in log if ln][:1] + [ln for ln in log if "error loading model" in ln]
            reason = "; ".join(dict.fromkeys(reasons)) or str(exc)
            raise EdgepruneError(f"llama.cpp cannot load {path}: {reason}") from None


def _eval_logits(llm, tokens) -> np.ndarray:
    """Logits [T, vocab] of one window, from an empty KV cache (no BOS is added to raw ids)."""
    tokens = [int(t) for t in np.asarray(tokens).reshape(-1)]
    if len(tokens) > llm.n_ctx():
        raise EdgepruneError(f"a window of {len(tokens)} tokens does not fit llama.cpp's context of {llm.n_ctx()}")
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def llamacpp_logits_fn(path, n_ctx: int = 512, n_threads: int | None = None):
    """A `LogitsFn` (int tokens [T] -> float32 logits [T, vocab]) backed by llama.cpp."""
    llm = open_llama(path, n_ctx=n_ctx, n_threads=n_threads)

    def fn(tokens: np.ndarray) -> np.ndarray:
        return _eval_logits(llm, tokens)

    fn.llm = llm  # keeps the model alive with the function, and lets callers reuse it
    return fn


def llamacpp_greedy(llm, prompt, n_new: int) -> list[int]:
    """Greedy continuation with llama.cpp's KV cache: prefill the prompt, then one token per step."""
    llm.reset()
    llm.eval([int(t) for t in prompt])
    out = []
    for _ in range(n_new):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        llm.eval([tok])
    return out


def _tokenizer_samples(tokenizer) -> list[str]:
    text = verification_text()[:3000]
    tricky = "The capital of France is Paris.  In 1889, 324 m!\n\n\tIt's   \"done\" — naïve café 😀\n"
    samples = [text, tricky]
    bos = tokenizer.bos_token or ""
    eos = tokenizer.eos_token or ""
    samples.append(f"{bos}user\nHi there{eos}\n")  # special tokens written in the text
    return samples


def check_tokenizer(llm, tokenizer) -> dict:
    """llama.cpp tokenizes as the HF tokenizer does, BOS and special tokens included."""
    samples = _tokenizer_samples(tokenizer)
    for s in samples:
        ref = tokenizer(s, add_special_tokens=True)["input_ids"]
        with llamacpp_log():  # quiet: the BOS-in-text sample makes llama.cpp warn about a double BOS
            got = llm.tokenize(s.encode("utf-8"), add_bos=True, special=True)
        if ref != got:
            k = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
            raise VerificationError(
                f"llama.cpp tokenizes differently from the HF tokenizer at token {k} of {s[:40]!r}: "
                f"HF {ref[k:k + 5]} vs llama.cpp {got[k:k + 5]} (wrong tokenizer.ggml.pre or add_bos?)"
            )
    return {"tokenizer_match": True, "tokenizer_samples": len(samples)}


def verify_gguf(model, tokenizer, path, dtype: str = "f32", windows=None, n_threads: int | None = None) -> dict:
    """Compare the GGUF in llama.cpp with the torch model; raise VerificationError below the bar.

    All dtypes: identical tokenization, top-1 agreement and mean KL on `windows`.
    f32: top-1 >= MIN_TOP1_EXACT, mean KL <= MAX_KL_EXACT and the same GREEDY_TOKENS-token greedy
    continuation (torch and llama.cpp each decoding with their own KV cache).
    Lossy dtypes: top-1 >= MIN_TOP1_LOSSY[dtype] (a sanity floor), greedy agreement reported.
    """
    from edgeprune.evaluate import compare_logits, torch_logits_fn

    windows = verification_windows(tokenizer) if windows is None else np.asarray(windows)
    prompt = np.asarray(windows[0][:GREEDY_PROMPT], dtype=np.int64)
    n_ctx = max(int(windows.shape[1]), len(prompt) + GREEDY_TOKENS)
    llm = open_llama(path, n_ctx=n_ctx, n_threads=n_threads)
    try:
        report = check_tokenizer(llm, tokenizer)
        reference = torch_logits_fn(model)
        report.update(compare_logits(reference, lambda t: _eval_logits(llm, t), windows))
        ref_greedy = torch_greedy(model, prompt, GREEDY_TOKENS)
        got_greedy = llamacpp_greedy(llm, prompt, GREEDY_TOKENS)
    finally:
        llm.close()
    same = next((i for i, (a, b) in enumerate(zip(ref_greedy, got_greedy)) if a != b), GREEDY_TOKENS)
    report.update({"greedy_tokens": GREEDY_TOKENS, "greedy_match": same, "windows": int(len(windows)), "seqlen": int(windows.shape[1])})
    top1, kl = report["top1_agreement"], report["mean_kl"]
    if dtype == "f32":
        report["min_top1"] = MIN_TOP1_EXACT
        if top1 < MIN_TOP1_EXACT or same < GREEDY_TOKENS or kl > MAX_KL_EXACT:
            raise VerificationError(
                f"F32 GGUF disagrees with torch: top-1 {top1:.4f} (need >= {MIN_TOP1_EXACT}), greedy continuation "
                f"identical for {same}/{GREEDY_TOKENS} tokens, mean KL {kl:.2e} (need <= {MAX_KL_EXACT:g}), "
                f"max |dlogit| {report['max_abs_logit_diff']:.3g}"
            )
    else:
        report["min_top1"] = MIN_TOP1_LOSSY[dtype]
        if top1 < MIN_TOP1_LOSSY[dtype]:
            raise VerificationError(
                f"{dtype} GGUF is implausibly far from torch: top-1 {top1:.4f} (sanity floor {MIN_TOP1_LOSSY[dtype]}), mean KL {kl:.3f}"
            )
    return report


# A user's GGUF against the torch model transformers dequantizes from it. Both run the same
# (quantized) weights, but llama.cpp also quantizes activations for its quantized matmuls, so they
# differ a little: SmolLM2's Q4_1 and Gemma 3 270M's Q4_K_M agree on 88-95% of next-token argmaxes
# and within 1% in NLL (measured on 256 tokens of the bundled WikiText-2 excerpt). A wrong
# conversion (a missed norm offset, a mis-ordered head, another tokenizer) lands far outside.
SOURCE_MIN_TOP1 = 0.75
SOURCE_MAX_NLL_GAP = 0.05  # relative: |NLL torch - NLL llama.cpp| / NLL llama.cpp


def source_agreement(model, tokenizer, path, n_tokens: int = 256, n_threads: int | None = None) -> dict:
    """Tokenization, top-1 agreement and NLL of torch and llama.cpp on the same GGUF file and text;
    raises VerificationError when they disagree (everything downstream is compared with that torch model)."""
    from edgeprune.evaluate import compare_logits, log_softmax, token_windows, torch_logits_fn

    window = token_windows(tokenizer, verification_text(), n_tokens, max_windows=1).numpy()
    ids = window[0]
    llm = open_llama(path, n_ctx=max(len(ids), 64), n_threads=n_threads)
    try:
        check_tokenizer(llm, tokenizer)  # a converted vocabulary that splits text differently fails here
        logits = {"torch": torch_logits_fn(model)(ids), "llama.cpp": _eval_logits(llm, ids)}  # each side runs once
    finally:
        llm.close()
    report = compare_logits(lambda t: logits["torch"], lambda t: logits["llama.cpp"], window)
    nll = {name: float(-log_softmax(lo[:-1])[np.arange(len(ids) - 1), ids[1:]].mean()) for name, lo in logits.items()}
    gap = abs(nll["torch"] - nll["llama.cpp"]) / max(nll["llama.cpp"], 1e-9)
    out = {"tokens": len(ids), "top1_agreement": report["top1_agreement"], "nll_torch": nll["torch"],
           "nll_llamacpp": nll["llama.cpp"], "nll_gap": gap}
    if report["top1_agreement"] < SOURCE_MIN_TOP1 or gap > SOURCE_MAX_NLL_GAP:
        raise VerificationError(
            f"the torch model transformers builds from {Path(path).name} disagrees with llama.cpp on the same file "
            f"(top-1 {report['top1_agreement']:.2f}, need >= {SOURCE_MIN_TOP1}; NLL {nll['torch']:.3f} vs "
            f"{nll['llama.cpp']:.3f}, gap {gap:.1%}, need <= {SOURCE_MAX_NLL_GAP:.0%}): its conversion is wrong for "
            "this architecture, so pruning it would be measured against the wrong model; use the original "
            "Hugging Face checkpoint instead"
        )
    return out


# ----------------------------------------------------------------------------------------------
# benchmark (no torch: run it in a fresh process for a clean peak RSS)


def bench_gguf(path, threads: int | None = None, prompt_tokens: int = 128, gen_tokens: int = 64, repeats: int = 3) -> dict:
    """llama.cpp CPU speed: prefill and decode tokens/s, time to first token, peak RSS (median of repeats).

    Prefill evaluates `prompt_tokens` real tokens in one batch; decode then evaluates `gen_tokens`
    greedy tokens one at a time; each repeat starts from an empty KV cache.
    """
    path = Path(path)
    if not path.is_file():
        raise EdgepruneError(f"GGUF file not found: {path}")
    if prompt_tokens < 1 or gen_tokens < 1 or repeats < 1:
        raise EdgepruneError("--prompt-tokens, --gen-tokens and --repeats must be at least 1")
    threads = resolve_threads(threads)
    llm = open_llama(path, n_ctx=prompt_tokens + gen_tokens, n_threads=threads, logits_all=False, n_batch=prompt_tokens)
    import llama_cpp

    text = llm.tokenize(verification_text().encode("utf-8"), add_bos=False)
    prompt = (text * (prompt_tokens // max(len(text), 1) + 1))[:prompt_tokens]
    n_vocab = llm.n_vocab()

    def last_logits_argmax() -> int:
        logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(n_vocab,))))

    llm.reset()
    llm.eval(prompt[:8])  # warm-up: page the weights in, build the compute graphs
    prefill, decode, ttft = [], [], []
    for _ in range(repeats):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        tok = last_logits_argmax()
        t1 = time.perf_counter()
        for _ in range(gen_tokens):
            llm.eval([tok])
            tok = last_logits_argmax()
        t2 = time.perf_counter()
        prefill.append(prompt_tokens / (t1 - t0))
        decode.append(gen_tokens / (t2 - t1))
        ttft.append(t1 - t0)
    arch = llm.metadata.get("general.architecture", "unknown")
    llm.close()
    return {
        "path": str(path),
        "arch": arch,
        "file_bytes": path.stat().st_size,
        "threads": threads,
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "prefill_tok_s": summarize(prefill),
        "decode_tok_s": summarize(decode),
        "ttft_s": summarize(ttft),
        "peak_rss_mb": peak_rss_mb(),
        "runtime": f"llama-cpp-python {llama_cpp.__version__}",
    }


def main(argv: list[str] | None = None) -> int:
    from edgeprune.exporters.common import bench_main

    return bench_main("python -m edgeprune.exporters.llamacpp", bench_gguf, argv)


if __name__ == "__main__":
    sys.exit(main())
