"""A real `CLIPTokenizer` with a small vocabulary, built offline.

Whole words of a known list are single tokens (one BPE merge chain per word); anything else falls back
to byte-level characters, which are all in the vocabulary, so no text ever maps to the unknown token
(CLIP's unknown token is end-of-text, which would break EOT pooling).
"""

from __future__ import annotations

from tokenizers import pre_tokenizers
from transformers import CLIPTokenizer

START, END = "<|startoftext|>", "<|endoftext|>"


def build_clip_tokenizer(words: list[str]) -> CLIPTokenizer:
    """CLIP tokenizer whose vocabulary is the byte-level alphabet plus `words` (lower case, letters only)."""
    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    for char in alphabet:
        add(char)
    for char in alphabet:
        add(char + "</w>")
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(w.lower() for w in words):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            if pair not in merges:
                merges.append(pair)
            symbols = [symbols[0] + symbols[1]] + symbols[2:]
            add(symbols[0])
    add(START)
    add(END)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
