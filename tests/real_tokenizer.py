"""CLIP's real tokenizer, built offline from the BPE vocabulary OpenAI published (vendored in fixtures/clip_bpe/).

`bpe_simple_vocab_16e6.txt.gz` holds the merges; the vocabulary is the 256 byte symbols, the same with the word-end
marker, one symbol per merge and the two special tokens, in that order: 49,408 tokens with OpenAI's ids.
"""

from __future__ import annotations

import gzip
from pathlib import Path

from transformers import CLIPTokenizer

BPE_FILE = Path(__file__).parent / "fixtures" / "clip_bpe" / "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # CLIP uses the first 48,894 merges of the file


def byte_symbols() -> list[str]:
    """GPT-2's reversible byte-to-character map, in CLIP's vocabulary order: the printable bytes stand for themselves
    and come first, then the other bytes get characters from 256 upwards."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    return [chr(byte) for byte in printable] + [chr(256 + n) for n in range(len(others))]


def save_real_clip_tokenizer(directory: Path) -> Path:
    """OpenAI's CLIP tokenizer saved in `directory`, loadable with `AutoTokenizer` as a model folder's would be."""
    lines = gzip.decompress(BPE_FILE.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]
    symbols = byte_symbols()
    vocab = [*symbols, *(s + "</w>" for s in symbols), *("".join(m.split()) for m in merges)]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(
        vocab={token: i for i, token in enumerate(vocab)},
        merges=[tuple(m.split()) for m in merges],
        model_max_length=77,
    )
    tokenizer.save_pretrained(directory)
    return directory
