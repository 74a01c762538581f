"""Codebook usage: how many codes are used and the perplexity of their distribution."""

from __future__ import annotations

import numpy as np


def codebook_usage(codes: np.ndarray, num_codes: int) -> dict[str, float]:
    """codes: a non-empty int array of any shape with values in [0, num_codes).

    used_codes = number of distinct codes; perplexity = exp(entropy) of the code
    histogram (num_codes when all are used uniformly, 1 when one code is used).
    """
    if not np.size(codes):  # the perplexity of no codes would read as one code used
        raise ValueError(f"codes: no codes to count, got shape {np.shape(codes)}")
    codes = np.asarray(codes).reshape(-1)
    if codes.min() < 0 or codes.max() >= num_codes:
        raise ValueError(f"codes: values must lie in [0, {num_codes}), got [{codes.min()}, {codes.max()}]")
    counts = np.bincount(codes, minlength=num_codes).astype(np.float64)
    probs = counts / counts.sum()
    nonzero = probs[probs > 0]
    return {"used_codes": float(np.count_nonzero(counts)),
            "perplexity": float(np.exp(-np.sum(nonzero * np.log(nonzero))))}
