"""OPT's text tokenizer: GPT-2 byte-level BPE with OPT's special tokens
(`<s>` 0, `<pad>` 1, `</s>` 2, `<unk>` 3; `</s>` starts every sequence and ends
every answer, as transformers' OPT tokenizer does).

Real runs read OPT's `vocab.json` + `merges.txt` (or its `tokenizer.json`) from a
local folder; the demo and tests build a small byte-level BPE whose merges spell out
a closed word list, so every word of the shapes captions is one token and any other
text still encodes (through the 256 byte symbols).
"""

from __future__ import annotations

import os
from typing import Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from seed_jax.data.text import read_bpe_files

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")
# The special tokens transformers' OPT tokenizer is configured with: GPT-2's default,
# "<|endoftext|>", is not in OPT's vocabulary and would be added as one more token.
OPT_SPECIAL_TOKENS = {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>"}
FILE_NAME = "text_tokenizer.json"  # beside an export's model.json


class OPTTextTokenizer:
    """Text <-> ids without special tokens; `bos_id` / `eos_id` / `pad_id` are OPT's."""

    def __init__(self, tokenizer: tokenizers.Tokenizer):
        missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"text tokenizer: lacks OPT's special tokens {missing}")
        self.tokenizer = tokenizer
        self.bos_id = self.eos_id = tokenizer.token_to_id("</s>")
        self.pad_id = tokenizer.token_to_id("<pad>")
        self._special_ids = {tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text: expected str, got {type(text).__name__}")
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if isinstance(texts, str):
            raise TypeError("texts: expected a sequence of strings, got one str")
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text, special tokens and ids outside the text vocabulary dropped."""
        kept = [int(i) for i in ids if 0 <= int(i) < self.vocab_size and int(i) not in self._special_ids]
        return self.tokenizer.decode(kept)

    def save(self, path: str) -> None:
        self.tokenizer.save(path)

    @classmethod
    def load(cls, path: str) -> "OPTTextTokenizer":
        if not os.path.exists(path):
            raise FileNotFoundError(f"text tokenizer: {path!r} does not exist")
        return cls(_tokenizer_file(path))


def _tokenizer_file(path: str) -> tokenizers.Tokenizer:
    """A tokenizers library's tokenizer.json, else a ValueError naming `path`."""
    try:
        return tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the tokenizers library raises a bare Exception, naming no file
        raise ValueError(f"text tokenizer: {path!r} is not a tokenizer.json of the tokenizers library ({e}); "
                         "OPT's vocab.json and merges.txt are read from their folder") from e


def _byte_level(tokenizer: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def word_bpe(words: Sequence[str]) -> tokenizers.Tokenizer:
    """A byte-level BPE: OPT's specials, the 256 byte symbols, and merges that build
    each word, with and without GPT-2's leading-space mark, left to right.
    Deterministic (the `tokenizers` trainers break frequency ties run-dependently)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(list(SPECIAL_TOKENS) + alphabet)}
    merges: list[tuple[str, str]] = []
    # Space-marked forms first: their merges all start from "Ġ", so no merge of a bare
    # form can split a word that follows a space.
    forms = [f"Ġ{w}" for w in sorted(set(words))] + sorted(set(words))
    for form in forms:
        for k in range(1, len(form)):
            left, merged = form[:k], form[:k + 1]
            if merged not in vocab:
                merges.append((left, form[k]))
                vocab[merged] = len(vocab)
    return _byte_level(tokenizers.Tokenizer(models.BPE(vocab, merges, unk_token=None)))


def gpt2_bpe(folder: str) -> tokenizers.Tokenizer:
    """OPT's tokenizer from a local folder holding its `vocab.json` and `merges.txt`, or
    without them its `tokenizer.json` (transformers 5's `save_pretrained` writes that alone)."""
    from transformers import GPT2TokenizerFast

    paths = [os.path.join(folder, name) for name in ("vocab.json", "merges.txt")]
    single = os.path.join(folder, "tokenizer.json")
    if not all(os.path.exists(path) for path in paths) and os.path.exists(single):
        return _tokenizer_file(single)
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"text tokenizer folder: {path!r} does not exist (OPT's GPT-2 BPE files, "
                                    "or a tokenizer.json)")
    return read_bpe_files(GPT2TokenizerFast, paths[0], paths[1], "text tokenizer folder", **OPT_SPECIAL_TOKENS)
