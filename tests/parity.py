"""Comparison helpers for the parity tests (the issue's tolerances)."""

import numpy as np

INTERMEDIATE_TOLERANCE = 1e-4  # ||ours - ref|| / ||ref|| in float32
DECISIVE_GAP = 1e-5  # codes must agree where best and second-best distances differ by more (relative)


def relative_error(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def decisive(distances: np.ndarray) -> np.ndarray:
    """(…,K) reference distances -> bool (…): best and second-best differ by > DECISIVE_GAP relative."""
    two = np.sort(np.asarray(distances, np.float64), axis=-1)[..., :2]
    return (two[..., 1] - two[..., 0]) > DECISIVE_GAP * np.maximum(np.abs(two[..., 0]), 1e-30)


def assert_codes_match(ours, ref, distances, min_decisive: float = 0.9) -> float:
    """Codes equal wherever the reference's choice is decisive; returns the decisive
    fraction, which must be high enough for the check to mean something."""
    mask = decisive(distances)
    fraction = float(mask.mean())
    assert fraction >= min_decisive, f"only {fraction:.2%} of reference codes are decisive"
    mismatched = np.argwhere((np.asarray(ours) != np.asarray(ref)) & mask)
    assert mismatched.size == 0, f"{len(mismatched)} decisive codes differ, first at {mismatched[:5].tolist()}"
    return fraction
