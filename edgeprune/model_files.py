"""Model files and what a load returns: fingerprints, safetensors checks, saving a Hugging Face
directory. Shared by the loader (models.py) and edgeprune's checkpoints (checkpoint.py), which
therefore do not import each other."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edgeprune.errors import EdgepruneError


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    spec: str  # what the user typed
    source: str  # resolved path or hub id
    fingerprint: str  # sha256 of the source weights (file hash for GGUF, files for HF dirs)
    plan: object | None = None  # PrunePlan when the model is an edgeprune checkpoint
    info: dict = field(default_factory=dict)
    weights: str | None = None  # the checked local directory the weights came from (models.reload reads it again)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def dir_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.suffix in (".safetensors", ".json") and f.name != "report.json":
            h.update(f.name.encode())
            h.update(sha256_file(f).encode())
    return h.hexdigest()


def save_tokenizer(tokenizer, out: Path) -> None:
    # A tokenizer read from a GGUF names the GGUF as its vocab file; saving would copy the whole
    # model file as tokenizer.model. tokenizer.json carries everything the fast tokenizer needs.
    if getattr(tokenizer, "vocab_file", None):
        tokenizer.vocab_file = None
    tokenizer.save_pretrained(out)
    (out / "tokenizer.model").unlink(missing_ok=True)


def save_hf(model, tokenizer, out: Path) -> None:
    """save_pretrained without the GGUF quantizer leftovers that make transformers refuse to save."""
    for attr in ("quantization_config",):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(tokenizer, out)


def check_safetensors(path: Path) -> None:
    """A safetensors file's header must parse and its tensors must lie inside the file (a truncated
    or corrupt file fails here with one line, not deep inside the loader)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n <= 0 or 8 + n > size or n > 100 << 20:
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
        end = 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, stop = info["data_offsets"]
            if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop):
                raise ValueError("bad offsets")
            end = max(end, stop)
        if 8 + n + end > size:
            raise ValueError("truncated")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise EdgepruneError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {str(exc)[:60]}): "
                             "it is truncated or corrupt; re-download or re-export it") from None


def first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:160]
