"""The quality of what fit ships, measured on the artifact through the runtime that will run it.

A proxy (KL of the torch model on a few self-generated samples) may guide the search; the report
a user reads is this: for the shipped GGUF/ONNX and for the dense model exported the same ways,

* perplexity through llama.cpp / onnxruntime on held-out self-generated text and on the bundled
  real-text excerpt (WikiText-2 *validation*, never the test split, see edgeprune/data/README.md);
* top-1 agreement and KL with the dense torch model on the same windows;
* greedy answers to a small bundled prompt set (edgeprune/data/prompts.json), and how many of the
  factual ones contain an expected word, beside the dense model's answers.
"""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from edgeprune.evaluate import log_softmax, token_windows
from edgeprune.exporters.common import verification_text

TEXT_SEQLEN = 256  # the bundled excerpt is ~6k tokens: 16 windows of 256
TEXT_WINDOWS = 16
ANSWER_TOKENS = 24


def load_prompts() -> list[dict]:
    return json.loads(resources.files("edgeprune").joinpath("data/prompts.json").read_text(encoding="utf-8"))["prompts"]


def excerpt_windows(tokenizer, seqlen: int = TEXT_SEQLEN, n: int = TEXT_WINDOWS) -> np.ndarray:
    return token_windows(tokenizer, verification_text(), seqlen, max_windows=n).numpy()


class SavedLogprobs:
    """Per-window log-probabilities kept on disk, one .npy per window, read back one at a time: at a
    128k vocabulary 16 windows of 256 are 2.1 GB, more than a 1B model's pruned FFNs save."""

    def __init__(self, directory: Path):
        self.directory, self.n = Path(directory), 0

    def append(self, lp: np.ndarray) -> None:
        np.save(self.directory / f"window{self.n}.npy", lp, allow_pickle=False)
        self.n += 1

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return np.load(self.directory / f"window{i}.npy", allow_pickle=False)

    def __iter__(self):
        return (self[i] for i in range(self.n))


@torch.no_grad()
def dense_reference(model, windows: np.ndarray, directory: Path | None = None) -> list[np.ndarray] | SavedLogprobs:
    """Log-probabilities of the dense torch model on each window (the reference for agreement); with
    `directory` (an empty temporary one) kept there instead of in memory."""
    out = SavedLogprobs(directory) if directory is not None else []
    for w in windows:
        out.append(torch.log_softmax(model(torch.as_tensor(w, dtype=torch.long)[None], use_cache=False).logits[0].float(), -1).numpy())
    return out


def window_quality(logits_fn, windows: np.ndarray, reference: list[np.ndarray] | None = None) -> dict:
    """Perplexity (next-token NLL over every predicted position), and against `reference` the
    top-1 agreement and mean KL(reference || artifact), for one LogitsFn over `windows`."""
    nll = 0.0
    n = agree = 0
    kl = 0.0
    for i, w in enumerate(windows):
        lq = log_softmax(logits_fn(w))
        nll -= float(lq[np.arange(len(w) - 1), w[1:]].sum())
        n += len(w) - 1
        if reference is not None:
            lp = reference[i].astype(np.float64)
            agree += int((lp.argmax(-1) == lq.argmax(-1)).sum())
            kl += float((np.exp(lp) * (lp - lq)).sum())
    out = {"ppl": math.exp(nll / n), "tokens": int(n)}
    if reference is not None:
        positions = sum(len(w) for w in windows)
        out.update({"top1_vs_dense": agree / positions, "kl_vs_dense": kl / positions})
    return out


def greedy_answers(path, prompts: list[dict], max_tokens: int = ANSWER_TOKENS, n_threads: int | None = None) -> list[str]:
    """Greedy chat answers from llama.cpp (the GGUF's own chat template; plain Q/A text without one)."""
    from edgeprune.exporters.llamacpp import open_llama

    llm = open_llama(path, n_ctx=512, n_threads=n_threads, logits_all=False)
    has_template = bool(llm.metadata.get("tokenizer.chat_template"))
    answers = []
    for p in prompts:
        if has_template:
            r = llm.create_chat_completion(messages=[{"role": "user", "content": p["prompt"]}], temperature=0.0,
                                           max_tokens=max_tokens, seed=0)
            text = r["choices"][0]["message"]["content"]
        else:
            r = llm.create_completion(f"Question: {p['prompt']}\nAnswer:", temperature=0.0, max_tokens=max_tokens, seed=0)
            text = r["choices"][0]["text"]
        answers.append(" ".join(str(text).split()))
    llm.close()
    return answers


def factual_hits(answers: list[str], prompts: list[dict]) -> tuple[int, int]:
    """(answers containing an expected word, prompts that have expected words)."""
    scored = [(a, p["expect"]) for a, p in zip(answers, prompts) if p["expect"]]
    return sum(any(e.lower() in a.lower() for e in exp) for a, exp in scored), len(scored)


# GGUF metadata that names or describes a file without changing what llama.cpp computes from it
DESCRIPTIVE_KEYS = ("general.", "quantize.", "edgeprune.")
RUNTIME_GENERAL_KEYS = ("general.architecture", "general.alignment")


def gguf_content_key(path) -> str:
    """A digest of what llama.cpp computes from a GGUF: its tensors (names, shapes, types, data) and
    its metadata less the descriptive keys (names, file type, the importance matrix's provenance).
    Two files with one key give the same logits."""
    import hashlib

    import gguf

    reader = gguf.GGUFReader(str(path))
    h = hashlib.blake2b(digest_size=20)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or (name.startswith(DESCRIPTIVE_KEYS) and name not in RUNTIME_GENERAL_KEYS):
            continue  # GGUF.*: gguf-py's view of the header (version, counts), not metadata
        h.update(name.encode())
        for i in field.data:
            h.update(np.ascontiguousarray(field.parts[i]).tobytes())
    for t in reader.tensors:
        h.update(f"{t.name}:{t.tensor_type}:{list(t.shape)}".encode())
        h.update(memoryview(np.ascontiguousarray(t.data).reshape(-1).view(np.uint8)))
    return h.hexdigest()


class Scores:
    """Runtime scores of fit's artifacts, each measured once per content. The search scores the dense
    mixes and the finalists on the held-out text, the quality table scores what ships and the
    baselines on both texts; the shipped GGUF is its finalist exported again, and llama.cpp's q8_0
    ignores an importance matrix, so at 1B three of the table's runs repeated earlier ones at ~2 min
    each (issue #15). A GGUF is known by `gguf_content_key`; an ONNX directory is always run.

    windows / refs: {"held": [n, T] ids, "text": [m, T'] ids} and the dense torch log-probs of each."""

    def __init__(self, windows: dict[str, np.ndarray], refs: dict, n_threads: int | None = None):
        self.windows, self.refs, self.n_threads = windows, refs, n_threads
        self.n_ctx = max(w.shape[1] for w in windows.values())
        self._memo: dict[str, dict] = {}
        self._keys: dict[tuple, str] = {}  # (path, size, mtime) -> content key: a 1B GGUF is 1.3 GB to hash
        self.runs = 0  # windows sets actually run through a runtime

    def _key(self, path) -> str:
        st = Path(path).stat()
        at = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
        if at not in self._keys:
            self._keys[at] = gguf_content_key(path)
        return self._keys[at]

    def quality(self, fmt: str, path, which=("held", "text")) -> dict:
        """{"held": window_quality, "text": window_quality} (those in `which`) of one artifact."""
        from edgeprune.artifacts import runtime_logits_fn

        key = self._key(path) if fmt == "gguf" else None
        known = self._memo.setdefault(key, {}) if key else {}
        missing = [w for w in which if w not in known]
        if missing:
            fn = runtime_logits_fn(fmt, path, self.n_ctx, self.n_threads)
            try:
                for w in missing:
                    known[w] = window_quality(fn, self.windows[w], self.refs.get(w))
                    self.runs += 1
            finally:
                if getattr(fn, "llm", None) is not None:
                    fn.llm.close()
        return {w: dict(known[w]) for w in which}  # copies: callers annotate their own

    def artifact(self, fmt: str, path, prompts: list[dict] | None = None) -> dict:
        """Everything the report shows for one artifact: both texts, and greedy answers for a GGUF."""
        q = self.quality(fmt, path)
        out = {"held_out_self": q["held"], "excerpt": q["text"]}
        if prompts is not None and fmt == "gguf":
            out["answers"] = greedy_answers(path, prompts, n_threads=self.n_threads)
            out["factual_hits"], out["factual_prompts"] = factual_hits(out["answers"], prompts)
        return out


def reference_ppl(reference: list[np.ndarray], windows: np.ndarray) -> float:
    """Perplexity of the dense torch model on `windows`, from its log-probabilities."""
    nll = sum(-float(lp[np.arange(len(w) - 1), w[1:]].sum()) for lp, w in zip(reference, windows))
    return math.exp(nll / sum(len(w) - 1 for w in windows))
