"""Vector quantiser with a straight-through estimator (taming's legacy form)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from seed_jax.models import layers


class VectorQuantizer(nnx.Module):
    """Codebook (K, C); nearest code by squared L2, ties to the lowest index."""

    def __init__(self, num_codes: int, code_dim: int, *, beta: float = 0.25, rngs: nnx.Rngs):
        bound = 1.0 / num_codes
        self.codebook = layers.param(
            rngs, lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound),
            (num_codes, code_dim), ("codes", None))
        self.beta = beta

    @property
    def num_codes(self) -> int:
        return self.codebook.value.shape[0]

    def nearest(self, z: jax.Array) -> jax.Array:
        """z (..., C) -> int32 codes (...) of the nearest codebook rows (distances in float32).

        The matmul pins HIGHEST precision: at DEFAULT, GPUs (TF32) and TPUs (bfloat16
        passes) round its float32 inputs and flip ~0.1-1% of the codes of 8192."""
        z = z.astype(jnp.float32)
        e = self.codebook[...]
        dist = (jnp.sum(z * z, -1, keepdims=True) + jnp.sum(e * e, -1)
                - 2.0 * jnp.einsum("...C,KC->...K", z, e, precision=jax.lax.Precision.HIGHEST))
        return jnp.argmin(dist, axis=-1).astype(jnp.int32)

    def lookup(self, codes: jax.Array) -> jax.Array:
        """int codes (...) -> code vectors (..., C)."""
        return self.codebook[...][codes]

    def __call__(self, z: jax.Array) -> dict[str, jax.Array]:
        """z (B,L,C) -> codes (B,L), quantized (B,L,C) with straight-through gradient to z,
        and loss = mean((sg[e]-z)^2) + beta * mean((e-sg[z])^2)."""
        z = z.astype(jnp.float32)
        codes = self.nearest(z)
        e = self.lookup(codes)
        loss = (jnp.mean(jnp.square(jax.lax.stop_gradient(e) - z))
                + self.beta * jnp.mean(jnp.square(e - jax.lax.stop_gradient(z))))
        quantized = z + jax.lax.stop_gradient(e - z)
        return {"codes": codes, "quantized": quantized, "loss": loss}


def restart_unused_codes(codebook: jax.Array, z: jax.Array, codes: jax.Array, rng: jax.Array) -> jax.Array:
    """Codes (K,C) that no vector of this batch chose are replaced by random encoder
    outputs z (...,C) of the batch: a training-time remedy for codebook collapse."""
    num_codes, dim = codebook.shape
    counts = jnp.zeros((num_codes,), jnp.int32).at[codes.reshape(-1)].add(1)
    flat = jax.lax.stop_gradient(z).reshape(-1, dim).astype(codebook.dtype)
    picks = jax.random.randint(rng, (num_codes,), 0, flat.shape[0])
    return jnp.where(counts[:, None] > 0, codebook, flat[picks])
