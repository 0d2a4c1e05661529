"""Tiny random decoders of every family and a real byte-level BPE tokenizer, built offline in about a second.

Unit tests use these; integration tests use the real SmolLM2 (host measurement builds its own
random models in edgeprune.hostperf.shapes).
The tokenizer mirrors SmolLM2's layout (digits split, byte-level BPE, ChatML special tokens) so
the GGUF writer's tokenizer path is exercised the same way, just with a small vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import torch

_CORPUS = """\
The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest
structure in Paris. Its base is square, measuring 125 metres on each side. During its construction,
the Eiffel Tower surpassed the Washington Monument to become the tallest man-made structure in the
world, a title it held for 41 years until the Chrysler Building in New York City was finished in 1930.
The capital of France is Paris. The capital of Germany is Berlin. Edge devices run small language
models on a few watts; pruning removes channels, heads and whole layers so that the model fits.
Robert Boulter is an English film, television and theatre actor. He had a guest-starring role on the
television series The Bill in 2000. This was followed by a starring role in the play Herons written by
Simon Stephens, which was performed in 2001 at the Royal Court Theatre.
"""

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tiny_tokenizer(vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# Per-family config classes and the extras that make each family's own parts non-trivial.
FAMILY_CONFIGS = {
    "llama": "LlamaConfig", "llama3": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config",
    "qwen3": "Qwen3Config", "gemma3": "Gemma3TextConfig",
}
TINY_FAMILIES = tuple(FAMILY_CONFIGS)  # "llama3" is Llama with Llama 3.x rope scaling


def _family_extras(family: str, layers: int, heads: int, hidden: int) -> dict:
    if family == "llama3":
        return {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}
    if family == "mistral":
        return {"sliding_window": None}
    if family == "qwen2":
        return {"use_sliding_window": False, "rope_theta": 1000000.0}
    if family == "qwen3":
        return {"use_sliding_window": False, "attention_bias": False, "rope_theta": 1000000.0}
    if family == "gemma3":
        # Every 3rd layer global (Gemma 3 uses 6), a 24-token window so tests of 64+ tokens cross it.
        types = ["full_attention" if (i + 1) % 3 == 0 else "sliding_attention" for i in range(layers)]
        return {"layer_types": types, "sliding_window": 24, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
                "query_pre_attn_scalar": hidden // heads, "hidden_activation": "gelu_pytorch_tanh",
                "final_logit_softcapping": None, "attn_logit_softcapping": None, "rms_norm_eps": 1e-6}
    return {}


def tiny_model(
    family: str = "llama",
    tokenizer=None,
    hidden: int = 64,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    ffn: int = 192,
    seed: int = 0,
    tie: bool = True,
    init_std: float = 0.08,
):
    """A random decoder of `family` (see TINY_FAMILIES) whose logits are peaked enough for argmax
    comparisons, built offline from its transformers config."""
    import transformers
    from transformers import AutoModelForCausalLM

    if family not in FAMILY_CONFIGS:
        raise ValueError(f"unknown tiny family {family}: one of {', '.join(FAMILY_CONFIGS)}")
    tokenizer = tokenizer or tiny_tokenizer()
    kwargs = dict(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
        max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tie,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        initializer_range=init_std,
    )
    kwargs.update(_family_extras(family, layers, heads, hidden))
    cfg = getattr(transformers, FAMILY_CONFIGS[family])(**kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    gemma = family == "gemma3"
    with torch.no_grad():  # non-trivial norms and biases so exporters are exercised
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(-0.2, 0.2) if gemma else p.uniform_(0.8, 1.2)  # Gemma scales by (1 + w)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
        model.model.embed_tokens.weight.normal_(0.0, 0.5)  # logits of std ~4: a clear argmax
    return model, tokenizer


def tiny_llama(tokenizer=None, **kwargs):
    """A random LlamaForCausalLM (tiny_model's Llama)."""
    return tiny_model("llama", tokenizer, **kwargs)


def slice_layers(model, plan: dict, drop=(), bias_std: float = 0.3, generator=None):
    """Hand-prune layers in place, bypassing the planner, for exporter tests of odd shapes.

    plan[i] = (kept query heads, kept KV heads, FFN width, down_proj bias, o_proj bias): the
    first `FFN width` channels stay; kept query heads must still map onto the kept KV heads in
    order (GQA groups stay intact). Flagged biases get N(0, bias_std) values, like FLAP's
    compensation leaves on the residual stream. `drop` removes whole layers afterwards.
    """
    from edgeprune.arch import LayerShape, head_dim, keep_layers, resize_layer

    hd = head_dim(model)

    def rows(heads):
        return torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in heads])

    for i, (q_keep, kv_keep, ffn, down_bias, o_bias) in plan.items():
        layer = model.model.layers[i]
        old = {n: p.detach().clone() for n, p in layer.named_parameters()}
        resize_layer(layer, LayerShape(len(q_keep), len(kv_keep), ffn, down_bias, o_bias), hd)
        a, m = layer.self_attn, layer.mlp
        q, kv = rows(q_keep), rows(kv_keep)
        with torch.no_grad():
            a.q_proj.weight.copy_(old["self_attn.q_proj.weight"][q])
            a.k_proj.weight.copy_(old["self_attn.k_proj.weight"][kv])
            a.v_proj.weight.copy_(old["self_attn.v_proj.weight"][kv])
            a.o_proj.weight.copy_(old["self_attn.o_proj.weight"][:, q])
            m.gate_proj.weight.copy_(old["mlp.gate_proj.weight"][:ffn])
            m.up_proj.weight.copy_(old["mlp.up_proj.weight"][:ffn])
            m.down_proj.weight.copy_(old["mlp.down_proj.weight"][:, :ffn])
            if down_bias:
                m.down_proj.bias.normal_(0.0, bias_std, generator=generator)
            if o_bias:
                a.o_proj.bias.normal_(0.0, bias_std, generator=generator)
    if drop:
        keep_layers(model, [i for i in range(len(model.model.layers)) if i not in drop])
    return model


def save_tiny_llama(out: Path, family: str = "llama", **kwargs) -> Path:
    from edgeprune.model_files import save_hf

    model, tokenizer = tiny_model(family, **kwargs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_hf(model, tokenizer, out)
    return out
