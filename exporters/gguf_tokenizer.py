"""The tokenizer part of a GGUF: an HF fast BPE tokenizer as llama.cpp's vocabulary.

Byte-level BPE (GPT-2 / SmolLM / Llama-3 style) becomes llama.cpp's `gpt2` model with the
pre-tokenizer whose regex splits text the same way; a SentencePiece-style BPE ('▁' for spaces,
byte-fallback tokens) becomes its `llama` model with scores in merge order. The exporter checks
afterwards that llama.cpp tokenizes sample texts exactly as the HF tokenizer does.
"""

from __future__ import annotations

import json
import re

import gguf

from edgeprune.errors import EdgepruneError

# HF pre-tokenizer -> llama.cpp `tokenizer.ggml.pre` name with the same splitting regex.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def write_tokenizer(w: gguf.GGUFWriter, tokenizer, n_vocab: int, pre: str | None = None) -> None:
    """Vocabulary, merges/scores, token types, special ids, add_bos and chat template."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else None
    if spec is None or spec["model"]["type"] != "BPE":
        raise EdgepruneError("the GGUF exporter needs a Hugging Face fast BPE tokenizer (tokenizer.json)")
    id_to_tok = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(id_to_tok) >= n_vocab:
        raise EdgepruneError(f"the tokenizer has ids up to {max(id_to_tok)} but the embedding only {n_vocab} rows")
    added = {i: tok for i, tok in tokenizer.added_tokens_decoder.items()}
    if _is_sentencepiece(spec):
        _write_spm_vocab(w, spec, id_to_tok, added, n_vocab, tokenizer)
    else:
        _write_bpe_vocab(w, spec, id_to_tok, added, n_vocab, pre or bpe_pre_name(spec))
    for add, tid in (
        (w.add_bos_token_id, tokenizer.bos_token_id),
        (w.add_eos_token_id, tokenizer.eos_token_id),
        (w.add_unk_token_id, tokenizer.unk_token_id),
        (w.add_pad_token_id, tokenizer.pad_token_id),
    ):
        if tid is not None:
            add(int(tid))
    # What the HF tokenizer really does, not what its config claims.
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    w.add_add_bos_token(tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id])
    w.add_add_eos_token(tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id] and len(probe) > 1)
    template = getattr(tokenizer, "chat_template", None)
    if template:
        w.add_chat_template(template)


def _is_sentencepiece(spec: dict) -> bool:
    """Llama-2-style: BPE over '▁'-marked text with byte-fallback tokens, no byte-level mapping."""
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")], ensure_ascii=False)
    return "ByteLevel" not in text and ("\u2581" in text or "Metaspace" in text)


def bpe_pre_name(spec: dict) -> str:
    """The llama.cpp pre-tokenizer whose regex splits text as this HF pre-tokenizer does."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # digits one by one, then the GPT-2 regex (SmolLM, StarCoder)
    if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == _LLAMA3_SPLIT:
        return "llama-bpe"
    raise EdgepruneError(
        f"unknown BPE pre-tokenizer {json.dumps(pre)[:160]}: pass metadata={{'tokenizer.ggml.pre': NAME}} "
        "with the llama.cpp pre-tokenizer name that matches it"
    )


def _token_type(i: int, added: dict) -> int:
    T = gguf.TokenType
    if i in added:
        return T.CONTROL if added[i].special else T.USER_DEFINED
    return T.NORMAL


def _write_bpe_vocab(w, spec, id_to_tok, added, n_vocab, pre) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    tokens, types = [], []
    for i in range(n_vocab):  # embedding rows beyond the tokenizer become unused padding tokens
        tok = id_to_tok.get(i)
        tokens.append(tok if tok is not None else f"[PAD{i}]")
        types.append(_token_type(i, added) if tok is not None else gguf.TokenType.UNUSED)
    w.add_token_list(tokens)
    w.add_token_types(types)
    merges = spec["model"]["merges"]  # "a b" strings (old tokenizers) or [a, b] pairs (new)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])


def _write_spm_vocab(w, spec, id_to_tok, added, n_vocab, tokenizer) -> None:
    """SentencePiece-BPE vocab: llama.cpp merges by score, and BPE ids follow merge order, so score = -id."""
    T = gguf.TokenType
    w.add_tokenizer_model("llama")
    tokens, scores, types = [], [], []
    for i in range(n_vocab):
        tok = id_to_tok.get(i)
        tokens.append(tok if tok is not None else f"[PAD{i}]")
        scores.append(0.0 if i in added else -float(i))
        if tok is None:
            types.append(T.UNUSED)
        elif i == tokenizer.unk_token_id:
            types.append(T.UNKNOWN)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", tok):
            types.append(T.BYTE)
        else:
            types.append(_token_type(i, added))
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    # Llama-2 tokenizers prepend '▁' to the text; llama.cpp does it when add_space_prefix is set.
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
    prepends = ('"Prepend"', '"prepend_scheme": "always"', '"prepend_scheme": "first"', '"add_prefix_space": true')
    w.add_add_space_prefix(any(p in text for p in prepends))
