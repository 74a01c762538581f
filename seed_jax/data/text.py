"""Caption tokenizers: a fixed-length wrapper over `tokenizers.Tokenizer`.

The demo builds a WordPiece vocabulary from its caption grammar; real runs read BERT
uncased WordPiece (`vocab.txt`) and CLIP BPE (`vocab.json` + `merges.txt`) files
from local paths.
"""

from __future__ import annotations

import json
import os
import re
from typing import Callable, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# LAVIS's `blip_caption` text processor, which SEED's training applies to every caption
# (SEED_Tokenizer/lavis/processors/blip_processors.py): these characters become spaces,
# and a caption keeps its first 50 words (the processor's default; SEED's yamls set none).
BLIP_CAPTION_PUNCTUATION = '.!"()*#:;~'
BLIP_CAPTION_MAX_WORDS = 50
CAPTION_PROCESSORS = ("none", "blip_caption")


def blip_caption(caption: str, max_words: int = BLIP_CAPTION_MAX_WORDS) -> str:
    """A caption as LAVIS's `blip_caption` gives it: lower-cased, each character of
    BLIP_CAPTION_PUNCTUATION a space, runs of 2+ whitespace one space, the ends' spaces
    stripped, cut to its first `max_words` space-separated words."""
    spaced = caption.lower().translate({ord(ch): " " for ch in BLIP_CAPTION_PUNCTUATION})
    words = re.sub(r"\s{2,}", " ", spaced).rstrip("\n").strip(" ").split(" ")
    return " ".join(words[:max_words])


def caption_processor(name: str, field: str = "data.caption_processor") -> Callable[[str], str]:
    """The function the config `field` names: "none" leaves captions as written."""
    if name == "none":
        return str
    if name == "blip_caption":
        return blip_caption
    raise ValueError(f"{field}: expected one of {CAPTION_PROCESSORS}, got {name!r}")


class TextTokenizer:
    """Encodes captions to fixed-length int32 ids and a 1/0 mask, (B,L) each."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, max_length: int, pad_id: int):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_id = pad_id
        self._ready = tokenizers.Tokenizer.from_str(tokenizer.to_str())
        self._ready.enable_truncation(max_length)
        self._ready.enable_padding(length=max_length, pad_id=pad_id,
                                   pad_token=tokenizer.id_to_token(pad_id) or "[PAD]")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(texts, str):
            raise TypeError("texts: expected a sequence of strings, got one str")
        encodings = self._ready.encode_batch(list(texts))
        ids = np.asarray([e.ids for e in encodings], np.int32)
        mask = np.asarray([e.attention_mask for e in encodings], np.int32)
        return ids, mask

    def save(self, path: str) -> None:
        self.tokenizer.save(path)


def _bert_pipeline(tokenizer: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    return tokenizer


def _add_cls_sep(tokenizer: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tokenizer


def grammar_wordpiece(words: Sequence[str]) -> tokenizers.Tokenizer:
    """A BERT-style WordPiece tokenizer whose vocabulary is the special tokens, every
    word of a closed grammar, and single letters (with their ## forms) for anything
    else. Built deterministically (the `tokenizers` trainer breaks frequency ties
    differently from run to run, which would make runs irreproducible); [PAD] is 0."""
    letters = sorted({ch for w in words for ch in w.lower()} | set("abcdefghijklmnopqrstuvwxyz0123456789"))
    tokens = list(SPECIAL_TOKENS) + sorted({w.lower() for w in words}) + letters + ["##" + ch for ch in letters]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    return _add_cls_sep(_bert_pipeline(tokenizers.Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))))


def bert_wordpiece(vocab_file: str, name: str = "vocab_file") -> tokenizers.Tokenizer:
    """BERT uncased WordPiece from a local `vocab.txt`; a missing one is named `name` (its config field)."""
    if not os.path.exists(vocab_file):
        raise FileNotFoundError(f"{name}: {vocab_file!r} does not exist (BERT uncased vocab.txt)")
    tokenizer = _bert_pipeline(tokenizers.Tokenizer(models.WordPiece.from_file(vocab_file, unk_token="[UNK]")))
    return _add_cls_sep(tokenizer)


def clip_bpe(vocab_file: str, merges_file: str, prefix: str = "") -> tokenizers.Tokenizer:
    """CLIP's byte-level BPE from local `vocab.json` / `merges.txt` (SD v1's tokenizer); a
    file is named by its config field after `prefix` (e.g. "data.tokenizer.")."""
    from transformers import CLIPTokenizerFast

    for name, path in (("clip_vocab_file", vocab_file), ("clip_merges_file", merges_file)):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{prefix}{name}: {path!r} does not exist")
    return read_bpe_files(CLIPTokenizerFast, vocab_file, merges_file, f"{prefix}clip_vocab_file")


def read_bpe_files(fast_tokenizer_class, vocab_file: str, merges_file: str, name: str,
                   **special_tokens: str) -> tokenizers.Tokenizer:
    """The `tokenizers` BPE that transformers' `fast_tokenizer_class` builds from
    `vocab.json` + `merges.txt` (and `special_tokens`, e.g. bos_token="</s>"), else a
    ValueError naming `name` when the vocabulary was not read. The files go positionally:
    transformers 4 names them vocab_file / merges_file, 5 names them vocab / merges and
    ignores the old keywords (an empty vocabulary that maps every word to one id)."""
    tokenizer = fast_tokenizer_class(vocab_file, merges_file, **special_tokens).backend_tokenizer
    with open(vocab_file, encoding="utf-8") as f:
        expected = len(json.load(f))
    if tokenizer.get_vocab_size() < expected:
        raise ValueError(f"{name}: {vocab_file!r} holds {expected} tokens but the tokenizer built from it "
                         f"has {tokenizer.get_vocab_size()}")
    return tokenizer
