"""The API's compute dtype (the model's) and the matmul precision its programs run at."""

from __future__ import annotations

import jax.numpy as jnp

from seed_jax.models import layers


def model_dtype(dtype: str | None, model) -> str:
    """The name of the dtype `model` computes in (`model.dtype`, set when it was built):
    `dtype` None reads it, a given `dtype` must name it. A ValueError names `dtype`
    otherwise: the API cannot change a built model's compute dtype."""
    built = jnp.dtype(model.dtype).name
    if built not in layers.COMPUTE_DTYPES:
        raise ValueError(f"model: computes in {built}, expected one of {sorted(layers.COMPUTE_DTYPES)}")
    if dtype is None:
        return built
    layers.compute_dtype(dtype)  # checks the name
    if dtype != built:
        raise ValueError(f"dtype: {dtype!r}, but the model was built to compute in {built!r}; pass dtype=None "
                         f"(the model's) or build the model in {dtype} (load(..., dtype={dtype!r}) does)")
    return dtype


def matmul_precision(dtype: str) -> str:
    """jax's default matmul precision for compute dtype `dtype`: float32 means float32
    on every backend ("highest"; GPUs otherwise round matmul inputs to TF32, TPUs to
    bfloat16), bfloat16 keeps the backend's default."""
    return "highest" if dtype == "float32" else "default"
