"""Mistral: the Llama block under another model_type. llama.cpp converts it to the `llama`
architecture (its graph has no sliding window, which only matters past the window: 4096 tokens
for Mistral 7B v0.1, none in later releases), per-layer shapes to `deci`."""

from edgeprune.families import Family

MISTRAL = Family(
    name="mistral",
    model_types=("mistral",),
    gguf_archs=(),  # a Mistral GGUF says `llama`: it loads through the Llama family
    uniform_arch="llama",
    per_layer_arch="deci",
    examples="Mistral",
)
