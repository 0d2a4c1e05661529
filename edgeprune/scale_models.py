"""Random-weight models with the real shapes of small LLMs, built offline, for scaling measurements.

What edgeprune costs in time and memory depends on a model's shapes, not on its weight values, so
`benchmarks/scale.py` measures calibration, pruning, export and `fit` on random weights in the
exact shapes of released models. `SHAPES` holds those shapes as transformers config arguments,
written from the values in each model's published config.json (the numbers are facts about the
released models; nothing else of theirs is used). `smoke` is a tiny Llama for tests.

`build_random_model(name, out)` writes a Hugging Face directory: `config.json`,
`generation_config.json`, fp32 safetensors (one file, or shards of at most 2 GiB with
`model.safetensors.index.json`) and a tokenizer with exactly `vocab_size` entries: edgeprune's tiny
byte-level BPE with ChatML specials (edgeprune.testing) padded with special added tokens
`<|extra_N|>`, as Llama 3's reserved special tokens pad its vocabulary, so every id the model can
produce decodes, the GGUF's token list holds no placeholder rows, and llama.cpp and the HF tokenizer
agree. The weights are generated and written one tensor at a time (the model is never materialized:
peak memory is the largest tensor, 1.6 GB for Llama-3.2-3B's embedding). `cached_model(name)`
builds once into edgeprune's cache (`cache_dir()/scale/NAME`), atomically, and reuses it.

Weights: every matrix and bias N(0, init_std = 0.02) (transformers' default initializer), norms 1,
except two values chosen so that the export's verification is not a coin toss. With 0.02 throughout,
a random model's next-token distribution over 49k-152k tokens is nearly flat, and a Q4_0 GGUF agrees
with torch on about half of the argmaxes (0.48 on SmolLM2-135M's shapes, under the exporter's
sanity floor of 0.5). So the model copies: the embedding (N(0, embed_std)) is strong enough in the
residual stream that the input token's own logit stands `copy_margin` = 10 standard deviations above
the others (the highest of 128k others lies near 4.8), whatever the width and depth, and the final
norm's weight scales the logits so that this winning logit is `top_logit` = 30 (perplexities stay
finite). Both come from the shapes: the decoder layers' summed output has a standard deviation
`residual_std(config)` (each pre-norm layer sees unit-RMS input, so each adds the same amount), and
embed_std = margin * that / sqrt(hidden - margin^2) (an upper bound on the layers' part: measured on
SmolLM2-135M's shapes the input token's logit is 15 standard deviations above the rest on text and 8.4
on one token repeated, and its Q4_0 GGUF agrees on every argmax). The costs measured on such a model are those of
any model of its shapes; its text is not language.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch

# Bump when what a build writes changes, so cached builds are rebuilt.
RECIPE_VERSION = 1
MAX_SHARD_BYTES = 2 << 30
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

# name -> transformers config class, published source and parameter count, config kwargs.
SHAPES: dict[str, dict] = {
    "smoke": {
        "config_class": "LlamaConfig", "source": "a tiny Llama for tests (not a released model)", "published_params": None,
        "config": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=32, vocab_size=1024, tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-5,
                       max_position_embeddings=2048),
    },
    "smollm2-135m": {
        "config_class": "LlamaConfig", "source": "HuggingFaceTB/SmolLM2-135M", "published_params": 134.5e6,
        "config": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                       head_dim=64, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5,
                       max_position_embeddings=8192),
    },
    "smollm2-360m": {
        "config_class": "LlamaConfig", "source": "HuggingFaceTB/SmolLM2-360M", "published_params": 362e6,
        "config": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5,
                       head_dim=64, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5,
                       max_position_embeddings=8192),
    },
    "qwen2.5-0.5b": {
        # Qwen2 always has q/k/v biases (and none on o_proj): transformers' Qwen2Attention builds them.
        "config_class": "Qwen2Config", "source": "Qwen/Qwen2.5-0.5B", "published_params": 494e6,
        "config": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                       vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6,
                       max_position_embeddings=32768, use_sliding_window=False, sliding_window=32768, max_window_layers=24),
    },
    "llama-3.2-1b": {
        "config_class": "LlamaConfig", "source": "meta-llama/Llama-3.2-1B", "published_params": 1.24e9,
        "config": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=64, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0, rms_norm_eps=1e-5,
                       max_position_embeddings=131072, rope_scaling=_LLAMA3_ROPE),
    },
    "llama-3.2-3b": {
        "config_class": "LlamaConfig", "source": "meta-llama/Llama-3.2-3B", "published_params": 3.21e9,
        "config": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
                       head_dim=128, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0, rms_norm_eps=1e-5,
                       max_position_embeddings=131072, rope_scaling=_LLAMA3_ROPE),
    },
}


def names() -> list[str]:
    return list(SHAPES)


def _shape(name: str) -> dict:
    from edgeprune.errors import EdgepruneError

    if name not in SHAPES:
        raise EdgepruneError(f"unknown scale model '{name}': one of {', '.join(SHAPES)}")
    return SHAPES[name]


def make_config(name: str, tokenizer=None, **overrides):
    """The transformers config of `name` (no weights). With a tokenizer, its special ids are set."""
    import transformers

    shape = _shape(name)
    kwargs = {**copy.deepcopy(shape["config"]), "initializer_range": 0.02, **overrides}
    if tokenizer is not None:
        kwargs.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    cfg = getattr(transformers, shape["config_class"])(**kwargs)
    cfg.architectures = [shape["config_class"].replace("Config", "ForCausalLM")]
    return cfg


def meta_model(config):
    """The model of `config` on the meta device: names and shapes, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def param_counts(config) -> dict:
    """Parameters of `config`'s model (tied weights once): total, the embedding (plus an untied
    output projection) and the rest, with the fp32 size in bytes."""
    model = meta_model(config)
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    embedding = emb.numel()
    head = model.get_output_embeddings()
    if head is not None and head.weight is not emb:
        embedding += head.weight.numel()
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding, "fp32_bytes": 4 * total}


def padded_tokenizer(vocab_size: int):
    """edgeprune.testing's tiny byte-level BPE (ChatML specials) padded with special added tokens
    `<|extra_N|>` to exactly `vocab_size` entries (ids 0 .. vocab_size - 1, no gaps)."""
    from tokenizers import AddedToken

    from edgeprune.testing import tiny_tokenizer

    base = 384 if vocab_size >= 384 else vocab_size
    tok = tiny_tokenizer(base)
    n = len(tok)
    if n > vocab_size:
        raise ValueError(f"the tiny tokenizer has {n} entries, more than vocab_size {vocab_size}")
    tok.add_tokens([AddedToken(f"<|extra_{i}|>", special=True, normalized=False) for i in range(n, vocab_size)], special_tokens=True)
    if len(tok) != vocab_size or sorted(tok.get_vocab().values()) != list(range(vocab_size)):
        raise RuntimeError(f"padded tokenizer has {len(tok)} entries, not ids 0..{vocab_size - 1}")
    return tok


def _tensors(model, config):
    """(name, shape) of what the checkpoint stores, in state-dict order, tied weights once."""
    seen, out = set(), []
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        out.append((name, tuple(t.shape)))
    return out


def residual_std(config, init_std: float = 0.02) -> float:
    """Standard deviation per entry of what the decoder layers add to the residual stream, for
    weights N(0, init_std): each pre-norm layer sees unit-RMS input, so q/k/v/gate/up outputs have
    std s = init_std * sqrt(hidden); the FFN adds init_std * sqrt(ffn * E[silu(g)^2] * s^2), g ~ N(0, s^2),
    attention at most init_std * sqrt(heads * head_dim) * s (all positions alike: no averaging out);
    layers add independently."""
    d = config.hidden_size
    hd = getattr(config, "head_dim", None) or d // config.num_attention_heads
    s = init_std * math.sqrt(d)
    g = torch.linspace(-10 * s, 10 * s, 20001, dtype=torch.float64)
    pdf = torch.exp(-0.5 * (g / s) ** 2)
    silu2 = float(((g * torch.sigmoid(g)) ** 2 * pdf).sum() / pdf.sum())
    ffn = init_std * math.sqrt(config.intermediate_size * silu2 * s * s)
    attn = init_std * math.sqrt(config.num_attention_heads * hd) * s
    return math.sqrt(config.num_hidden_layers * (ffn ** 2 + attn ** 2))


def weight_scales(config, init_std: float = 0.02, copy_margin: float = 10.0, top_logit: float = 30.0) -> dict:
    """The embedding's std and the final norm's weight that make the input token's logit
    `copy_margin` standard deviations above the other logits and equal to `top_logit` (module docstring)."""
    d, r = config.hidden_size, copy_margin
    if d <= r * r:
        raise ValueError(f"hidden size {d} is too small for a copy margin of {r}")
    sn = residual_std(config, init_std)
    se = r * sn / math.sqrt(d - r * r)
    return {"init_std": init_std, "residual_std": sn, "embed_std": se, "final_norm": top_logit / (r * math.sqrt(d) * se),
            "copy_margin": copy_margin, "top_logit": top_logit}


def _roles(model) -> dict:
    """State-dict name -> 'embed' / 'final_norm' for the tensors that get their own values."""
    emb, final = model.get_input_embeddings().weight, model.base_model.norm.weight
    roles = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if t is emb or (name == "lm_head.weight" and model.config.tie_word_embeddings):
            roles[name] = "embed"
        elif t is final:
            roles[name] = "final_norm"
    head = model.get_output_embeddings()
    for name, t in model.state_dict(keep_vars=True).items():
        if head is not None and t is head.weight and name not in roles:
            roles[name] = "embed"  # an untied output projection: same scale (the copy margin assumes tied)
    return roles


def _fill(name: str, shape: tuple, gen: torch.Generator, scales: dict, roles: dict) -> torch.Tensor:
    t = torch.empty(shape, dtype=torch.float32)
    role = roles.get(name)
    if role == "embed":
        return t.normal_(0.0, scales["embed_std"], generator=gen)
    if role == "final_norm":
        return t.fill_(scales["final_norm"])
    if t.ndim == 1 and "norm" in name:
        return t.fill_(1.0)
    return t.normal_(0.0, scales["init_std"], generator=gen)


def _write_safetensors(path: Path, entries: list[tuple[str, tuple]], make) -> None:
    """A safetensors file written tensor by tensor: the header (offsets known from the shapes), then
    each tensor's bytes as `make(name, shape)` produces it, freed before the next one."""
    header, offset = {}, 0
    for name, shape in entries:
        n = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape in entries:
            t = make(name, shape)
            f.write(memoryview(t.numpy()).cast("B"))
            del t


def _shards(entries, max_bytes: int) -> list[list]:
    shards, cur, size = [], [], 0
    for e in entries:
        n = 4 * math.prod(e[1])
        if cur and size + n > max_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(e)
        size += n
    if cur:
        shards.append(cur)
    return shards


def recipe(name: str, seed: int = 0, init_std: float = 0.02, copy_margin: float = 10.0, top_logit: float = 30.0) -> dict:
    """What a build depends on (a cached build is reused only when this matches)."""
    return {"version": RECIPE_VERSION, "name": name, "seed": seed, "init_std": init_std, "copy_margin": copy_margin,
            "top_logit": top_logit, "config_class": SHAPES[name]["config_class"], "config": SHAPES[name]["config"]}


def _write_model(name: str, out: Path, seed: int, init_std: float, copy_margin: float, top_logit: float, max_shard_bytes: int) -> dict:
    from transformers import GenerationConfig

    t0 = time.perf_counter()
    tokenizer = padded_tokenizer(SHAPES[name]["config"]["vocab_size"])
    config = make_config(name, tokenizer)
    model = meta_model(config)
    entries = _tensors(model, config)
    scales = weight_scales(config, init_std, copy_margin, top_logit)
    roles = _roles(model)
    gen = torch.Generator().manual_seed(seed)
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    shards = _shards(entries, max_shard_bytes)
    make = lambda n, shape: _fill(n, shape, gen, scales, roles)  # noqa: E731
    if len(shards) == 1:
        _write_safetensors(out / "model.safetensors", entries, make)
    else:
        weight_map = {}
        for k, shard in enumerate(shards, 1):
            fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            _write_safetensors(out / fname, shard, make)
            weight_map.update({n: fname for n, _ in shard})
        total = sum(4 * math.prod(shape) for _, shape in entries)
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    tokenizer.save_pretrained(out)
    info = {**recipe(name, seed, init_std, copy_margin, top_logit), "scales": scales, "params": param_counts(config),
            "shards": len(shards), "build_s": time.perf_counter() - t0, "source": SHAPES[name]["source"]}
    (out / "scale_model.json").write_text(json.dumps(info, indent=1) + "\n")  # last: marks a complete build
    return info


def build_random_model(name: str, out_dir, seed: int = 0, init_std: float = 0.02, copy_margin: float = 10.0, top_logit: float = 30.0,
                       max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write a random-weight Hugging Face directory of `name`'s shapes to `out_dir` atomically
    (built under a temporary name beside it, renamed when complete; an existing `out_dir` is replaced)."""
    from edgeprune import outputs

    _shape(name)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = outputs.temp_dir(out)
    try:
        _write_model(name, tmp, seed, init_std, copy_margin, top_logit, max_shard_bytes)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it owner-only
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        outputs.unregister(tmp)
    return out


def cached_path(name: str, seed: int = 0) -> Path:
    from edgeprune.models import cache_dir

    return cache_dir() / "scale" / (name if seed == 0 else f"{name}-seed{seed}")


def build_info(path) -> dict | None:
    try:
        return json.loads((Path(path) / "scale_model.json").read_text())
    except (OSError, ValueError):
        return None


def cached_model(name: str, seed: int = 0, progress=None, **weights) -> Path:
    """`name`'s random model in edgeprune's cache, built on first use (reused while its recipe matches).
    `weights`: init_std, copy_margin, top_logit (build_random_model's)."""
    _shape(name)
    path = cached_path(name, seed)
    info = build_info(path)
    want = recipe(name, seed, **weights)
    if info is not None and all(info.get(k) == v for k, v in want.items()):
        return path
    if progress:
        progress(f"building random {name} ({SHAPES[name]['source']} shapes) into {path}")
    return build_random_model(name, path, seed, **weights)
