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


def artifact_quality(fmt: str, path, held: np.ndarray, text: np.ndarray, refs: dict, prompts: list[dict] | None = None,
                     n_threads: int | None = None) -> dict:
    """Everything the report shows for one artifact. `refs` = {"held": [...], "text": [...]} dense log-probs."""
    if fmt == "gguf":
        from edgeprune.exporters.llamacpp import llamacpp_logits_fn

        fn = llamacpp_logits_fn(path, n_ctx=max(held.shape[1], text.shape[1]), n_threads=n_threads)
    else:
        from edgeprune.exporters.onnx_runtime import ort_logits_fn

        fn = ort_logits_fn(path)
    out = {"held_out_self": window_quality(fn, held, refs.get("held")), "excerpt": window_quality(fn, text, refs.get("text"))}
    if getattr(fn, "llm", None) is not None:
        fn.llm.close()
    if prompts is not None and fmt == "gguf":
        out["answers"] = greedy_answers(path, prompts, n_threads=n_threads)
        out["factual_hits"], out["factual_prompts"] = factual_hits(out["answers"], prompts)
    return out


def reference_ppl(reference: list[np.ndarray], windows: np.ndarray) -> float:
    """Perplexity of the dense torch model on `windows`, from its log-probabilities."""
    nll = sum(-float(lp[np.arange(len(w) - 1), w[1:]].sum()) for lp, w in zip(reference, windows))
    return math.exp(nll / sum(len(w) - 1 for w in windows))
