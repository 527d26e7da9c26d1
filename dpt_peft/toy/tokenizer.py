"""A real `CLIPTokenizer` with a small vocabulary, built offline.

A byte-pair encoding is trained on the word list, so every listed word is one token; anything else falls
back to byte-level characters, which are all in the vocabulary, so no text maps to the unknown token
(CLIP's unknown token is end-of-text, which would break EOT pooling).
"""

from __future__ import annotations

import json

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPTokenizer

START, END = "<|startoftext|>", "<|endoftext|>"


def build_clip_tokenizer(words: list[str]) -> CLIPTokenizer:
    """CLIP tokenizer whose vocabulary is the byte-level alphabet plus `words` (lower case) as whole tokens."""
    words = list(dict.fromkeys(w.lower() for w in words))
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    bpe = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        special_tokens=[],
    )
    bpe.train_from_iterator(words, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = {}
    for token in [*alphabet, *(c + "</w>" for c in alphabet), *model["vocab"], START, END]:
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
