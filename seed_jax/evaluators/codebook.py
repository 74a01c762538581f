"""Codebook usage: how many codes are used and the perplexity of their distribution."""

from __future__ import annotations

import numpy as np


def codebook_usage(codes: np.ndarray, num_codes: int) -> dict[str, float]:
    """codes: int array of any shape with values in [0, num_codes).

    used_codes = number of distinct codes; perplexity = exp(entropy) of the code
    histogram (num_codes when all are used uniformly, 1 when one code is used).
    """
    codes = np.asarray(codes).reshape(-1)
    if codes.size and (codes.min() < 0 or codes.max() >= num_codes):
        raise ValueError(f"codes: values must lie in [0, {num_codes}), got [{codes.min()}, {codes.max()}]")
    counts = np.bincount(codes, minlength=num_codes).astype(np.float64)
    probs = counts / max(counts.sum(), 1.0)
    nonzero = probs[probs > 0]
    return {"used_codes": float(np.count_nonzero(counts)),
            "perplexity": float(np.exp(-np.sum(nonzero * np.log(nonzero))))}
