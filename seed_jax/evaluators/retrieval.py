"""Image-text retrieval recall@K where a hit is a retrieved caption equal to one of the image's."""

from __future__ import annotations

from typing import Sequence

import numpy as np

# Queries scored at once: a chunk's float64 scores, their negation and argsort take about
# 150 MB against 25k captions.
CHUNK_ROWS = 256


def groups_in_order(keys: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """(first, group) for N rows' hashable, sortable `keys` (an image's name; a code row's
    bytes): each distinct key's first row, in row order, and each row's group, its
    key's index in `first`."""
    _, first, group = np.unique(np.asarray(keys, dtype=object), return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    return first[order], np.argsort(order)[group.reshape(-1)]


def recall_at_k(image_features: np.ndarray, text_features: np.ndarray, captions: Sequence[str],
                ks: Sequence[int] = (1, 5, 10), images: Sequence[str] | None = None,
                group_rows: bool = True) -> dict[str, float]:
    """image_features (N,F), text_features (N,F) for N pairs with `captions`.

    `images` names each pair's image (None: every pair its own); an image's captions are
    all of its pairs'. With `group_rows`, the pairs of one image (a COCO image's 5 captions,
    one record each) are one image, its first row's features; without, each row stays an
    image of its own whose captions are its image's (e.g. codes generated from each
    caption). i2t: for each image, a hit at K if one of its K most similar texts has one
    of the image's captions; t2i: for each text, if one of its K most similar images has
    that text's caption. Returns {"i2t_r1": ..., "t2i_r1": ..., ...}.
    """
    n = len(captions)
    if not n:  # every recall would be the mean of no hits: NaN
        raise ValueError("captions: no pairs to rank, got 0 captions")
    if image_features.shape[0] != n or text_features.shape[0] != n:
        raise ValueError(f"features: expected {n} rows each, got {image_features.shape} and {text_features.shape}")
    if images is not None and len(images) != n:
        raise ValueError(f"images: expected {n} image names, got {len(images)}")
    _, caption_ids = np.unique(np.asarray(captions, dtype=object), return_inverse=True)
    first, image_ids = (np.arange(n), np.arange(n)) if images is None else groups_in_order(images)
    rows = first if group_rows else np.arange(n)  # the rows ranked as images
    row_images = image_ids[rows]  # the image each of them is
    num_captions = int(caption_ids.max()) + 1
    pairs = np.unique(image_ids * num_captions + caption_ids)  # (image, caption) pairs that belong
    image_rows = np.asarray(image_features, np.float64)[rows]
    texts = np.asarray(text_features, np.float64)
    most = max(ks, default=0)
    i2t = _most_similar(image_rows, texts, most)
    t2i = _most_similar(texts, image_rows, most, scores_of_transposed=True)
    out = {}
    for k in ks:
        i2t_hits = np.isin(row_images[:, None] * num_captions + caption_ids[i2t[:, :k]], pairs)
        t2i_hits = np.isin(row_images[t2i[:, :k]] * num_captions + caption_ids[:, None], pairs)
        out[f"i2t_r{k}"] = float(np.mean(np.any(i2t_hits, axis=1)))
        out[f"t2i_r{k}"] = float(np.mean(np.any(t2i_hits, axis=1)))
    return out


def _most_similar(queries: np.ndarray, keys: np.ndarray, k: int, scores_of_transposed: bool = False
                  ) -> np.ndarray:
    """queries (Q,F), keys (K,F) -> (Q,min(k,K)) indices of each query's most similar
    keys, ties broken by the lower index (a stable sort), so results do not depend on
    the backend. Scored `CHUNK_ROWS` queries at a time: a (Q,K) similarity matrix and
    its argsort held whole are gigabytes on a 5000-image, 25k-caption split.
    `scores_of_transposed` computes a chunk's scores as keys @ chunk.T, transposed:
    t2i then ranks exactly the products i2t ranks (float sums depend on the order)."""
    k = min(k, len(keys))
    top = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), CHUNK_ROWS):
        chunk = queries[start:start + CHUNK_ROWS]
        scores = (keys @ chunk.T).T if scores_of_transposed else chunk @ keys.T
        top[start:start + CHUNK_ROWS] = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return top
