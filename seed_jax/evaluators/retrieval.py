"""Image-text retrieval recall@K where a hit is a retrieved caption equal to the true one."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def recall_at_k(image_features: np.ndarray, text_features: np.ndarray, captions: Sequence[str],
                ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """image_features (N,F), text_features (N,F) for N pairs with `captions`.

    i2t: for each image, a hit at K if one of its K most similar texts has the
    image's caption; t2i: for each text, if one of its K most similar images has
    that text's caption. Returns {"i2t_r1": ..., "t2i_r1": ..., ...}.
    """
    n = len(captions)
    if image_features.shape[0] != n or text_features.shape[0] != n:
        raise ValueError(f"features: expected {n} rows each, got {image_features.shape} and {text_features.shape}")
    _, caption_ids = np.unique(np.asarray(captions, dtype=object), return_inverse=True)
    sim = np.asarray(image_features, np.float64) @ np.asarray(text_features, np.float64).T
    # Stable ordering: ties broken by index, so results do not depend on the backend.
    i2t = np.argsort(-sim, axis=1, kind="stable")
    t2i = np.argsort(-sim.T, axis=1, kind="stable")
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = float(np.mean(np.any(caption_ids[i2t[:, :k]] == caption_ids[:, None], axis=1)))
        out[f"t2i_r{k}"] = float(np.mean(np.any(caption_ids[t2i[:, :k]] == caption_ids[:, None], axis=1)))
    return out
