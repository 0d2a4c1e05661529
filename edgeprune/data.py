"""Calibration tokens: self-generated (the default), a local .txt/.jsonl file, or a `datasets` id.

Self-generation is what an edge user without data has: the model samples its own text from BOS
(seeded, temperature 1, top-p 0.95), so calibration follows the distribution the model actually
produces. A file is tokenized once and `nsamples` windows of `seqlen` tokens are drawn at seeded
random offsets (the GPTQ/Wanda convention).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from edgeprune.errors import EdgepruneError
from edgeprune.evaluate import with_bos

SELF = "self"


def _file_text(path: Path) -> str:
    if not path.is_file():
        raise EdgepruneError(f"calibration file not found: {path}")
    raw = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise EdgepruneError(f"{path}:{n} is not JSON: each .jsonl line must be an object with a 'text' field") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise EdgepruneError(f"{path}:{n} has no string 'text' field")
            texts.append(row["text"])
        raw = "\n\n".join(texts)
    if not raw.strip():
        raise EdgepruneError(f"calibration file is empty: {path}")
    return raw


def _dataset_text(spec: str) -> str:
    try:
        import datasets
    except ImportError:
        raise EdgepruneError("calibrating on a datasets id needs the 'datasets' package: pip install 'edgeprune[data]'") from None
    name, _, split = spec.removeprefix("dataset:").partition("@")
    parts = name.split(":")
    try:
        ds = datasets.load_dataset(*parts, split=split or "train")
    except Exception as exc:
        raise EdgepruneError(f"cannot load dataset '{spec}' ({type(exc).__name__}); offline? use a local .txt file") from None
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    return "\n\n".join(ds[column])


def windows_from_text(tokenizer, text: str, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    if len(ids) < seqlen + 1:
        raise EdgepruneError(f"calibration text has {len(ids)} tokens, fewer than one {seqlen}-token sample: use more text or a smaller --seqlen")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seqlen, (nsamples,), generator=g)
    ids = torch.tensor(ids, dtype=torch.long)
    return with_bos(tokenizer, torch.stack([ids[s : s + seqlen] for s in starts.tolist()]))


TOP_P = 0.95  # self-generated text drops the unlikely tail that makes it degenerate
NUCLEUS_FIRST = 256  # candidates looked at before sorting the whole vocabulary


def nucleus(probs: torch.Tensor, p: float = TOP_P, first: int = NUCLEUS_FIRST) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities in descending order with everything past the top-p nucleus zeroed, their token
    ids). The nucleus is usually a few tokens: when the `first` most likely already hold p in every
    row, only they are sorted (a full sort of a 128k vocabulary was a quarter of each sampling step
    of a 1B model, issue #15); the rest of the row is zeros either way, so sampling draws the same."""
    if first < probs.shape[-1]:
        top, order = probs.topk(first, -1)
        if bool((top.sum(-1) >= p).all()):
            keep = top.cumsum(-1) - top < p
            full = torch.zeros_like(probs)
            full[:, :first] = top * keep
            return full, order
    ordered, order = probs.sort(-1, descending=True)
    return ordered * (ordered.cumsum(-1) - ordered < p), order


@torch.no_grad()
def self_generated(model, tokenizer, nsamples: int, seqlen: int, seed: int, batch_size: int = 64, progress=None) -> torch.Tensor:
    """Sample `nsamples` sequences of `seqlen` tokens from the model itself, starting at BOS."""
    device = next(model.parameters()).device
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for b in range(0, nsamples, batch_size):
        n = min(batch_size, nsamples - b)
        seq = torch.full((n, 1), bos, dtype=torch.long, device=device)
        cache = None
        step_input = seq
        for t in range(seqlen - 1):
            res = model(step_input, past_key_values=cache, use_cache=True)
            cache = res.past_key_values
            probs = torch.softmax(res.logits[:, -1].float(), -1).cpu()
            sorted_p, order = nucleus(probs)
            choice = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=g)
            step_input = order.gather(-1, choice).to(device)
            seq = torch.cat([seq, step_input], 1)
            if progress:
                progress(b * (seqlen - 1) + (t + 1) * n, nsamples * (seqlen - 1))
        out.append(seq.cpu())
    return torch.cat(out)


def _cached_self_generated(model, tokenizer, nsamples, seqlen, seed, fingerprint, progress):
    """Self-generated text is deterministic for (weights, n, length, seed): keep it as .npy (no pickles)."""
    import numpy as np

    from edgeprune.models import cache_dir

    path = cache_dir() / "calibration" / f"{fingerprint[:24]}-self-{nsamples}x{seqlen}-seed{seed}.npy"
    if fingerprint and path.is_file():
        try:
            cached = np.load(path, allow_pickle=False)
            if cached.shape != (nsamples, seqlen):
                raise ValueError(f"shape {cached.shape}")
        except (OSError, ValueError, EOFError):
            raise EdgepruneError(f"edgeprune's calibration cache file {path} is truncated or corrupt: delete it "
                                 f"(rm '{path}') and run again; it is regenerated") from None
        return torch.from_numpy(cached.astype(np.int64))
    ids = self_generated(model, tokenizer, nsamples, seqlen, seed, progress=progress)
    if fingerprint:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial.npy")
        np.save(tmp, ids.numpy().astype(np.int32), allow_pickle=False)
        tmp.replace(path)
    return ids


def calibration_ids(model, tokenizer, source: str = SELF, nsamples: int = 32, seqlen: int = 128, seed: int = 0,
                    progress=None, fingerprint: str = ""):
    """Return (ids [nsamples, seqlen], description, seconds) for `source` = 'self' | path | 'dataset:name[:config][@split]'.

    `fingerprint` (the model's weights hash) enables the cache of self-generated text."""
    if nsamples < 1 or seqlen < 8:
        raise EdgepruneError(f"--nsamples must be >= 1 and --seqlen >= 8 (got {nsamples}, {seqlen})")
    start = time.perf_counter()
    if source == SELF:
        ids = _cached_self_generated(model, tokenizer, nsamples, seqlen, seed, fingerprint, progress)
        kind = "self-generated (temperature 1, top-p 0.95, from BOS)"
    elif source.startswith("dataset:"):
        ids = windows_from_text(tokenizer, _dataset_text(source), nsamples, seqlen, seed)
        kind = f"datasets {source.removeprefix('dataset:')}"
    else:
        ids = windows_from_text(tokenizer, _file_text(Path(source)), nsamples, seqlen, seed)
        kind = f"file {Path(source).name}"
    desc = {"source": source, "kind": kind, "nsamples": nsamples, "seqlen": seqlen, "seed": seed, "tokens": int(ids.numel())}
    return ids, desc, time.perf_counter() - start
