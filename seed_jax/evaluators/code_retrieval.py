"""Captions retrieved from SEED codes through the tokenizer's stage-I heads: codes are
embedded as the tokenizer's `retrieval_codes` evaluation embeds them (codebook
lookup -> reconstruction -> ITC image head), captions through the Q-Former text
head (cleaned as the tokenizer's training cleaned them, `data.caption_processor`), and
recall@K counts a hit when the retrieved caption equals the true one once both are
cleaned (captions that differ only before cleaning are one text to the tokenizer)."""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from seed_jax.api import run_in_chunks
from seed_jax.api.checks import check_codes, check_count
from seed_jax.api.precision import matmul_precision, model_dtype
from seed_jax.evaluators.retrieval import recall_at_k
from seed_jax.models.tokenizer import SeedTokenizer


class CodeRetrieval:
    """`tokenizer` must have the ITC heads; `caption_tokenizer` is its Q-Former text
    tokenizer (`data.text.TextTokenizer`), `process_caption` the caption processor its
    training applied before it (`data.text.caption_processor`). A float32 tokenizer
    runs at full float32 matmul precision, as the API runs it (`api.precision`)."""

    def __init__(self, tokenizer: SeedTokenizer, caption_tokenizer, batch_size: int = 256,
                 process_caption: Callable[[str], str] = str):
        check_count("batch_size", batch_size, 1)
        graphdef, state = nnx.split(tokenizer)
        self.config, self.caption_tokenizer, self.batch_size = tokenizer.config, caption_tokenizer, batch_size
        self.process_caption = process_caption
        precision = matmul_precision(model_dtype(None, tokenizer))

        def from_codes(state, codes):
            with jax.default_matmul_precision(precision):
                model = nnx.merge(graphdef, state)
                return model.image_features(model.reconstruct(model.quantize.lookup(codes)))

        def from_text(state, ids, mask):
            with jax.default_matmul_precision(precision):
                return nnx.merge(graphdef, state).text_features(ids, mask)

        # The state is an argument: closed over, the weights would be constants of the
        # compiled programs (the Q-Former's text path: a program of 0.9 GB, compiled slowly).
        self._state = state
        self._from_codes = jax.jit(from_codes)
        self._from_text = jax.jit(from_text)

    def code_features(self, codes: np.ndarray) -> np.ndarray:
        """int codes (N,Q) in [0, num_codes) (Q: the tokenizer's queries, SEED's 32) -> L2-normalised features (N,F)."""
        codes = check_codes(codes, self.config.qformer.num_queries, self.config.num_codes)
        return run_in_chunks(functools.partial(self._from_codes, self._state), (codes,), self.batch_size)

    def caption_features(self, captions: Sequence[str]) -> np.ndarray:
        return self._cleaned_features([self.process_caption(c) for c in captions])

    def _cleaned_features(self, cleaned: Sequence[str]) -> np.ndarray:
        ids, mask = self.caption_tokenizer(list(cleaned))
        return run_in_chunks(functools.partial(self._from_text, self._state), (ids, mask), self.batch_size)

    def recall(self, codes: np.ndarray, captions: Sequence[str], images: Sequence[str] | None = None
               ) -> dict[str, float]:
        """Row i of `codes` against all `captions` (its own is row i): recall@1/5/10 of
        the true caption among them, or of any caption of row i's image when `images`
        names each row's image (an image's several captions, one row each). Captions
        are compared cleaned: one equal to the true caption once cleaned is a hit."""
        cleaned = [self.process_caption(c) for c in captions]
        out = recall_at_k(self.code_features(codes), self._cleaned_features(cleaned), cleaned, images=images,
                          group_rows=False)
        return {k.replace("i2t_", ""): v for k, v in out.items() if k.startswith("i2t_")}
