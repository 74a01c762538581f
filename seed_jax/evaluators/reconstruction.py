"""SEED reconstruction quality after the paper's Table 2: cosine similarity between
an image and a generated one. The paper judges with an outside CLIP image encoder;
here the judge is the tokenizer's own stage-I image features (the ITC head on the
last causal query), so scores compare runs of one tokenizer, not with the paper's."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from seed_jax.evaluators.retrieval import groups_in_order


def image_features(tokenizer, images: np.ndarray) -> np.ndarray:
    """uint8 images (B,H,W,3) -> L2-normalised stage-I features (B,F); `tokenizer`
    is an `api.SeedTokenizer` whose model has the ITC heads."""
    return tokenizer.image_features(tokenizer.preprocess(images))


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


def other_image_rows(image_ids: Sequence[str], seed: int = 0) -> np.ndarray:
    """For each row, a row of another image: `image_ids` names each row's image (an image's
    several caption records share one, `records.image_id`); the distinct images are
    deranged (`derangement`) and each row takes a random row of the image it is sent to.
    With every row its own image this is `derangement(len(image_ids), seed)`."""
    first, image_of_row = groups_in_order(image_ids)
    if len(first) < 2:
        raise ValueError(f"image_ids: pairing each row with another image's needs at least 2 distinct image ids, "
                         f"got {len(first)} in {len(image_ids)} rows")
    rows_of_image = [np.flatnonzero(image_of_row == i) for i in range(len(first))]
    target = derangement(len(first), seed)[image_of_row]
    rng = np.random.default_rng([seed, 1])
    return np.array([rng.choice(rows_of_image[t]) for t in target])


def reconstruction_similarity(tokenizer, images: np.ndarray, reconstructions: np.ndarray,
                              from_captions: np.ndarray, image_ids: Sequence[str] | None = None
                              ) -> dict[str, float]:
    """Mean cosine similarity of each image (uint8, B rows each) to its reconstruction
    from SEED codes, to the image generated from its caption, and to the
    reconstruction of another, random image (so at least 2 images, and 2 distinct
    `image_ids`). `image_ids` names each row's image, so that rows of one image's
    several captions are not each other's other image (None: every row its own image)."""
    if len(images) < 2:
        raise ValueError(f"images: the unrelated similarity pairs each image with another's reconstruction, "
                         f"so at least 2 are needed, got {len(images)}")
    for name, rows in (("reconstructions", reconstructions), ("from_captions", from_captions),
                       ("image_ids", image_ids)):
        if rows is not None and len(rows) != len(images):  # one row would broadcast over every image
            raise ValueError(f"{name}: expected one per image ({len(images)}), got {len(rows)}")
    other = other_image_rows(range(len(images)) if image_ids is None else image_ids)
    original = image_features(tokenizer, images)
    recon = image_features(tokenizer, reconstructions)
    generated = image_features(tokenizer, from_captions)
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
