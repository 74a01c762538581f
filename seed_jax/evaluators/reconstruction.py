"""SEED reconstruction quality in the paper's Table 2 sense: cosine similarity
between an image and a generated one, both seen through the tokenizer's stage-I
image features (the ITC head on the last causal query)."""

from __future__ import annotations

import numpy as np


def image_features(tokenizer, images: np.ndarray) -> np.ndarray:
    """uint8 images (B,H,W,3) -> L2-normalised stage-I features (B,F); `tokenizer`
    is an `api.SeedTokenizer` whose model has the ITC heads."""
    causal = tokenizer.encode(tokenizer.preprocess(images), return_intermediates=True)["causal_embeddings"]
    return np.asarray(tokenizer.model.image_features(causal))


def derangement(n: int, seed: int = 0) -> np.ndarray:
    """A random permutation of range(n) with no fixed point; n < 2 has none and
    raises (a search would never end)."""
    if n < 2:
        raise ValueError(f"n: a permutation without fixed points needs n >= 2, got {n}")
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == np.arange(n)):
            return perm


def reconstruction_similarity(tokenizer, images: np.ndarray, reconstructions: np.ndarray,
                              from_captions: np.ndarray) -> dict[str, float]:
    """Mean cosine similarity of each image (uint8, B rows each) to its reconstruction
    from SEED codes, to the image generated from its caption, and to the
    reconstruction of another, random image (so at least 2 images)."""
    if len(images) < 2:
        raise ValueError(f"images: the unrelated similarity pairs each image with another's reconstruction, "
                         f"so at least 2 are needed, got {len(images)}")
    original = image_features(tokenizer, images)
    recon = image_features(tokenizer, reconstructions)
    generated = image_features(tokenizer, from_captions)
    other = derangement(len(images))
    return {"recon/similarity": float(np.mean(np.sum(original * recon, -1))),
            "recon/text_to_image_similarity": float(np.mean(np.sum(original * generated, -1))),
            "recon/unrelated_similarity": float(np.mean(np.sum(original * recon[other], -1)))}


def image_grid(rows: list[np.ndarray], size: int, pad: int = 2) -> np.ndarray:
    """Rows of uint8 images (each (k,h,w,3), resized to `size`) -> one uint8 grid image."""
    from PIL import Image

    k = max(len(r) for r in rows)
    grid = np.full((len(rows) * (size + pad) + pad, k * (size + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            tile = np.asarray(Image.fromarray(image).resize((size, size), Image.NEAREST))
            top, left = pad + i * (size + pad), pad + j * (size + pad)
            grid[top:top + size, left:left + size] = tile
    return grid
