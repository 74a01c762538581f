"""Checks of the API's inputs (counts, finite numbers, seeds, SEED codes), raising a ValueError naming the argument."""

from __future__ import annotations

import jax
import numpy as np


def seed_key(seed: int) -> jax.Array:
    """The PRNG key of a user's `seed`, an integer in [0, 2**32): with 64-bit mode off
    jax keeps only a seed's low 32 bits, so 2**32 would silently give seed 0's key."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise ValueError(f"seed: expected an integer in [0, 2**32), got {seed!r}")
    return jax.random.key(int(seed))


def is_real(value) -> bool:
    """One real number (a Python or numpy int or float, or a 0-d array of one), not a bool or a string."""
    number = np.asarray(value)
    return number.ndim == 0 and number.dtype.kind in "iuf"  # "iuf": int, uint, float


def check_finite_number(name: str, value) -> float:
    """One finite real number, else a ValueError naming `name`."""
    if not is_real(value) or not np.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


def is_integer(value) -> bool:
    """A Python or numpy integer, not a bool (a float count fails inside jit, naming nothing)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_count(name: str, value, minimum: int, note: str = "") -> int:
    """An integer >= `minimum`, else a ValueError naming `name` (and `note`)."""
    if not is_integer(value) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}{f' ({note})' if note else ''}, got {value!r}")
    return int(value)


def as_array(name: str, value, dtype=None) -> np.ndarray:
    """`value` as a numpy array (of `dtype`), else a ValueError naming `name`: numpy's own
    error for nested lists of rows of different lengths (e.g. unpadded token ids) names none."""
    try:
        return np.asarray(value, dtype)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: expected an array (nested lists with rows of one length), got "
                         f"{type(value).__name__} numpy cannot make one of: {e}") from None


def check_codes(codes, num_queries: int, num_codes: int) -> np.ndarray:
    """Integer SEED codes (B,num_queries) in [0, num_codes) -> int32, else a ValueError
    naming `codes` (a model's codebook lookup would clamp an index out of range)."""
    codes = as_array("codes", codes)
    if codes.ndim != 2 or codes.shape[1] != num_queries:
        raise ValueError(f"codes: expected (B,{num_queries}), got {codes.shape}")
    if not codes.shape[0]:
        raise ValueError(f"codes: the batch is empty, got {codes.shape}")
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes: expected integers, got {codes.dtype}")
    if codes.min() < 0 or codes.max() >= num_codes:
        raise ValueError(f"codes: values must lie in [0, {num_codes}), got [{codes.min()}, {codes.max()}]")
    return codes.astype(np.int32)
