"""Pruned checkpoints: safetensors + config.json + plan.json, reloadable with identical logits.

Layout of a checkpoint directory:
  model.safetensors        the pruned weights (no pickles)
  config.json              the base model's config (any family), `num_hidden_layers` = kept layers,
                           plus `edgeprune_layer_shapes` and an `auto_map` to modeling_edgeprune.py
  modeling_edgeprune.py    subclasses of the transformers classes that build per-layer shapes
  plan.json                the PrunePlan (what was kept, from which base model)
  tokenizer files, generation_config.json

edgeprune reloads it with `load_pruned`, which never executes modeling_edgeprune.py (or any code
in the directory): it builds the transformers class of the config's model_type, resizes each layer
to `edgeprune_layer_shapes` and reads the safetensors weights. Plain transformers users may opt in
with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=...)` (the user's opt-in; edgeprune never sets it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file

from edgeprune import arch
from edgeprune.errors import EdgepruneError
from edgeprune.families import family_for_model_type
from edgeprune.model_files import LoadedModel, check_safetensors, dir_fingerprint, first_line, save_hf
from edgeprune.plan import PrunePlan

REMOTE_CODE = "modeling_edgeprune.py"


def save_pruned(model, tokenizer, plan: PrunePlan, out: Path) -> None:
    """Write a checkpoint into `out` (callers make `out` a temporary dir and rename it when done)."""

    out = Path(out)
    shapes = [s.to_dict() for s in arch.layer_shapes(model)]
    model.config.edgeprune_layer_shapes = shapes
    cls = "Edgeprune" + type(model).__name__.removeprefix("Edgeprune")
    model.config.auto_map = {"AutoModelForCausalLM": f"modeling_edgeprune.{cls}"}
    model.config.architectures = [cls]
    save_hf(model, tokenizer, out)
    shutil.copyfile(Path(__file__).with_name("hf_modeling.py"), out / REMOTE_CODE)
    plan.save(out / "plan.json")


def load_pruned(path: Path, device: str = "cpu", dtype: torch.dtype = torch.float32, spec: str | None = None):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    plan = PrunePlan.load(path / "plan.json")
    try:
        cfg_dict = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EdgepruneError(f"{path}/config.json is missing or not JSON ({type(exc).__name__})") from None
    shapes = cfg_dict.pop("edgeprune_layer_shapes", None)
    cfg_dict.pop("auto_map", None)
    model_type = cfg_dict.pop("model_type", "llama")
    family_for_model_type(model_type)  # one-line error for a config no family loads
    cfg_dict["architectures"] = [str(a).removeprefix("Edgeprune") for a in cfg_dict.get("architectures") or []]
    if not shapes:
        raise EdgepruneError(f"{path}/config.json has no edgeprune_layer_shapes: not an edgeprune checkpoint")
    if not isinstance(shapes, list) or len(shapes) != cfg_dict.get("num_hidden_layers") or not all(isinstance(s, dict) for s in shapes):
        raise EdgepruneError(f"{path}/config.json: edgeprune_layer_shapes does not list one shape per layer (num_hidden_layers)")
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise EdgepruneError(f"{weights} is missing: the checkpoint is incomplete")
    check_safetensors(weights)
    try:
        config = AutoConfig.for_model(model_type, **cfg_dict)
        # Built without storage (parameters on the meta device; buffers such as rotary tables are
        # real) and given the file's tensors as they are: one copy of the weights, not a random
        # init plus the loaded ones (a 1B checkpoint peaked at 2x its size, issue #15).
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)  # transformers' class, never the directory's modeling_edgeprune.py
            hd = arch.head_dim(model)
            for layer, shape in zip(arch.layers(model), shapes):
                arch.resize_layer(layer, shape, hd)
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:
        raise EdgepruneError(f"{path}/config.json does not describe a model edgeprune can build: {first_line(exc)}") from None
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors' own error type is not importable by a stable name
        raise EdgepruneError(f"{weights} cannot be read ({first_line(exc)}): re-create the checkpoint") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # a tensor of another shape than the config's
        raise EdgepruneError(f"{path} does not match its own shapes ({first_line(exc)})") from None
    del state
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise EdgepruneError(f"{path} does not match its own shapes (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if config.tie_word_embeddings:
        model.tie_weights()
    empty = [n for n, p in model.named_parameters() if p.is_meta]
    if empty:
        raise EdgepruneError(f"{path} does not match its own shapes (no weights for {empty[:3]})")
    model = model.to(device=device, dtype=dtype).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise EdgepruneError(f"cannot load the tokenizer in {path}: {first_line(exc)}") from None
    return LoadedModel(model, tokenizer, spec or str(path), str(path.resolve()), dir_fingerprint(path), plan=plan,
                       weights=str(path.resolve()))
