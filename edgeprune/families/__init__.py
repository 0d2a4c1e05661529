"""The architecture seam: what is specific to a model family, behind one small interface.

A `Family` says how to reach a decoder's parts (layers, the linear weights by role, the norms),
what its GGUF architecture and tensor names are, and which per-layer shapes each export target
can hold. The rest of edgeprune asks the family instead of spelling out module names. Llama
(SmolLM2, TinyLlama, Llama 3.x, Mistral-shaped models) is the first family (`llama.py`); a new
family is one file here plus its entry in `FAMILIES`, the way llama.cpp keeps one architecture
per file in src/models/.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeprune.errors import EdgepruneError

# GGUF roles of a decoder layer's linear weights, in the order llama.cpp's quantizer walks them.
LINEAR_ROLES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # transformers `model_type`s this family loads
    gguf_archs: tuple[str, ...]  # GGUF `general.architecture`s a user's file may have
    linears: dict  # GGUF role -> (submodule, attribute) inside one decoder layer
    norms: dict  # GGUF name -> attribute of a decoder layer
    uniform_arch: str  # GGUF architecture for models whose layers all share one shape
    per_layer_arch: str | None  # GGUF architecture that builds per-layer widths and heads (None: none can)
    examples: str = ""

    def layers(self, model):
        return model.model.layers

    def linear(self, layer, role: str):
        part, attr = self.linears[role]
        return getattr(getattr(layer, part), attr)

    def gguf_arch(self, per_layer: bool) -> str:
        """The GGUF architecture an export of these shapes needs (the ONNX exporter holds anything)."""
        if not per_layer:
            return self.uniform_arch
        if self.per_layer_arch is None:
            raise EdgepruneError(f"llama.cpp builds every {self.name} layer from layer 0's shape: prune with uniform widths "
                                 "and head counts for GGUF (ONNX holds per-layer shapes)")
        return self.per_layer_arch


def _families() -> tuple[Family, ...]:
    from edgeprune.families.llama import LLAMA

    return (LLAMA,)


FAMILIES = _families()


def family_for_model_type(model_type: str) -> Family:
    for f in FAMILIES:
        if model_type in f.model_types:
            return f
    known = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise EdgepruneError(f"unsupported architecture '{str(model_type)[:40]}': edgeprune prunes {known} "
                         f"({'; '.join(f.examples for f in FAMILIES)})")


def family_for_gguf_arch(arch: str) -> Family:
    for f in FAMILIES:
        if arch in f.gguf_archs:
            return f
    known = ", ".join(a for f in FAMILIES for a in f.gguf_archs)
    hint = " (an edgeprune export; load the pruned checkpoint directory instead)" if arch == "deci" else ""
    raise EdgepruneError(f"unsupported GGUF architecture '{str(arch)[:40]}'{hint}: edgeprune prunes {known} models")


def family_of(model) -> Family:
    return family_for_model_type(getattr(model.config, "model_type", "llama"))
