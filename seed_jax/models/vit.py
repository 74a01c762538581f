"""EVA ViT image encoder as BLIP-2 uses it (frozen in SEED).

Patch embedding, CLS token, learned absolute positions, pre-LN blocks whose fused
qkv has q and v biases but no k bias, no final norm. (B,S,S,3) -> (B,1+P,D).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seed_jax.models import layers


def sincos_position_init(grid: int):
    """Initialiser for learned positions (1,1+grid*grid,D): 2D sine-cosine values
    (MAE's choice), zero for CLS, so a ViT trained from scratch starts with a
    position signal as strong as its patch embeddings."""

    def init(key, shape, dtype):
        del key
        width = shape[-1]
        quarter = width // 4
        freqs = 1.0 / 10000 ** (np.arange(quarter) / max(quarter, 1))
        ys, xs = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
        parts = []
        for coord in (ys.reshape(-1), xs.reshape(-1)):
            angles = coord[:, None] * freqs[None]
            parts += [np.sin(angles), np.cos(angles)]
        table = np.concatenate(parts, axis=1)
        table = np.pad(table, ((1, 0), (0, width - table.shape[1])))
        return jnp.asarray(table[None], dtype)

    return init


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    image_size: int = 224
    patch_size: int = 14
    width: int = 1408
    depth: int = 39
    num_heads: int = 16
    mlp_dim: int = 6144
    eps: float = 1e-6

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def block(self) -> layers.BlockConfig:
        return layers.BlockConfig(self.width, self.num_heads, self.mlp_dim, eps=self.eps, qkv_bias="qv")


VIT_PRESETS = {
    # BLIP-2's EVA ViT-g/14 with the last of its 40 blocks dropped.
    "eva_vit_g": ViTConfig(),
    "tiny": ViTConfig(image_size=32, patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64),
}


class VisionTransformer(nnx.Module):

    def __init__(self, config: ViTConfig, *, dtype=jnp.float32, remat: bool = False, rngs: nnx.Rngs):
        c = config
        if c.image_size % c.patch_size:
            raise ValueError(f"image_size {c.image_size} must be a multiple of patch_size {c.patch_size}")
        self.config = c
        self.patch_kernel = layers.param(rngs, layers.fan_in((0, 1, 2)), (c.patch_size, c.patch_size, 3, c.width),
                                         ("patch", "patch", None, "embed"))
        self.patch_bias = layers.param(rngs, layers.zeros, (c.width,), ("embed",))
        self.cls_token = layers.param(rngs, layers.normal(0.02), (1, 1, c.width), (None, None, "embed"))
        self.pos_embed = layers.param(rngs, sincos_position_init(c.image_size // c.patch_size),
                                      (1, c.num_patches + 1, c.width), (None, "length", "embed"))
        self.blocks = layers.BlockStack(c.block, c.depth, dtype=dtype, remat=remat, rngs=rngs)
        self.dtype = dtype

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """pixels (B,S,S,3), normalised -> (B,1+P,D)."""
        c = self.config
        if pixels.ndim != 4 or pixels.shape[1:] != (c.image_size, c.image_size, 3):
            raise ValueError(f"pixels: expected (B,{c.image_size},{c.image_size},3), got {pixels.shape}")
        b = pixels.shape[0]
        g = c.image_size // c.patch_size
        patches = pixels.reshape(b, g, c.patch_size, g, c.patch_size, 3).astype(self.dtype)
        x = jnp.einsum("BgPhQC,PQCD->BghD", patches, self.patch_kernel[...].astype(self.dtype))
        x = x.reshape(b, g * g, c.width) + self.patch_bias[...].astype(self.dtype)
        cls = jnp.broadcast_to(self.cls_token[...].astype(self.dtype), (b, 1, c.width))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...].astype(self.dtype)
        return self.blocks(x)
