"""The architecture seam: what is specific to a model family, behind one small interface.

A `Family` says how to reach a decoder's parts (layers, the linear weights by role, the norms),
what its GGUF architectures and tensor names are, and which per-layer shapes each export target
can hold. The rest of edgeprune asks the family instead of spelling out module names. One family
per file here, plus its entry in `_families()`, the way llama.cpp keeps one architecture per file
in src/models/:

  llama.py    Llama, SmolLM2, TinyLlama, Llama 3.x (rope scaling)   GGUF llama, per-layer deci
  mistral.py  Mistral (sliding window unused by llama.cpp's llama)   GGUF llama, per-layer deci
  qwen2.py    Qwen2 / Qwen2.5 (q/k/v biases)                         GGUF qwen2, per-layer deci
  qwen3.py    Qwen3 (per-head q/k RMSNorm)                           GGUF qwen3, uniform only
  gemma3.py   Gemma 3 text (four norms, GeGLU, sqrt(d) embedding     GGUF gemma3, uniform only
              scale, sliding/global layers with two rotary bases)

All of them are transformers classes with the same module names (model.model.layers,
self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj), so scoring, pruning and recovery are shared;
what differs is the norm layout, the activation, the rotary layout, the biases a runtime's graph
reads, and whether that graph can build each layer at its own shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgeprune.errors import EdgepruneError

# GGUF roles of a decoder layer's linear weights, in the order llama.cpp's quantizer walks them.
LINEAR_ROLES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
_LINEARS = {
    "attn_q": ("self_attn", "q_proj"), "attn_k": ("self_attn", "k_proj"), "attn_v": ("self_attn", "v_proj"),
    "attn_output": ("self_attn", "o_proj"),
    "ffn_gate": ("mlp", "gate_proj"), "ffn_up": ("mlp", "up_proj"), "ffn_down": ("mlp", "down_proj"),
}
# Biases by GGUF role name; llama.cpp's llama/deci graphs read all of these, others fewer.
ALL_BIASES = frozenset(("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"))
QKV_BIASES = frozenset(("attn_q", "attn_k", "attn_v"))
# GGUF architectures whose RoPE rotates the two halves of each head (HF's rotate_half, NEOX
# style): Q/K rows are written as they are. llama and deci rotate adjacent pairs (rows permuted).
NEOX_ROPE_ARCHS = frozenset(("qwen2", "qwen3", "gemma3"))
# The Llama block's two pre-norms (GGUF name -> decoder layer attribute); Gemma 3 has four.
PRE_NORMS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # transformers `model_type`s this family loads
    gguf_archs: tuple[str, ...]  # GGUF `general.architecture`s a user's file may have
    uniform_arch: str  # GGUF architecture for models whose layers all share one shape
    per_layer_arch: str | None  # GGUF architecture that builds per-layer widths and heads (None: none can)
    norms: dict = field(default_factory=lambda: dict(PRE_NORMS))  # GGUF norm name -> decoder layer attribute, in block order
    uniform_biases: frozenset = ALL_BIASES  # biases the uniform architecture's llama.cpp graph reads
    qk_norm: bool = False  # self_attn.q_norm / k_norm (per-head RMSNorm before RoPE)
    norm_offset: float = 0.0  # RMSNorm scales by (offset + w): Gemma stores w - 1
    activation: str = "silu"  # the gate's activation: silu (SwiGLU) or gelu_tanh (GeGLU)
    embed_scale: bool = False  # embeddings multiplied by sqrt(hidden) (Gemma)
    sliding_layers: bool = False  # some layers attend within a window (config.layer_types)
    uniform_full_heads: bool = False  # the uniform graph sizes q and o as hidden x hidden (qwen2): no head pruning there
    examples: str = ""
    linears: dict = field(default_factory=lambda: dict(_LINEARS))  # GGUF role -> (submodule, attribute)

    def layers(self, model):
        return model.model.layers

    def linear(self, layer, role: str):
        part, attr = self.linears[role]
        return getattr(getattr(layer, part), attr)

    def norm(self, layer, name: str):
        return getattr(layer, self.norms[name])

    @property
    def per_layer_gguf(self) -> bool:
        """Whether a GGUF of this family can hold per-layer FFN widths and head counts."""
        return self.per_layer_arch is not None

    def gguf_reads(self, biases) -> bool:
        """Whether some GGUF architecture of this family reads all of `biases` (GGUF role names)."""
        return self.per_layer_arch is not None or set(biases) <= set(self.uniform_biases)

    def gguf_arch(self, per_layer: bool, biases: frozenset = frozenset(), heads_pruned: bool = False) -> str:
        """The GGUF architecture an export of these shapes and biases needs (ONNX holds anything)."""
        extra = set(biases) - set(self.uniform_biases)
        per_layer = per_layer or (heads_pruned and self.uniform_full_heads)
        if not per_layer and not extra:
            return self.uniform_arch
        if self.per_layer_arch is None:
            why = ("builds every layer from layer 0's shape" if per_layer
                   else f"reads no {', '.join(sorted(extra))} bias (FLAP compensation)")
            fix = ("prune with uniform widths and head counts (--shapes uniform)" if per_layer
                   else "prune without bias recovery")
            raise EdgepruneError(f"llama.cpp's {self.uniform_arch} graph {why}: {fix} for GGUF, or export ONNX")
        return self.per_layer_arch

    def rope_permuted(self, gguf_arch: str) -> bool:
        return gguf_arch not in NEOX_ROPE_ARCHS


def _families() -> tuple[Family, ...]:
    from edgeprune.families.gemma3 import GEMMA3
    from edgeprune.families.llama import LLAMA
    from edgeprune.families.mistral import MISTRAL
    from edgeprune.families.qwen2 import QWEN2
    from edgeprune.families.qwen3 import QWEN3

    return (LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA3)


FAMILIES = _families()
MODEL_TYPES = tuple(t for f in FAMILIES for t in f.model_types)
GGUF_ARCHS = tuple(a for f in FAMILIES for a in f.gguf_archs)


def family_named(name: str) -> Family:
    for f in FAMILIES:
        if f.name == name:
            return f
    raise EdgepruneError(f"unknown model family '{str(name)[:40]}': one of {', '.join(f.name for f in FAMILIES)}")


def family_for_model_type(model_type: str) -> Family:
    for f in FAMILIES:
        if model_type in f.model_types:
            return f
    raise EdgepruneError(f"unsupported architecture '{str(model_type)[:40]}': edgeprune prunes {', '.join(MODEL_TYPES)} "
                         f"({'; '.join(f.examples for f in FAMILIES)})")


def family_for_gguf_arch(arch: str) -> Family:
    for f in FAMILIES:
        if arch in f.gguf_archs:
            return f
    hint = " (an edgeprune export; load the pruned checkpoint directory instead)" if arch == "deci" else ""
    raise EdgepruneError(f"unsupported GGUF architecture '{str(arch)[:40]}'{hint}: edgeprune prunes {', '.join(GGUF_ARCHS)} models")


def family_of(model) -> Family:
    return family_for_model_type(getattr(model.config, "model_type", "llama"))
