"""Perplexity, and agreement between two models (or a model and an exported artifact).

Protocol (printed with every figure): the text file is read as UTF-8 with CRLF -> LF, tokenized
once with no special tokens, cut into non-overlapping windows of `seqlen` tokens (the tail that
does not fill a window is dropped); each window is scored on its last `seqlen - 1` tokens and the
perplexity is exp(mean NLL over all scored tokens).

Agreement compares logits position by position: top-1 agreement (same argmax) and the mean
KL(reference || candidate). Any backend that can turn a 1-D token array into a [T, vocab] float
array (torch, llama.cpp, onnxruntime) plugs in as a `LogitsFn`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edgeprune.errors import EdgepruneError

LogitsFn = Callable[[np.ndarray], np.ndarray]  # int64 tokens [T] -> float32 logits [T, vocab]


def protocol(seqlen: int) -> str:
    return (
        f"non-overlapping {seqlen}-token windows, text CRLF->LF, tokenized once without special tokens, "
        f"each window scored on its last {seqlen - 1} tokens, ppl = exp(mean NLL)"
    )


def load_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise EdgepruneError(f"text file not found: {path}")
    text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
    if not text.strip():
        raise EdgepruneError(f"text file is empty: {path}")
    return text


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer starts every text with BOS (Gemma, Llama 3; SmolLM2 does not)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]


def with_bos(tokenizer, windows: torch.Tensor) -> torch.Tensor:
    """Each window's first token replaced by BOS where the model expects one, as llama.cpp's
    perplexity tool does: a model trained always to see BOS first is lost without it."""
    if adds_bos(tokenizer):
        windows = windows.clone()
        windows[:, 0] = tokenizer.bos_token_id
    return windows


def token_windows(tokenizer, text: str, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    if seqlen < 2:
        raise EdgepruneError(f"--seqlen must be at least 2, got {seqlen}")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    n = len(ids) // seqlen
    if n == 0:
        raise EdgepruneError(f"the text has {len(ids)} tokens, fewer than one {seqlen}-token window")
    if max_windows:
        n = min(n, max_windows)
    return with_bos(tokenizer, torch.tensor(ids[: n * seqlen], dtype=torch.long).view(n, seqlen))


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, progress=None) -> dict:
    device = next(model.parameters()).device
    nll_sum, count = 0.0, 0
    start = time.perf_counter()
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size].to(device)
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        nll_sum += nll.item()
        count += batch[:, 1:].numel()
        if progress:
            progress(min(i + batch_size, len(windows)), len(windows))
    seconds = time.perf_counter() - start
    return {
        "perplexity": math.exp(nll_sum / count),
        "mean_nll": nll_sum / count,
        "windows": int(len(windows)),
        "seqlen": int(windows.shape[1]),
        "scored_tokens": int(count),
        "seconds": seconds,
        "tokens_per_s": windows.numel() / seconds,
        "protocol": protocol(int(windows.shape[1])),
    }


def torch_logits_fn(model) -> LogitsFn:
    device = next(model.parameters()).device

    @torch.no_grad()
    def fn(tokens: np.ndarray) -> np.ndarray:
        ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64), device=device)[None]
        return model(ids, use_cache=False).logits[0].float().cpu().numpy()

    return fn


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (runtime logits arrive as float32)."""
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare_logits(reference: LogitsFn, candidate: LogitsFn, windows: torch.Tensor | np.ndarray) -> dict:
    """Top-1 agreement, mean KL(ref || cand) and max |Δlogit| over every position of `windows`."""
    agree = total = 0
    kl_sum = 0.0
    max_abs = 0.0
    for w in np.asarray(windows):
        ref, cand = reference(w), candidate(w)
        if ref.shape != cand.shape:
            raise EdgepruneError(f"logit shapes differ: reference {ref.shape} vs candidate {cand.shape}")
        agree += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        total += ref.shape[0]
        lp, lq = log_softmax(ref), log_softmax(cand)
        kl_sum += float((np.exp(lp) * (lp - lq)).sum())
        max_abs = max(max_abs, float(np.abs(ref - cand).max()))
    return {
        "top1_agreement": agree / total,
        "mean_kl": kl_sum / total,
        "max_abs_logit_diff": max_abs,
        "positions": total,
    }
