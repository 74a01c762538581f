"""User-facing inference: `SeedTokenizer.load(OUT)` then `preprocess`, `encode`,
`embed_codes`. Batches of any size run through one compiled program per chunk
size (the last chunk is padded), and inputs are checked before anything runs.

    tokenizer = SeedTokenizer.load("exports/seed_v1")
    codes = tokenizer.encode(tokenizer.preprocess(images))   # uint8 (B,H,W,3) -> int32 (B,32)
    prompt_embeds = tokenizer.embed_codes(codes)               # (B,77,768)
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from seed_jax import weights
from seed_jax.data.preprocess import CLIP_MEAN, CLIP_STD
from seed_jax.models.tokenizer import SeedTokenizer as SeedTokenizerModel

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# CLIP-normalised pixels of uint8 images lie in [-1.80, 2.15]. The bound is wide
# (standard-normal test inputs pass) but catches 0..255 images that skipped
# normalisation.
PIXEL_RANGE = (-8.0, 8.0)
INTERMEDIATES = ("vit_features", "image_embeds", "causal_embeddings", "quant_input", "codes", "quantized")


class SeedTokenizer:
    """Image <-> SEED codes. `dtype` is the compute dtype ("float32" or "bfloat16");
    parameters stay float32 and the codebook distances are always float32."""

    def __init__(self, model: SeedTokenizerModel, *, dtype: str = "float32", batch_size: int = 32):
        if dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        self.model, self.config, self.dtype, self.batch_size = model, model.config, dtype, batch_size
        graphdef, state = nnx.split(model)
        # float32 means float32 on every backend (GPUs otherwise round matmul inputs to TF32).
        precision = "highest" if dtype == "float32" else "default"

        def encode(state, pixels):
            with jax.default_matmul_precision(precision):
                return nnx.merge(graphdef, state).encode(pixels)

        def embed_codes(state, codes):
            with jax.default_matmul_precision(precision):
                return nnx.merge(graphdef, state).embed_codes(codes)

        self._state = state
        self._encode = jax.jit(encode)
        self._embed_codes = jax.jit(embed_codes)

    @classmethod
    def load(cls, path: str, *, dtype: str = "float32", batch_size: int = 32) -> "SeedTokenizer":
        """From an export directory (`seed_jax.convert seed_v1` or `seed_jax.export`)."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
        model, _, _ = weights.load_model(path, dtype=DTYPES[dtype], kind="seed_tokenizer")
        return cls(model, dtype=dtype, batch_size=batch_size)

    @property
    def image_size(self) -> int:
        return self.config.vit.image_size

    @property
    def num_codes(self) -> int:
        return self.config.num_codes

    @property
    def num_queries(self) -> int:
        return self.config.qformer.num_queries

    # ---- images -> pixels
    def preprocess(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """uint8 images, (B,H,W,3) or a list of (H,W,3) of any sizes -> float32
        (B,S,S,3): bicubic resize to the model's size (PIL, as torchvision's Resize
        on a PIL image), /255, CLIP mean/std."""
        batch = list(images) if not isinstance(images, np.ndarray) else (
            [images] if images.ndim == 3 else list(images) if images.ndim == 4 else None)
        if batch is None or not batch:
            raise ValueError(f"images: expected uint8 (B,H,W,3) or a non-empty list of (H,W,3), got "
                             f"{getattr(images, 'shape', type(images).__name__)}")
        out = []
        for i, image in enumerate(batch):
            image = np.asarray(image)
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(f"images[{i}]: expected uint8 (H,W,3), got {image.dtype} {image.shape}")
            pil = Image.fromarray(image).resize((self.image_size, self.image_size), Image.BICUBIC)
            out.append((np.asarray(pil, np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD)
        return np.stack(out)

    # ---- pixels -> codes
    def _check_pixels(self, pixels) -> np.ndarray:
        s = self.image_size
        pixels = np.asarray(pixels)
        if pixels.ndim != 4 or pixels.shape[1:] != (s, s, 3):
            raise ValueError(f"pixels: expected (B,{s},{s},3) (see preprocess), got {pixels.shape}")
        if not np.issubdtype(pixels.dtype, np.floating):
            raise ValueError(f"pixels: expected floating point CLIP-normalised values, got {pixels.dtype}; "
                             "pass uint8 images through preprocess() first")
        low, high = float(pixels.min()), float(pixels.max())
        if not (np.isfinite(low) and np.isfinite(high)) or low < PIXEL_RANGE[0] or high > PIXEL_RANGE[1]:
            raise ValueError(f"pixels: values in [{low:.3g}, {high:.3g}], expected CLIP-normalised values "
                             f"within {list(PIXEL_RANGE)}; pass uint8 images through preprocess()")
        return pixels.astype(np.float32)

    def encode(self, pixels, return_intermediates: bool = False):
        """pixels float (B,S,S,3) -> int32 codes (B,32); with `return_intermediates`
        a dict of `INTERMEDIATES` (each with leading B)."""
        pixels = self._check_pixels(pixels)
        out = self._chunked(self._encode, pixels)
        return {k: out[k] for k in INTERMEDIATES} if return_intermediates else out["codes"]

    # ---- codes -> generation embeddings
    def embed_codes(self, codes) -> jax.Array:
        """int codes (B,32) in [0, num_codes) -> generation embeddings (B,77,G) float32."""
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != self.num_queries:
            raise ValueError(f"codes: expected (B,{self.num_queries}), got {codes.shape}")
        if not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"codes: expected integers, got {codes.dtype}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.num_codes):
            raise ValueError(f"codes: values must lie in [0, {self.num_codes}), got [{codes.min()}, {codes.max()}]")
        return self._chunked(self._embed_codes, codes.astype(np.int32))

    def _chunked(self, fn, inputs: np.ndarray):
        """Runs `fn(state, chunk)` over chunks of `batch_size` rows (the last padded
        with copies of row 0) and joins the results."""
        n = inputs.shape[0]
        if n == 0:
            raise ValueError("inputs: the batch is empty")
        size = min(self.batch_size, n)
        parts = []
        for start in range(0, n, size):
            chunk = inputs[start:start + size]
            real = chunk.shape[0]
            if real < size:
                chunk = np.concatenate([chunk, np.repeat(chunk[:1], size - real, axis=0)])
            parts.append(jax.tree.map(lambda x, real=real: x[:real], fn(self._state, chunk)))
        return parts[0] if len(parts) == 1 else jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)
