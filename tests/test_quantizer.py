"""VQ: nearest code, ties, straight-through gradient, legacy loss, usage statistics."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seed_jax.evaluators.codebook import codebook_usage
from seed_jax.models.quantizer import VectorQuantizer


def test_codebook_init_is_uniform_within_one_over_k():
    vq = VectorQuantizer(512, 8, rngs=nnx.Rngs(0))
    e = np.asarray(vq.codebook[...])
    assert np.abs(e).max() <= 1 / 512 and e.std() > 0.5 / 512 / np.sqrt(3)


def test_nearest_code_matches_brute_force():
    vq = VectorQuantizer(64, 8, rngs=nnx.Rngs(0))
    vq.codebook[...] = jax.random.normal(jax.random.key(1), (64, 8))
    z = jax.random.normal(jax.random.key(2), (3, 5, 8))
    out = vq(z)
    chex.assert_shape(out["codes"], (3, 5))
    chex.assert_shape(out["quantized"], (3, 5, 8))
    brute = np.argmin(((np.asarray(z)[..., None, :] - np.asarray(vq.codebook[...])) ** 2).sum(-1), -1)
    np.testing.assert_array_equal(out["codes"], brute)
    np.testing.assert_allclose(out["quantized"], vq.lookup(out["codes"]), atol=1e-6)


def test_ties_go_to_the_lowest_index():
    vq = VectorQuantizer(4, 2, rngs=nnx.Rngs(0))
    vq.codebook[...] = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    codes = vq.nearest(jnp.array([[[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]]))
    np.testing.assert_array_equal(codes, [[0, 1, 0]])


def test_distances_ask_for_full_float32_matmuls_whatever_the_ambient_precision():
    """On GPUs (TF32) and TPUs (bfloat16 passes) a float32 matmul at DEFAULT precision
    rounds its inputs, which flips ~0.1% (TF32) to ~1% (bf16) of the nearest codes of
    8192; the bf16 API mode and training run at DEFAULT. The distances' matmul pins
    HIGHEST, so the codes match the reference on every backend (CPU cannot show the
    flips: it always computes float32, hence the check on the lowered program)."""
    vq = VectorQuantizer(64, 8, rngs=nnx.Rngs(0))
    z = jax.random.normal(jax.random.key(2), (3, 5, 8))
    for precision in ("default", "bfloat16", "tensorfloat32"):
        with jax.default_matmul_precision(precision):
            text = jax.jit(vq.nearest).lower(z).as_text()
        dots = [line for line in text.splitlines() if "dot_general" in line]
        assert dots and all("precision = [HIGHEST, HIGHEST]" in line for line in dots), (precision, dots)


def test_straight_through_and_commitment_gradients():
    vq = VectorQuantizer(16, 4, beta=0.25, rngs=nnx.Rngs(0))
    vq.codebook[...] = jax.random.normal(jax.random.key(1), (16, 4))
    z = jax.random.normal(jax.random.key(2), (2, 3, 4))
    w = jax.random.normal(jax.random.key(3), (2, 3, 4))
    graphdef, state = nnx.split(vq)

    def downstream(z):  # gradient through the quantized output only
        return jnp.sum(nnx.merge(graphdef, state)(z)["quantized"] * w)

    np.testing.assert_allclose(jax.grad(downstream)(z), w, rtol=1e-6)  # identity to the encoder

    def vq_loss(state, z):
        return nnx.merge(graphdef, state)(z)["loss"]

    grad_state, grad_z = jax.grad(vq_loss, argnums=(0, 1))(state, z)
    codes = np.asarray(vq.nearest(z))
    e = np.asarray(vq.lookup(codes))
    n = z.size
    # codebook term beta * mean((e - sg z)^2) moves the selected codes toward z
    expected = np.zeros((16, 4), np.float32)
    np.add.at(expected, codes.reshape(-1), (0.25 * 2 * (e - np.asarray(z)) / n).reshape(-1, 4))
    np.testing.assert_allclose(grad_state["codebook"][...], expected, rtol=1e-5, atol=1e-7)
    # commitment term mean((sg e - z)^2) pulls z toward its code
    np.testing.assert_allclose(grad_z, 2 * (np.asarray(z) - e) / n, rtol=1e-5, atol=1e-7)


def test_codebook_usage():
    stats = codebook_usage(np.array([0, 0, 1, 1, 2, 2, 3, 3]), 8)
    assert stats["used_codes"] == 4
    np.testing.assert_allclose(stats["perplexity"], 4.0)
    assert codebook_usage(np.zeros(10, int), 8)["perplexity"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="codes"):
        codebook_usage(np.array([8]), 8)


def test_restart_unused_codes_keeps_used_and_reseeds_unused_from_the_batch():
    from seed_jax.models.quantizer import restart_unused_codes

    codebook = jnp.arange(12.0).reshape(6, 2)
    z = jax.random.normal(jax.random.key(0), (2, 3, 2))
    codes = jnp.array([[0, 0, 2], [2, 5, 0]])
    out = np.asarray(restart_unused_codes(codebook, z, codes, jax.random.key(1)))
    np.testing.assert_array_equal(out[[0, 2, 5]], np.asarray(codebook)[[0, 2, 5]])
    rows = np.asarray(z).reshape(-1, 2)
    for k in (1, 3, 4):
        assert any(np.array_equal(out[k], r) for r in rows)
