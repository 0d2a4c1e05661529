"""A GGUF's SentencePiece-BPE vocabulary (llama.cpp tokenizer model `llama`) as an HF fast tokenizer.

transformers 4.57 converts such a vocabulary (Gemma 3's, 262k tokens) to a Unigram model whose
scores are the GGUF's merge ranks (-rank): Unigram then prefers many short pieces and tokenizes
WikiText into ~1.8x the tokens llama.cpp produces from the same file. llama.cpp's SPM tokenizer
is BPE: starting from characters it repeatedly merges the adjacent pair whose merged piece has the
highest score. That is an HF BPE whose merge list holds every split (left, right) of every piece,
ranked by the piece's score, with byte fallback (<0xXX> tokens) for characters outside the vocab.
User-defined pieces (Gemma's runs of newlines and spaces) are matched before BPE, as llama.cpp
does, and control pieces are special tokens.
"""

from __future__ import annotations

import gguf

T = gguf.TokenType


def spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Every (left, right) split of every normal piece into two vocabulary pieces, best score first."""
    normal = {t for t, ty in zip(tokens, types) if ty in (T.NORMAL, T.BYTE)}
    ranked = sorted((i for i, ty in enumerate(types) if ty == T.NORMAL and len(tokens[i]) > 1), key=lambda i: (-scores[i], i))
    merges = []
    for i in ranked:
        piece = tokens[i]
        merges.extend((piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in normal and piece[k:] in normal)
    return merges


def spm_bpe_backend(reader, add_bos: bool):
    """A `tokenizers.Tokenizer` equivalent to llama.cpp's SPM tokenizer on this GGUF's vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    field = lambda key: reader.fields[key].contents() if key in reader.fields else None  # noqa: E731
    tokens, scores, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.scores"), field("tokenizer.ggml.token_type")
    unk = field("tokenizer.ggml.unknown_token_id")
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=spm_merges(tokens, scores, types), unk_token=tokens[unk] if unk is not None else None,
                     byte_fallback=True, fuse_unk=True, ignore_merges=False)
    tok = Tokenizer(bpe)
    prefix = bool(field("tokenizer.ggml.add_space_prefix"))
    steps = ([normalizers.Prepend("\u2581")] if prefix else []) + [normalizers.Replace(" ", "\u2581")]
    tok.normalizer = normalizers.Sequence(steps)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == T.USER_DEFINED])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == T.CONTROL])
    bos = field("tokenizer.ggml.bos_token_id")
    if add_bos and bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A {tokens[bos]} $B",
                                                           special_tokens=[(tokens[bos], int(bos))])
    return tok
