"""Retrieval recall@K: hits are retrieved captions equal to the true one."""

import numpy as np
import pytest

from seed_jax.evaluators.retrieval import recall_at_k


def test_perfect_and_shifted_retrieval():
    feats = np.eye(4)
    captions = ["a", "b", "c", "d"]
    assert recall_at_k(feats, feats, captions, ks=(1,)) == {"i2t_r1": 1.0, "t2i_r1": 1.0}
    shifted = np.roll(feats, 1, axis=0)  # image i matches text i+1
    out = recall_at_k(feats, shifted, captions, ks=(1, 2))
    assert out["i2t_r1"] == 0.0 and out["t2i_r1"] == 0.0
    # the one match with cos 1 first, then ties broken by the lowest index
    assert out["i2t_r2"] == 0.25 and out["t2i_r2"] == 0.5


def test_duplicate_captions_count_as_hits():
    images = np.eye(3)
    texts = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]], float)  # 0 and 1 swapped
    out = recall_at_k(images, texts, ["same", "same", "other"], ks=(1,))
    assert out == {"i2t_r1": 1.0, "t2i_r1": 1.0}
    out = recall_at_k(images, texts, ["x", "y", "other"], ks=(1,))
    assert out["i2t_r1"] == pytest.approx(1 / 3)


def test_shape_mismatch_is_named():
    with pytest.raises(ValueError, match="features"):
        recall_at_k(np.eye(3), np.eye(2), ["a", "b", "c"])
